"""The proxy controller over the real list/watch protocol (the lab API server through the official
`kubernetes` client), programming the hand-built node of test_proxy_dataplane, per backend."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from kubernetes import client, config
from netns_lab.apiserver.server import LabApiServer, write_kubeconfig
from test_proxy_dataplane import (  # noqa: F401 (node_fixture provides the `node` fixture)
    CLUSTER_CIDR,
    NODE,
    VIP,
    Node,
    endpoint,
    endpoint_slice,
    eventually,
    node_fixture,
    service,
    tcp_ask,
)

from netagent.config import AgentConfig
from netagent.proxy.cli import proxy_group
from netagent.proxy.controller import ProxyController
from nodekit import netns


class Api:
    def __init__(self, tmp_path) -> None:
        self.server = LabApiServer(str(tmp_path / "apiserver.json")).start()
        kubeconfig = str(tmp_path / "kubeconfig")
        write_kubeconfig(kubeconfig, self.server.url, self.server.credentials)
        self.client = config.new_client_from_config(kubeconfig)
        self.core = client.CoreV1Api(self.client)
        self.discovery = client.DiscoveryV1Api(self.client)

    def put_slice(self, body: dict) -> None:
        name = body["metadata"]["name"]
        try:
            current = self.discovery.read_namespaced_endpoint_slice(name, "default")
        except client.exceptions.ApiException:
            self.discovery.create_namespaced_endpoint_slice("default", body)
            return
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        self.discovery.replace_namespaced_endpoint_slice(name, "default", body)


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    api = Api(tmp_path)
    yield api
    api.server.stop()


@pytest.fixture
def controller(api: Api, node: Node, tmp_path) -> Iterator[ProxyController]:
    config = AgentConfig(
        node_name=NODE,
        proxy=node.proxier.kind,
        cluster_cidrs=(CLUSTER_CIDR,),
        min_sync_period=0.2,
        state_dir=str(tmp_path),
    )
    proxy = ProxyController(api.client, config, families=(4,), netns=node.ns)
    proxy.start()
    yield proxy
    proxy.stop()


def reached(node: Node, tries: int = 30) -> set[str]:
    return node.pods_reached(node.client, VIP, 80, tries=tries)


def test_controller_follows_services_and_endpoint_slices(
    api: Api, node: Node, controller: ProxyController
) -> None:
    api.core.create_namespaced_service("default", service())
    api.put_slice(endpoint_slice("web", [endpoint("p0"), endpoint("p1")]))
    eventually(lambda: reached(node) == {"p0", "p1"})
    assert controller.ready.is_set()
    api.put_slice(endpoint_slice("web", [endpoint("p2")]))
    eventually(lambda: reached(node, tries=10) == {"p2"})
    api.discovery.delete_namespaced_endpoint_slice("web-8080", "default")
    eventually(lambda: _outcome(node) == "refused")
    api.core.delete_namespaced_service("web", "default")
    kernel = controller.proxier.backends[0]
    eventually(lambda: _outcome(node) == "silent" and not kernel.kernel_view().entries)


def test_show_reports_in_sync_and_calls_out_kernel_drift(
    api: Api, node: Node, controller: ProxyController, tmp_path
) -> None:
    api.core.create_namespaced_service("default", service())
    api.core.create_namespaced_service("default", service("empty", cluster_ip="10.96.0.20"))
    api.put_slice(endpoint_slice("web", [endpoint("p0")]))
    eventually(lambda: reached(node, tries=3) == {"p0"})
    runner = CliRunner()
    args = ["show", "--state-dir", str(tmp_path), "--netns", node.ns]
    eventually(lambda: "default/empty" in runner.invoke(proxy_group, args).output)
    result = runner.invoke(proxy_group, args)
    assert result.exit_code == 0 and "in sync" in result.output
    assert "default/web:http" in result.output
    assert "default/empty:http" in result.output and "rejected" in result.output

    _remove_service_entry(node)
    result = runner.invoke(proxy_group, args)
    assert result.exit_code == 1
    assert "DIFFERS: missing in kernel: 10.244.0.10:8080" in result.output


def test_a_burst_of_changes_is_coalesced_into_few_syncs(
    api: Api, node: Node, controller: ProxyController
) -> None:
    eventually(controller.ready.is_set)
    runs_before = controller._loop.runs
    for i in range(40):
        api.core.create_namespaced_service("default", service(f"s{i}", cluster_ip=f"10.96.1.{i + 1}"))
    api.core.create_namespaced_service("default", service())
    api.put_slice(endpoint_slice("web", [endpoint("p1")]))
    eventually(lambda: reached(node, tries=3) == {"p1"})
    assert controller._loop.runs - runs_before < 20  # 42 changes, at most one sync per 0.2 s


def test_malformed_service_is_logged_and_skipped_while_others_sync(
    api: Api, node: Node, controller: ProxyController, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="netagent.proxy.snapshot_builder")
    store_past_validation(api, "services", service("bad", cluster_ip="10.96.0.20", externalIPs=["not-an-ip"]))
    api.core.create_namespaced_service("default", service())
    api.put_slice(endpoint_slice("web", [endpoint("p0")]))
    eventually(lambda: reached(node, tries=3) == {"p0"})
    assert any("default/bad" in r.getMessage() for r in caplog.records)


def test_a_restarted_controller_that_cannot_list_keeps_the_rules(
    api: Api, node: Node, controller: ProxyController
) -> None:
    api.core.create_namespaced_service("default", service())
    api.put_slice(endpoint_slice("web", [endpoint("p0")]))
    eventually(lambda: reached(node, tries=3) == {"p0"})
    controller.stop()
    api.server.stop()  # the agent comes back while the API server is unreachable
    again = ProxyController(api.client, controller.config, families=(4,), netns=node.ns)
    again.start()
    try:
        for _ in range(10):
            assert tcp_ask(node.client, VIP, 80).pod == "p0"
        assert not again.ready.is_set()
    finally:
        again.stop()


def _outcome(node: Node) -> str:
    """The pod that answered, "refused", or "silent" when nothing answers (an unknown VIP)."""
    try:
        return tcp_ask(node.client, VIP, 80, timeout=1).pod
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "silent"


def _remove_service_entry(node: Node) -> None:
    """Simulate drift: someone deletes the service's entry point from the kernel behind our back."""
    if node.proxier.backends[0].kind == "nftables":
        argv = ["nft", "delete", "element", "ip", "netagent", "service-ips", "{", f"{VIP} . tcp . 80", "}"]
    else:
        iptables = node.proxier.backends[0].kind  # iptables or iptables-legacy
        rules = netns.run(node.ns, [f"{iptables}-save", "-t", "nat"]).stdout.splitlines()
        rule = next(r for r in rules if r.startswith("-A NA-SERVICES") and VIP in r)
        argv = [iptables, "-t", "nat", "-D", *shlex.split(rule)[1:]]
    netns.run(node.ns, argv)


def store_past_validation(api: Api, resource: str, body: dict) -> None:
    """Put an object into the API server's storage as a server that accepted it would hold it (the
    lab's stand-in took these; a newer API server may serve fields this client cannot model)."""
    with api.server.store.lock:
        api.server.store.create(resource, {**body, "metadata": {"namespace": "default", **body["metadata"]}})


def malformed_objects() -> list[tuple[str, dict]]:
    """One of each kind that froze every agent's watch when decoded as the client's models."""
    no_address_type = endpoint_slice("web", [endpoint("p2")], name="web-no-type")
    del no_address_type["addressType"]
    foreign_port_zero = endpoint_slice("web", [endpoint("p2")], port=0, name="web-foreign")
    bad_address = endpoint_slice("web", [endpoint("p2")], name="web-bad-address")
    bad_address["endpoints"][0]["addresses"] = [5]
    bad_ready = endpoint_slice("web", [endpoint("p2")], name="web-bad-ready")
    bad_ready["endpoints"][0]["conditions"]["ready"] = "yes"
    port_name = service("bad-port-name", cluster_ip="10.96.0.21")
    port_name["spec"]["ports"][0]["name"] = 5
    affinity = service("bad-affinity", cluster_ip="10.96.0.22", sessionAffinity="ClientIP",
                       sessionAffinityConfig=5)
    deleting = service("bad-timestamp", cluster_ip="10.96.0.23")
    deleting["metadata"]["deletionTimestamp"] = "garbage"
    return [
        ("endpointslices", no_address_type), ("endpointslices", foreign_port_zero),
        ("endpointslices", bad_address), ("endpointslices", bad_ready),
        ("services", port_name), ("services", service("bad-external", cluster_ip="10.96.0.24",
                                                      externalIPs=["x"])),
        ("services", affinity), ("services", deleting),
    ]


def test_malformed_objects_leave_every_other_object_syncing(
    api: Api, node: Node, controller: ProxyController, tmp_path
) -> None:
    """Each bad object is left out alone (a bad slice labelled `web` does not take `web` down), and
    changes after them still reach the kernel."""
    api.core.create_namespaced_service("default", service())
    api.put_slice(endpoint_slice("web", [endpoint("p0")]))
    eventually(lambda: reached(node, tries=3) == {"p0"})
    for resource, body in malformed_objects():
        store_past_validation(api, resource, body)
    api.put_slice(endpoint_slice("web", [endpoint("p0"), endpoint("p1")]))  # a change after them
    eventually(lambda: reached(node, tries=20) == {"p0", "p1"})
    result = CliRunner().invoke(proxy_group, ["show", "--state-dir", str(tmp_path), "--netns", node.ns])
    skipped = [line for line in result.output.splitlines() if "skipped (malformed)" in line]
    for name in ("web-no-type", "web-foreign", "web-bad-address", "web-bad-ready", "bad-port-name",
                 "bad-external", "bad-affinity"):
        assert any(f"default/{name}" in line for line in skipped), (name, result.output)
    assert result.exit_code == 0 and "in sync" in result.output
