"""`netagent run --fast-path`: pod-to-pod traffic between nodes forwarded by tc BPF, in a real lab.

The fast path must be invisible except in cost: the same pods reach each other, services still work
(their DNATed replies must go back through the stack to be un-NATed), and flows it carries never
enter the nodes' conntrack. Each test builds a 2-node lab with the nftables proxy and removes it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from netns_lab import cluster, probe
from netns_lab.capture import ECN_MASK, capture
from netns_lab.responder import DEFAULT_PORT
from netns_lab.state import Lab, NodeInfo, PodInfo
from netns_lab.topology import UNDERLAY_BRIDGE, UNDERLAY_GATEWAY
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_agent import http_get, wait_for
from test_lab import lab_cmd, lab_name, residue  # noqa: F401  (lab_name is a fixture)

from netagent import doctor, fastpath
from nodekit import netns

CLUSTER_IP = "10.96.77.7"
HOST_SERVICE_IP = "10.96.77.8"
VXLAN_DEVICE = "netagent.1"
VXLAN_PORT = 4789
UDP_PROTOCOL = 17
UNDERLAY_MTU = 1500  # the lab's veths keep the default


def wait_for_fast_path(network: str, *node_namespaces: str) -> None:
    """Until our filters are on every device they belong to, on nodes with one pod each: uplink,
    bridge, the pod's veth, and in vxlan mode the underlay interface."""
    devices = 4 if network == "vxlan" else 3
    wait_for(lambda: all(len(fast_path_filters(node)) == devices for node in node_namespaces),
             what=f"the fast path on {', '.join(node_namespaces)}")


def fast_path_filters(node_ns: str) -> dict[str, list[str]]:
    """Our tc filters on the node: device -> the BPF functions attached there."""
    found: dict[str, list[str]] = {}
    for line in netns.run(node_ns, ["ip", "-o", "link", "show"]).stdout.splitlines():
        device = line.split(":")[1].strip().split("@")[0]
        for hook in ("ingress", "egress"):
            shown = netns.run(node_ns, ["tc", "filter", "show", "dev", device, hook], check=False).stdout
            if "netagent-fp-" in shown:
                found.setdefault(device, []).append(shown.rsplit(" name ", 1)[1].split()[0])
    return found


def tracked_flows(node_ns: str, address: str) -> int:
    """Conntrack entries of this node involving `address`."""
    listing = netns.run(node_ns, ["conntrack", "-L"], check=False).stdout
    return sum(address in line for line in listing.splitlines())


def service_answers(client_netns: str, service_ip: str, name: str) -> bool:
    try:
        return probe.tcp_name(client_netns, service_ip, 80) == name
    except OSError:
        return False


def service_manifest(tmp_path, host_endpoint: str) -> str:
    """Service `far` (ClusterIP CLUSTER_IP) on the pod labelled app=far, and service `host`
    (HOST_SERVICE_IP) whose endpoint is a node's own address, like the API server's."""
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "far"},
         "spec": {"clusterIP": CLUSTER_IP, "selector": {"app": "far"},
                  "ports": [{"name": "tcp", "port": 80, "targetPort": DEFAULT_PORT, "protocol": "TCP"},
                            {"name": "udp", "port": 80, "targetPort": DEFAULT_PORT, "protocol": "UDP"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "host"},
         "spec": {"clusterIP": HOST_SERVICE_IP, "ports": [{"port": 80, "targetPort": DEFAULT_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "host-1", "labels": {"kubernetes.io/service-name": "host"}},
         "addressType": "IPv4", "ports": [{"port": DEFAULT_PORT, "protocol": "TCP"}],
         "endpoints": [{"addresses": [host_endpoint], "conditions": {"ready": True}}]},
    ]
    path = tmp_path / "services.json"
    path.write_text("\n---\n".join(json.dumps(doc) for doc in docs))
    return str(path)


@pytest.mark.parametrize("network", ["vxlan", "routes"])
def test_pods_across_nodes_bypass_conntrack_while_services_still_reach_remote_endpoints(
    lab_name, network, tmp_path  # noqa: F811
):
    lab_cmd(lab_name, "up", "--nodes", "2", "--network", network, "--proxy", "nftables", "--fast-path")
    lab_cmd(lab_name, "pod", "near", "--node", "n1")
    lab_cmd(lab_name, "pod", "far", "--node", "n2", "--labels", "app=far")
    state = Lab(lab_name).load()
    lab_cmd(lab_name, "apply", service_manifest(tmp_path, host_endpoint=state.nodes["n2"].ip))
    near, far = state.pods["near"], state.pods["far"]
    n1, n2 = state.nodes["n1"].netns, state.nodes["n2"].netns
    wait_for_fast_path(network, n1, n2)
    uplink = VXLAN_DEVICE if network == "vxlan" else "eth0"
    assert sorted(fast_path_filters(n1)[uplink]) == ["forward", "note_stack_flow"]

    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"  # neighbours resolved
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"  # (by the stack)
    for node in (n1, n2):
        netns.run(node, ["conntrack", "-F"], check=False)
    for _ in range(3):
        assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
        assert probe.udp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
        assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"
    assert tracked_flows(n1, far.ips[0]) == tracked_flows(n2, near.ips[0]) == 0  # never seen

    # The service's only endpoint is on the other node: DNATed on n1, so the replies must be
    # un-NATed there; the fast path learned the flow at n1's uplink egress and leaves it to the stack.
    wait_for(lambda: service_answers(near.netns, CLUSTER_IP, "far"), what="the service (refused until ready)")
    for _ in range(5):
        assert probe.tcp_name(near.netns, CLUSTER_IP, 80) == "far"
        assert probe.udp_name(near.netns, CLUSTER_IP, 80) == "far"
    assert tracked_flows(n1, CLUSTER_IP) > 0

    # An endpoint that is a node, not a pod: its replies come from outside the pod network and
    # must reach the stack to be un-NATed; the node itself reaches pods on other nodes too.
    wait_for(lambda: service_answers(near.netns, HOST_SERVICE_IP, "n2"), what="the host-network service")
    for _ in range(3):
        assert probe.tcp_name(near.netns, HOST_SERVICE_IP, 80) == "n2"
        assert probe.tcp_name(n2, near.ips[0], DEFAULT_PORT) == "near"

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


@pytest.mark.parametrize("network", ["vxlan", "routes"])
def test_a_connection_that_meets_an_unresolved_neighbour_keeps_the_fast_path(lab_name, network):  # noqa: F811
    """The first packet to a pod (or next hop) whose neighbour entry is missing goes through the stack,
    which resolves it. Only neighbour resolution happens there, no NAT, so the connection must not be
    recorded as one the stack owns: recorded, it would take the slow path for as long as it lives,
    and a long-lived connection is often the first one to a new pod."""
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name, network)
    uplink = VXLAN_DEVICE if network == "vxlan" else "eth0"
    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"  # the programs learn the pods
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"
    for node in (n1, n2):  # those first connections met unresolved neighbours
        clear_stack_flows(node.netns, uplink)
        netns.run(node.netns, ["conntrack", "-F"], check=False)

    netns.run(n2.netns, ["ip", "neigh", "del", far.ips[0], "dev", "na0"])
    if network == "routes":  # the next hop to n2's pods; in vxlan mode the VTEP's entry is permanent
        netns.run(n1.netns, ["ip", "neigh", "del", n2.ip, "dev", "eth0"])
    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
    assert tracked_flows(n2.netns, near.ips[0]) > 0  # the stack did carry the first packet
    assert stack_flows(n1.netns, uplink) == stack_flows(n2.netns, uplink) == []

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


@contextmanager
def running_map(node_ns: str, device: str, name: str) -> Iterator[fastpath.RunningMap]:
    """A map of the programs attached at `device`'s ingress on a lab node (bpftool finds them through
    the node's devices, so it runs in the node's netns)."""
    with netns.entered(netns.path(node_ns)):
        yield fastpath.RunningMap(device, name)


def stack_flows(node_ns: str, uplink: str) -> list[bytes]:
    """The node's `stack_flows` keys: flows the programs leave to the stack."""
    with running_map(node_ns, uplink, "stack_flows") as flows:
        return list(flows.entries())


def clear_stack_flows(node_ns: str, uplink: str) -> None:
    with running_map(node_ns, uplink, "stack_flows") as flows:
        for key in flows.entries():
            flows.delete(key)


def test_the_fast_path_writes_the_vxlan_devices_packets_and_reads_those_of_a_node_without_it(
    lab_name,  # noqa: F811
):
    """In vxlan mode the programs encapsulate and decapsulate pod traffic themselves: neither node's
    VXLAN device carries these probes (single packets; GSO aggregates are decapsulated by the device
    on kernels that cannot reset their tunnel state from BPF), yet the underlay sees the very packets
    the device would send (outer node addresses, the VXLAN port and VNI, the pod addresses inside). A
    node whose agent runs without the fast path must therefore understand them, and its device's
    packets must be understood."""
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name)
    assert fast_path_filters(n1.netns)["eth0"] == ["receive_vxlan"]
    # hooks: the VXLAN device's ingress and egress, the bridge's egress, the pod veth's and eth0's ingress
    wait_for(lambda: fast_path_metrics(n1) == {"hooks": 5, "remote_vteps": 1, "failing": 0},
             what="n1's /metrics to show the fast path on its 5 hooks with n2's VTEP")
    # first packets: the stack resolves neighbours, the programs learn where each pod is
    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"

    before = {node.name: vxlan_device_packets(node.netns) for node in (n1, n2)}
    underlay = Lab(lab_name).underlay_netns
    with capture(underlay, UNDERLAY_BRIDGE, f"udp dst port {VXLAN_PORT}", count=2) as seen:
        assert probe.udp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
    for _ in range(3):
        assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
        assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"
    assert {node.name: vxlan_device_packets(node.netns) for node in (n1, n2)} == before
    request, reply = seen.packets
    assert (request["src"], request["dst"], request["dport"], request["vni"]) == (n1.ip, n2.ip, VXLAN_PORT, 1)
    assert request["inner"] == {"src": near.ips[0], "dst": far.ips[0], "proto": UDP_PROTOCOL}
    assert (reply["src"], reply["dst"], reply["dport"], reply["vni"]) == (n2.ip, n1.ip, VXLAN_PORT, 1)
    assert reply["inner"] == {"src": far.ips[0], "dst": near.ips[0], "proto": UDP_PROTOCOL}

    set_fast_path(lab_name, False)
    cluster.restart_agent(lab_name, "n2")
    assert fast_path_filters(n2.netns) == {}
    n2_before = vxlan_device_packets(n2.netns)
    for _ in range(3):
        assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
        assert probe.udp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"
        assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"
    assert vxlan_device_packets(n2.netns) > n2_before  # n2's device does its part now
    assert vxlan_device_packets(n1.netns) == before["n1"]  # n1's programs still do theirs

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def test_vxlan_packets_not_from_a_known_node_are_left_to_the_device_and_the_nodes_firewall(
    lab_name,  # noqa: F811
):
    """receive_vxlan() skips the node's INPUT chain, so it takes only what a known node's VTEP sent
    from that node's address. The same forged frame, sent from the underlay's gateway instead of n1's
    address, reaches n2's VXLAN device through the stack, where an INPUT rule can drop it."""
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name)
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"  # n2 learns where `far` is
    underlay = Lab(lab_name).underlay_netns

    with netns.entered(netns.path(near.netns)):  # `far` answers here; no ICMP "unreachable" goes back
        answers = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answers.bind((near.ips[0], 0))
    answers.settimeout(5)

    def far_answers_a_frame_from(outer_source: str) -> bool:
        datagram = (IP(src=near.ips[0], dst=far.ips[0])
                    / UDP(sport=answers.getsockname()[1], dport=DEFAULT_PORT) / b"x")
        frame = vxlan_frame(underlay, n1, n2, datagram, outer_source=outer_source)
        send_frame(underlay, UNDERLAY_BRIDGE, frame)
        try:
            return answers.recv(100) == b"far\n"
        except TimeoutError:
            return False

    with answers:
        device = vxlan_device_packets(n2.netns)
        assert far_answers_a_frame_from(n1.ip)
        assert vxlan_device_packets(n2.netns) == device  # the programs took it
        assert far_answers_a_frame_from(UNDERLAY_GATEWAY)
        assert vxlan_device_packets(n2.netns) == device + 1  # the device did
        netns.run(n2.netns, ["iptables", "-I", "INPUT", "-p", "udp", "--dport", str(VXLAN_PORT),
                             "-s", UNDERLAY_GATEWAY, "-j", "DROP"])
        assert not far_answers_a_frame_from(UNDERLAY_GATEWAY)  # the node's firewall had its say
        assert far_answers_a_frame_from(n1.ip)

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


ECT_0, CE = 2, 3  # ECN codepoints (RFC 3168)
INNER_IP_PROTOCOL = 8 + 8 + 14 + 9  # offset in the outer UDP header: UDP, VXLAN, inner Ethernet, IPv4


def test_ecn_crosses_the_vxlan_fast_path_as_rfc_6040_says(lab_name):  # noqa: F811
    """Encapsulation copies an ECN-capable inner codepoint to the outer header, as the VXLAN device
    does. On arrival a congestion mark (CE) on the outer header must reach the pod; the programs leave
    such packets to the device, which marks the inner header, or drops the packet when the inner one
    is not ECN-capable."""
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name)
    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"  # neighbours, local_pods
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"
    underlay = Lab(lab_name).underlay_netns

    device = vxlan_device_packets(n1.netns)
    udp_from_n1 = (f"udp dst port {VXLAN_PORT} and src host {n1.ip}"
                   f" and udp[{INNER_IP_PROTOCOL}] = {UDP_PROTOCOL}")
    with capture(underlay, UNDERLAY_BRIDGE, udp_from_n1, count=1) as seen:
        with netns.entered(netns.path(near.netns)):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:  # open until the answer is in: a closed port would send ICMP, which the device carries
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, ECT_0)
            sender.settimeout(5)
            sender.sendto(b"x", (far.ips[0], DEFAULT_PORT))
            assert sender.recv(100) == b"far\n"
    assert (seen.packets[0]["ecn"], seen.packets[0]["inner_ecn"]) == (ECT_0, ECT_0)
    assert vxlan_device_packets(n1.netns) == device  # written by the programs

    with netns.entered(netns.path(far.netns)):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((far.ips[0], 0))
    listener.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    listener.settimeout(3)

    def arrives_with_ecn(outer: int, inner: int) -> int | None:
        """The ECN codepoint the pod sees on a frame n1 sends with these codepoints, None if lost."""
        datagram = (IP(src=near.ips[0], dst=far.ips[0], tos=inner)
                    / UDP(sport=40001, dport=listener.getsockname()[1]) / b"x")
        send_frame(underlay, UNDERLAY_BRIDGE, vxlan_frame(underlay, n1, n2, datagram, outer_tos=outer))
        try:
            _data, ancillary, _flags, _peer = listener.recvmsg(100, socket.CMSG_SPACE(1))
        except TimeoutError:
            return None
        return next(data[0] & ECN_MASK for level, kind, data in ancillary
                    if (level, kind) == (socket.IPPROTO_IP, socket.IP_TOS))

    with listener:
        device = vxlan_device_packets(n2.netns, "rx")
        assert arrives_with_ecn(outer=ECT_0, inner=ECT_0) == ECT_0
        assert vxlan_device_packets(n2.netns, "rx") == device  # the programs took it
        assert arrives_with_ecn(outer=CE, inner=ECT_0) == CE
        assert vxlan_device_packets(n2.netns, "rx") == device + 1  # the device did
        errors = vxlan_device_stats(n2.netns)["rx"]["errors"]
        assert arrives_with_ecn(outer=CE, inner=0) is None
        assert vxlan_device_stats(n2.netns)["rx"]["errors"] == errors + 1  # the device's RFC 6040 drop

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def test_gso_packets_take_the_vxlan_device_exactly_when_the_kernel_cannot_reset_their_tunnel_state(
    lab_name,  # noqa: F811
):
    """A bulk TCP transfer between pods on two nodes arrives as GSO aggregates. receive_vxlan()
    strips them itself only where bpf_skb_adjust_room() can also reset their tunnel GSO state (what
    `netagent doctor` probes); elsewhere the VXLAN device does. Either way every byte arrives intact."""
    reset_in_bpf = doctor.run_checks((gso_reset_check(),))[0].ok
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name)
    assert probe.tcp_name(near.netns, far.ips[0], DEFAULT_PORT) == "far"  # neighbours, local_pods
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"

    payload = os.urandom(8 << 20)
    before = vxlan_device_stats(n2.netns)["rx"]
    assert transfer(near.netns, far.netns, far.ips[0], payload) == hashlib.sha256(payload).digest()
    after = vxlan_device_stats(n2.netns)["rx"]
    packets, octets = after["packets"] - before["packets"], after["bytes"] - before["bytes"]
    with running_map(n2.netns, "eth0", "decap_refused") as decap_refused:  # receive_vxlan's, at eth0
        refused = decap_refused.entries()
    assert refused == {bytes(4): int(not reset_in_bpf).to_bytes(4, sys.byteorder)}  # the programs agree
    if reset_in_bpf:
        assert packets == 0
    else:
        assert packets > 0 and octets / packets > UNDERLAY_MTU  # GSO aggregates, not single packets

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def test_a_deleted_pod_is_forgotten_by_the_receiving_programs(lab_name):  # noqa: F811
    """receive_vxlan() finds a local pod's veth in `local_pods`, learned from the pod's packets. Once
    the pod is deleted the agent removes its entry, so its address no longer leads to a veth that is
    gone."""
    near, far, n1, n2 = lab_with_a_pod_per_node(lab_name)
    assert probe.tcp_name(far.netns, near.ips[0], DEFAULT_PORT) == "near"  # n2 learns where `far` is
    assert far.ips[0] in local_pod_addresses(n2.netns)

    lab_cmd(lab_name, "rm", "far")
    wait_for(lambda: far.ips[0] not in local_pod_addresses(n2.netns), what="far's local_pods entry to go")

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def local_pod_addresses(node_ns: str) -> set[str]:
    """The pod addresses in the node's running `local_pods` map."""
    with running_map(node_ns, VXLAN_DEVICE, "local_pods") as local_pods:
        return {socket.inet_ntoa(address) for address in local_pods.entries()}


def gso_reset_check() -> doctor.Check:
    return next(check for check in doctor.CHECKS if check.probe is doctor.probe_tunnel_gso_reset)


def transfer(client_netns: str, server_netns: str, server_ip: str, payload: bytes) -> bytes:
    """Send `payload` over one TCP connection between the namespaces; the SHA-256 of what arrived."""
    with netns.entered(netns.path(server_netns)):
        listener = socket.create_server((server_ip, 0))
    listener.settimeout(30)
    arrived = hashlib.sha256()
    failures: list[BaseException] = []

    def receive() -> None:
        try:
            connection, _peer = listener.accept()
            with connection:
                connection.settimeout(30)
                while chunk := connection.recv(1 << 16):
                    arrived.update(chunk)
        except OSError as err:
            failures.append(err)

    with listener:
        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        with netns.entered(netns.path(client_netns)):
            sender = socket.create_connection(listener.getsockname(), timeout=30)
        with sender:
            sender.sendall(payload)
        receiver.join(timeout=60)
    assert not receiver.is_alive() and not failures, failures or "the receiver is still reading"
    return arrived.digest()


def vxlan_frame(underlay: str, sender: NodeInfo, receiver: NodeInfo, inner: IP,
                outer_source: str | None = None, outer_tos: int = 0) -> bytes:
    """`inner` as the sender's VXLAN device would put it on the underlay for the receiver, from
    `outer_source` instead of the sender's address if given."""
    return bytes(Ether(src=link_mac(underlay, UNDERLAY_BRIDGE), dst=link_mac(receiver.netns, "eth0"))
                 / IP(src=outer_source or sender.ip, dst=receiver.ip, tos=outer_tos)
                 / UDP(sport=40000, dport=VXLAN_PORT)
                 / VXLAN(vni=1, flags=0x08)  # "the VNI is valid", nothing else
                 / Ether(src=link_mac(sender.netns, VXLAN_DEVICE), dst=link_mac(receiver.netns, VXLAN_DEVICE))
                 / inner)


def fast_path_metrics(node: NodeInfo) -> dict[str, int]:
    """The agent's netagent_fast_path_* gauges, from its /metrics endpoint."""
    _status, body = http_get(node.netns, f"http://{node.ip}:{cluster.METRICS_PORT}/metrics")
    prefix = "netagent_fast_path_"
    return {name.removeprefix(prefix): int(float(value)) for line in body.decode().splitlines()
            if line.startswith(prefix) for name, value in [line.split()]}


def send_frame(netns_name: str, device: str, frame: bytes) -> None:
    with netns.entered(netns.path(netns_name)), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((device, 0))
        raw.send(frame)


def link_mac(node_ns: str, device: str) -> str:
    return json.loads(netns.run(node_ns, ["ip", "-j", "link", "show", device]).stdout)[0]["address"]


def lab_with_a_pod_per_node(lab: str, network: str = "vxlan") -> tuple[PodInfo, PodInfo, NodeInfo, NodeInfo]:
    """A 2-node lab with the fast path attached on both nodes: pod `near` on n1, `far` on n2."""
    lab_cmd(lab, "up", "--nodes", "2", "--network", network, "--proxy", "none", "--fast-path")
    lab_cmd(lab, "pod", "near", "--node", "n1")
    lab_cmd(lab, "pod", "far", "--node", "n2")
    state = Lab(lab).load()
    n1, n2 = state.nodes["n1"], state.nodes["n2"]
    wait_for_fast_path(network, n1.netns, n2.netns)
    return state.pods["near"], state.pods["far"], n1, n2


def vxlan_device_packets(node_ns: str, *directions: str) -> int:
    """Packets the node's VXLAN device sent and received (or only those of `directions`)."""
    stats = vxlan_device_stats(node_ns)
    return sum(stats[direction]["packets"] for direction in directions or ("tx", "rx"))


def vxlan_device_stats(node_ns: str) -> dict[str, dict[str, int]]:
    """The device's counters: {"rx": {"packets": .., "bytes": .., "errors": ..}, "tx": {..}}."""
    link = json.loads(netns.run(node_ns, ["ip", "-j", "-s", "link", "show", VXLAN_DEVICE]).stdout)[0]
    return link["stats64"]


class EchoThroughService:
    """A 2-node lab with the nftables proxy: pod `near` on n1 holds one TCP connection to
    ClusterIP:5005, DNATed on n1 to an echo socket in pod `far` on n2."""

    def __init__(self, lab: str, tmp_path, fast_path: bool, network: str = "routes") -> None:
        lab_cmd(lab, "up", "--nodes", "2", "--network", network, "--proxy", "nftables",
                *(["--fast-path"] if fast_path else []))
        lab_cmd(lab, "pod", "near", "--node", "n1")
        lab_cmd(lab, "pod", "far", "--node", "n2", "--labels", "app=far")
        manifest = tmp_path / "echo.json"
        manifest.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"clusterIP": CLUSTER_IP, "selector": {"app": "far"},
                     "ports": [{"port": 5005, "targetPort": 5005, "protocol": "TCP"}]}}))
        lab_cmd(lab, "apply", str(manifest))
        state = Lab(lab).load()
        self.n1 = state.nodes["n1"].netns
        self.near, self.far = state.pods["near"], state.pods["far"]
        far = self.far
        with netns.entered(netns.path(far.netns)):
            self.listener = socket.create_server((far.ips[0], 5005))
        self.listener.settimeout(30)
        self.client = connect_when_served(state.pods["near"].netns, (CLUSTER_IP, 5005))
        self.server, _ = self.listener.accept()
        self.server.settimeout(10)
        self.client.settimeout(10)

    def server_pushes_and_client_answers(self, payload: bytes) -> bool:
        """The server speaks first: its DNATed packet must reach the stack on n1 to be un-NATed."""
        self.server.sendall(payload)
        if self.client.recv(100) != payload:
            return False
        self.client.sendall(payload)
        return self.server.recv(100) == payload

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


@pytest.mark.parametrize("network", ["routes", "vxlan"])
def test_a_service_connection_across_nodes_survives_an_agent_restart_that_reloads_the_fast_path(
    lab_name, tmp_path, network  # noqa: F811
):
    """A restarted agent leaves the running fast path alone; when a new pod makes it load the
    program anew, it re-attaches every hook with the running programs' flow map, so the connection's
    replies still go through the stack. In vxlan mode the new programs get the VTEP map again."""
    echo = EchoThroughService(lab_name, tmp_path, fast_path=True, network=network)
    try:
        wait_for_fast_path(network, echo.n1)
        assert echo.server_pushes_and_client_answers(b"before")
        programs_before = attached_programs(echo.n1)

        cluster.restart_agent(lab_name, "n1")
        assert attached_programs(echo.n1) == programs_before  # a restart alone touches nothing
        lab_cmd(lab_name, "pod", "newcomer", "--node", "n1")  # its veth needs the program: a reload
        wait_for(lambda: attached_programs(echo.n1).isdisjoint(programs_before), what="a reloaded fast path")

        assert echo.server_pushes_and_client_answers(b"pushed after the restart")
        if network == "vxlan":
            assert probe.tcp_name(echo.near.netns, echo.far.ips[0], DEFAULT_PORT) == "far"  # learns `near`
            before = vxlan_device_packets(echo.n1)
            for _ in range(3):
                assert probe.tcp_name(echo.near.netns, echo.far.ips[0], DEFAULT_PORT) == "far"
            assert vxlan_device_packets(echo.n1) == before
    finally:
        echo.close()


def test_switching_the_fast_path_on_keeps_service_connections_opened_before_and_off_removes_it(
    lab_name, tmp_path  # noqa: F811
):
    """Flows the stack NATed before the fast path existed were never seen by its programs: the
    agent learns them from conntrack when it attaches. --no-fast-path takes the filters away."""
    echo = EchoThroughService(lab_name, tmp_path, fast_path=False)
    try:
        assert echo.server_pushes_and_client_answers(b"before")
        set_fast_path(lab_name, True)
        cluster.restart_agent(lab_name, "n1")
        wait_for_fast_path("routes", echo.n1)
        assert echo.server_pushes_and_client_answers(b"pushed after switching on")

        set_fast_path(lab_name, False)
        cluster.restart_agent(lab_name, "n1")
        assert fast_path_filters(echo.n1) == {}
        assert echo.server_pushes_and_client_answers(b"pushed after switching off")
    finally:
        echo.close()


def set_fast_path(lab: str, on: bool) -> None:
    """What the next (re)started agent of the lab runs with."""
    with Lab(lab).update() as state:
        state.fast_path = on


def connect_when_served(client_netns: str, address: tuple[str, int]) -> socket.socket:
    """A TCP connection from the netns, retried until the proxy has programmed the service (before,
    the ClusterIP is routed to the underlay, where nothing answers) and its endpoint (refused)."""
    deadline = time.monotonic() + 60
    while True:
        with netns.entered(netns.path(client_netns)):
            try:
                return socket.create_connection(address, timeout=3)
            except OSError:
                assert time.monotonic() < deadline, f"{address} never accepted a connection"
        time.sleep(0.5)


def attached_programs(node_ns: str) -> set[str]:
    """The BPF program ids of our tc filters on the node."""
    shown = [netns.run(node_ns, ["tc", "filter", "show", "dev", device, hook], check=False).stdout
             for device in fast_path_filters(node_ns) for hook in ("ingress", "egress")]
    return {word for text in shown for line in text.splitlines() if "netagent-fp-" in line
            for word in [line.split(" id ")[1].split()[0]]}
