"""The netagent CNI plugin, driven as a runtime drives it, inside a netns standing in for the node.

Behaviour is proven with real traffic between pod namespaces. Tests marked with the `node` fixture
run twice: through the exec'd Python plugin and through the compiled shim talking to a CniService.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket

import pytest
from test_cni_support import CniNode, make_node, node_on_path, ping, tcp_reaches

from nodekit import netns, nodestate

V4 = "10.77.1.0/24"
V6 = "fd77:1::/64"
SMALL_POOL = {"subnet": "10.79.0.0/24", "rangeStart": "10.79.0.10"}


@pytest.fixture(params=["exec", "shim"])
def node(request, make_netns, tmp_path):
    with node_on_path(request.param, make_netns, tmp_path) as cni_node:
        yield cni_node


@pytest.fixture
def exec_node(make_netns, tmp_path) -> CniNode:
    return make_node(make_netns, tmp_path)


def test_two_pods_reach_each_other_the_gateway_and_the_node(node, make_netns):
    conf = node.conf([V4], mtu=1400)
    pod_a, pod_b = make_netns("a"), make_netns("b")
    result_a = node.add(conf, "ctr-a", pod_a)
    result_b = node.add(conf, "ctr-b", pod_b)
    ip_a = result_a["ips"][0]["address"].split("/")[0]
    ip_b = result_b["ips"][0]["address"].split("/")[0]
    gateway = result_a["ips"][0]["gateway"]

    assert ip_a != ip_b
    assert ping(pod_a, ip_b) and ping(pod_b, ip_a)
    assert ping(pod_a, gateway)
    assert ping(node.name, ip_a)
    assert tcp_reaches(pod_a, pod_b, ip_b)
    assert tcp_reaches(pod_b, node.name, gateway)  # a pod reaches a service bound on the node
    assert tcp_reaches(node.name, pod_a, ip_a)


def test_pod_interface_has_the_configured_mtu_address_and_default_route(node, make_netns):
    pod = make_netns("a")
    result = node.add(node.conf([V4], mtu=1400), "ctr-a", pod, ifname="net0")

    link = json.loads(netns.run(pod, ["ip", "-j", "addr", "show", "net0"]).stdout)[0]
    assert link["mtu"] == 1400
    assert link["operstate"] == "UP"
    assert link["address"] == result["interfaces"][2]["mac"]
    assert {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"} == {
        result["ips"][0]["address"]
    }
    routes = json.loads(netns.run(pod, ["ip", "-j", "route", "show", "default"]).stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.1.1", "net0")]
    host_veth = result["interfaces"][1]["name"]
    host_link = json.loads(netns.run(node.name, ["ip", "-j", "-d", "link", "show", host_veth]).stdout)[0]
    assert host_link["mtu"] == 1400
    assert host_link["master"] == "na0"
    assert host_link["linkinfo"]["info_slave_data"]["hairpin"] is True
    assert result["cniVersion"] == "1.1.0"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.77.1.1"}]


def test_dual_stack_config_gives_both_families_and_both_work(exec_node, make_netns):
    conf = exec_node.conf([V4, V6])
    pod_a, pod_b = make_netns("a"), make_netns("b")
    exec_node.add(conf, "ctr-a", pod_a)
    result_b = exec_node.add(conf, "ctr-b", pod_b)

    addresses = {ip["address"].split("/")[0] for ip in result_b["ips"]}
    v4 = next(a for a in addresses if "." in a)
    v6 = next(a for a in addresses if ":" in a)
    assert ping(pod_a, v4) and ping(pod_a, v6)
    assert tcp_reaches(pod_a, pod_b, v4) and tcp_reaches(pod_a, pod_b, v6)
    assert ping(pod_a, "fd77:1::1")  # the IPv6 gateway on the bridge
    assert {r["dst"] for r in result_b["routes"]} == {"0.0.0.0/0", "::/0"}


def test_without_subnet_pod_cidr_and_mtu_come_from_the_node_state(exec_node, make_netns, tmp_path):
    state_file = os.path.join(str(tmp_path), "node.json")
    conf = exec_node.conf(nodeStateFile=state_file)
    pod = make_netns("a")

    missing = exec_node.call("ADD", conf, "ctr-a", pod)
    assert missing.code != 0 and missing.result["code"] == 11
    assert "has not written it" in missing.result["msg"]
    assert exec_node.allocations() == {} and exec_node.links() == ["lo"]

    nodestate.write(nodestate.NodeState("n1", ("10.88.3.0/24",), 1450), state_file)
    result = exec_node.add(conf, "ctr-a", pod)
    assert result["ips"][0]["address"] == "10.88.3.2/24"
    assert json.loads(netns.run(pod, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]["mtu"] == 1450

    os.unlink(state_file)  # the agent's state is gone again: DEL must still clean up
    assert exec_node.call("DEL", conf, "ctr-a", pod).code == 0
    assert exec_node.allocations() == {} and exec_node.links() == ["lo", "na0"]


def test_del_twice_succeeds_and_leaves_nothing(node, make_netns):
    conf = node.conf([V4])
    pod = make_netns("a")
    node.add(conf, "ctr-a", pod)

    for _ in range(2):
        outcome = node.call("DEL", conf, "ctr-a", pod)
        assert (outcome.code, outcome.stdout) == (0, b"")
    assert node.allocations() == {}
    assert node.links() == ["lo", "na0"]


def test_del_after_the_netns_is_gone_releases_the_address(exec_node, make_netns):
    conf = exec_node.conf([V4])
    pod = make_netns("a")
    exec_node.add(conf, "ctr-a", pod)
    netns.delete(pod)

    outcome = exec_node.call("DEL", conf, "ctr-a", pod)
    assert outcome.code == 0, outcome
    assert exec_node.allocations() == {}
    assert exec_node.links() == ["lo", "na0"]


def test_check_passes_on_a_healthy_pod_and_catches_a_removed_route(node, make_netns):
    pod = make_netns("a")
    result = node.add(node.conf([V4, V6]), "ctr-a", pod)
    check_conf = node.conf([V4, V6], prevResult=result)

    assert node.call("CHECK", check_conf, "ctr-a", pod).code == 0
    netns.run(pod, ["ip", "route", "del", "default"])
    drift = node.call("CHECK", check_conf, "ctr-a", pod)
    assert drift.code != 0
    assert drift.result["code"] == 101 and "0.0.0.0/0" in drift.result["msg"]


def test_check_catches_a_removed_address(exec_node, make_netns):
    pod = make_netns("a")
    result = exec_node.add(exec_node.conf([V4]), "ctr-a", pod)
    netns.run(pod, ["ip", "addr", "flush", "dev", "eth0"])

    drift = exec_node.call("CHECK", exec_node.conf([V4], prevResult=result), "ctr-a", pod)
    assert drift.code != 0 and "address" in drift.result["msg"]


def test_gc_removes_exactly_the_attachments_not_listed_as_valid(exec_node, make_netns):
    conf = exec_node.conf([V4])
    other_conf = exec_node.conf(["10.78.0.0/24"], name="othernet", bridge="na1")
    pods = {cid: make_netns(cid) for cid in ("keep", "drop1", "drop2", "other")}
    for cid in ("keep", "drop1", "drop2"):
        exec_node.add(conf, cid, pods[cid])
    exec_node.add(other_conf, "other", pods["other"])
    before = exec_node.links()

    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    outcome = exec_node.call("GC", gc_conf)

    assert outcome.code == 0, outcome
    assert [content.split()[0] for content in exec_node.allocations().values()] == ["keep"]
    assert [content.split()[0] for content in exec_node.allocations("othernet").values()] == ["other"]
    assert len(exec_node.links()) == len(before) - 2
    assert netns.run(pods["keep"], ["ip", "link", "show", "eth0"], check=False).returncode == 0
    assert netns.run(pods["other"], ["ip", "link", "show", "eth0"], check=False).returncode == 0
    for dropped in ("drop1", "drop2"):
        assert netns.run(pods[dropped], ["ip", "link", "show", "eth0"], check=False).returncode != 0


def test_status_succeeds_until_the_pool_is_exhausted(exec_node, make_netns):
    conf = exec_node.conf(ipam={**SMALL_POOL, "rangeEnd": "10.79.0.11"})
    assert exec_node.call("STATUS", conf).code == 0
    exec_node.add(conf, "ctr-a", make_netns("a"))
    assert exec_node.call("STATUS", conf).code == 0
    exec_node.add(conf, "ctr-b", make_netns("b"))

    status = exec_node.call("STATUS", conf)
    assert status.code != 0
    assert status.result["code"] == 50 and "exhausted" in status.result["msg"]


def test_status_without_node_state_reports_plugin_not_available(exec_node, tmp_path):
    status = exec_node.call("STATUS", exec_node.conf(nodeStateFile=str(tmp_path / "absent.json")))
    assert status.code != 0 and status.result["code"] == 50


def test_add_on_an_exhausted_pool_fails_cleanly(exec_node, make_netns):
    conf = exec_node.conf(ipam={**SMALL_POOL, "rangeEnd": "10.79.0.10"})
    exec_node.add(conf, "ctr-a", make_netns("a"))
    pod_b = make_netns("b")

    outcome = exec_node.call("ADD", conf, "ctr-b", pod_b)
    assert outcome.code != 0
    assert outcome.result["code"] == 100 and "no free address" in outcome.result["msg"]
    assert len(exec_node.allocations()) == 1
    assert netns.run(pod_b, ["ip", "-o", "link"]).stdout.count("\n") == 1  # only lo


def test_add_failing_part_way_leaves_no_veth_address_or_allocation(exec_node, make_netns):
    conf = exec_node.conf([V4])
    pod = make_netns("a")
    exec_node.add(conf, "ctr-a", pod, ifname="eth0")
    links_before, allocations_before = exec_node.links(), exec_node.allocations()

    # a second interface in the same pod: its default route clashes with eth0's, after veth + address
    outcome = exec_node.call("ADD", conf, "ctr-a", pod, ifname="eth1")

    assert outcome.code != 0 and outcome.result["code"] == 102
    assert exec_node.links() == links_before
    assert exec_node.allocations() == allocations_before
    assert "eth1" not in netns.run(pod, ["ip", "-o", "link"]).stdout


def test_ip_masq_masquerades_only_traffic_leaving_the_cluster_cidr(exec_node, make_netns):
    conf = exec_node.conf([V4], ipMasq=True, clusterCIDR="10.77.0.0/16")
    pod_a, pod_b, outside = make_netns("a"), make_netns("b"), make_netns("out")
    ip_a = exec_node.add(conf, "ctr-a", pod_a)["ips"][0]["address"].split("/")[0]
    ip_b = exec_node.add(conf, "ctr-b", pod_b)["ips"][0]["address"].split("/")[0]
    # a host outside the cluster, on a link of the node, with no route back to the pods
    uplink = ["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", outside]
    netns.run(exec_node.name, uplink)
    netns.run(exec_node.name, ["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"])
    netns.run(exec_node.name, ["ip", "link", "set", "up0", "up"])
    netns.run(outside, ["ip", "addr", "add", "192.0.2.2/24", "dev", "up1"])
    netns.run(outside, ["ip", "link", "set", "up1", "up"])

    assert seen_source(pod_a, outside, "192.0.2.2") == "192.0.2.1"  # masqueraded to the node
    assert seen_source(pod_a, pod_b, ip_b) == ip_a  # inside the cluster CIDR: untouched

    netns.run(exec_node.name, ["nft", "flush", "ruleset"])  # rules wiped: the next ADD restores them
    exec_node.add(conf, "ctr-c", make_netns("c"))
    ruleset = netns.run(exec_node.name, ["nft", "list", "table", "inet", "netagent_testnet"]).stdout
    assert ruleset.count("masquerade") == 1  # once per network, however many ADDs
    assert seen_source(pod_a, outside, "192.0.2.2") == "192.0.2.1"


def seen_source(client_ns: str, server_ns: str, address: str, port: int = 8081) -> str | None:
    """The source address a TCP server in server_ns sees for a connection from client_ns."""
    with netns.entered(netns.path(server_ns)):
        server = socket.create_server((address, port))
    with netns.entered(netns.path(client_ns)):
        client = socket.socket()
    with server, client:
        server.settimeout(10)
        client.settimeout(10)
        try:
            client.connect((address, port))
            conn, peer = server.accept()
        except OSError:
            return None
        conn.close()
        return peer[0]


def test_a_first_add_that_fails_leaves_no_bridge_behind(node, make_netns):
    pod = make_netns("a")
    take_eth0(pod)

    outcome = node.call("ADD", node.conf([V4, V6]), "ctr-a", pod)

    assert outcome.code != 0 and outcome.result["code"] == 102
    assert node.links() == ["lo"]
    assert node.allocations() == {}


def test_a_failed_add_removes_only_the_gateway_addresses_it_added(exec_node, make_netns):
    """The bridge was there (an earlier pod came and went); the failed ADD added its gateways."""
    pod = make_netns("a")
    exec_node.add(exec_node.conf(["10.77.9.0/24"]), "ctr-old", pod)
    assert exec_node.call("DEL", exec_node.conf(["10.77.9.0/24"]), "ctr-old", pod).code == 0
    take_eth0(pod)

    outcome = exec_node.call("ADD", exec_node.conf([V4]), "ctr-a", pod)

    assert outcome.code != 0
    assert exec_node.links() == ["lo", "na0"]
    assert bridge_addresses(exec_node.name) == ["10.77.9.1/24"]


def test_a_failed_add_keeps_the_bridge_another_pod_uses(exec_node, make_netns):
    conf = exec_node.conf([V4])
    pod_a, pod_b = make_netns("a"), make_netns("b")
    ip_a = exec_node.add(conf, "ctr-a", pod_a)["ips"][0]["address"].split("/")[0]
    take_eth0(pod_b)

    assert exec_node.call("ADD", conf, "ctr-b", pod_b).code != 0

    assert bridge_addresses(exec_node.name) == ["10.77.1.1/24"]
    assert ping(pod_a, "10.77.1.1") and ping(exec_node.name, ip_a)


def test_the_masquerade_table_goes_with_the_last_attachment_of_its_network(exec_node, make_netns):
    conf = exec_node.conf([V4], ipMasq=True, clusterCIDR="10.77.0.0/16")
    pod_a, pod_b = make_netns("a"), make_netns("b")
    exec_node.add(conf, "ctr-a", pod_a)
    exec_node.add(conf, "ctr-b", pod_b)
    table = ["nft", "list", "table", "inet", "netagent_testnet"]

    assert exec_node.call("DEL", conf, "ctr-a", pod_a).code == 0
    assert "masquerade" in netns.run(exec_node.name, table).stdout
    assert exec_node.call("DEL", conf, "ctr-b", pod_b).code == 0
    assert netns.run(exec_node.name, table, check=False).returncode != 0
    assert exec_node.call("DEL", conf, "ctr-b", pod_b).code == 0  # still idempotent

    exec_node.add(conf, "ctr-c", make_netns("c"))  # and the next pod brings it back
    assert "masquerade" in netns.run(exec_node.name, table).stdout
    gc_conf = {**conf, "cni.dev/valid-attachments": []}
    assert exec_node.call("GC", gc_conf).code == 0
    assert netns.run(exec_node.name, table, check=False).returncode != 0


@pytest.mark.parametrize("last_call", ["DEL", "GC"])
def test_the_masquerade_table_goes_even_when_the_last_call_has_ipmasq_off(exec_node, make_netns, last_call):
    """An operator who turns ipMasq off in the conflist must not be left with the table for ever."""
    conf = exec_node.conf([V4], ipMasq=True, clusterCIDR="10.77.0.0/16")
    pod = make_netns("a")
    exec_node.add(conf, "ctr-a", pod)
    turned_off = {**conf, "ipMasq": False, "cni.dev/valid-attachments": []}

    assert exec_node.call(last_call, turned_off, "ctr-a" if last_call == "DEL" else "", pod).code == 0
    table = ["nft", "list", "table", "inet", "netagent_testnet"]
    assert netns.run(exec_node.name, table, check=False).returncode != 0


def test_networks_whose_names_spell_alike_have_their_own_masquerade_tables(exec_node, make_netns):
    dotted = exec_node.conf([V4], name="net.a", bridge="na1", ipMasq=True)
    underscored = exec_node.conf(["10.78.0.0/24"], name="net_a", bridge="na2", ipMasq=True)
    pod_a, pod_b = make_netns("a"), make_netns("b")
    exec_node.add(dotted, "ctr-a", pod_a)
    exec_node.add(underscored, "ctr-b", pod_b)

    assert exec_node.call("DEL", dotted, "ctr-a", pod_a).code == 0
    tables = netns.run(exec_node.name, ["nft", "list", "tables"]).stdout.split()
    assert "netagent_net_a" in tables and not any(t.startswith("netagent_net_a_") for t in tables)


def test_ipam_files_are_readable_by_root_only_and_an_old_open_directory_is_tightened(exec_node, make_netns):
    directory = os.path.join(exec_node.data_dir, "testnet")
    os.makedirs(directory, mode=0o755)
    os.chmod(directory, 0o755)  # as an earlier version left it

    exec_node.add(exec_node.conf([V4, V6]), "ctr-a", make_netns("a"))

    assert os.stat(directory).st_mode & 0o777 == 0o700
    modes = {name: os.stat(os.path.join(directory, name)).st_mode & 0o777 for name in os.listdir(directory)}
    assert len(modes) >= 5  # two allocations, their owner index entries, lock, last reserved
    assert set(modes.values()) == {0o600}, modes


def take_eth0(pod: str) -> None:
    """Give the pod a link named eth0, so an ADD for eth0 fails after it made the bridge."""
    netns.run(pod, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"])


def bridge_addresses(node_name: str) -> list[str]:
    """The global addresses on the node's bridge, as address/prefixlen."""
    done = netns.run(node_name, ["ip", "-j", "addr", "show", "dev", "na0", "scope", "global"])
    infos = [a for link in json.loads(done.stdout) for a in link["addr_info"] if "local" in a]
    return [f"{a['local']}/{a['prefixlen']}" for a in infos]


def test_the_last_del_racing_an_add_never_takes_the_new_pods_masquerade(exec_node, make_netns):
    conf = exec_node.conf([V4], ipMasq=True)
    table = ["nft", "list", "table", "inet", "netagent_testnet"]
    pods = [make_netns(f"p{i}") for i in range(2)]
    exec_node.add(conf, "ctr-0", pods[0])
    for round_ in range(1, 9):
        leaving, coming = f"ctr-{round_ - 1}", f"ctr-{round_}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            deleted = pool.submit(exec_node.call, "DEL", conf, leaving, pods[(round_ - 1) % 2])
            added = pool.submit(exec_node.call, "ADD", conf, coming, pods[round_ % 2])
            assert deleted.result().code == 0 and added.result().code == 0, (deleted.result(), added.result())
        assert len(exec_node.allocations()) == 1
        assert "masquerade" in netns.run(exec_node.name, table).stdout, f"round {round_}"


def test_malformed_configs_get_the_spec_error_through_the_shim_and_the_agent_too(node, make_netns):
    pod = make_netns("a")
    good = node.conf([V4])
    cases = [
        (json.dumps({**good, "bridge": None}).encode(), 7),
        (json.dumps({**good, "ipam": {**good["ipam"], "dataDir": ""}}).encode(), 7),
        (json.dumps({**good, "bridge": "\ud800"}).encode(), 6),
        (json.dumps(good)[:-1].encode() + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 6),
        (json.dumps({**good, "prevResult": {"ips": [1]}}).encode(), 7),
    ]
    for stdin, code in cases:
        outcome = node.call("CHECK" if b"prevResult" in stdin else "ADD", stdin, "ctr-a", pod)
        assert outcome.code != 0 and outcome.result["code"] == code, outcome
    assert node.call("ADD", good, "ctr-a\n", pod).result["code"] == 4
    assert node.links() == ["lo"] and node.allocations() == {}
