"""A real container runtime drives the CNI plugin: containerd 1.6's `ctr run --cni`.

containerd, its shims and ctr run confined to a netns standing in for the node (see
netns_lab.containerd.node); the image is busybox, built locally as an OCI tarball and imported.
Each container runs busybox httpd, so reachability is proven with real TCP (an HTTP GET) and ICMP
(ping) from inside another container.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from netns_lab.containerd import oci_image
from netns_lab.containerd.networks import (
    REFERENCE_NETWORK,
    REFERENCE_SUBNET,
    install_netagent,
    install_reference,
    standalone_agent,
)
from netns_lab.containerd.node import ContainerdError, ContainerdNode, Pod, wait_until

from nodekit import nodestate

pytestmark = pytest.mark.skipif(
    not (shutil.which("containerd") and shutil.which("ctr") and shutil.which("runc")),
    reason="containerd, ctr and runc are installed by ./bootstrap",
)

POD_CIDR = "10.88.1.0/24"
CLUSTER_CIDR = "10.88.0.0/16"
WEB_SERVER = ["httpd", "-f", "-p", "80", "-h", "/etc"]  # serves the image's /etc/passwd


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> oci_image.BuiltImage:
    return oci_image.build(str(tmp_path_factory.mktemp("image") / "busybox.tar"))


@pytest.fixture
def node_netns(make_netns) -> str:
    return make_netns("node")


@pytest.fixture
def node(node_netns: str, busybox_image: oci_image.BuiltImage) -> Iterator[ContainerdNode]:
    with ContainerdNode(node_netns) as containerd:
        containerd.import_image(busybox_image.path)
        yield containerd


@dataclass(frozen=True)
class NetagentSetup:
    """Where netagent keeps its node state and allocations on this node, and how the plugin runs."""

    state_dir: str
    data_dir: str
    fallback: str | None  # None: install-cni's default, the Python plugin

    def install(self, node: ContainerdNode) -> str:
        return install_netagent(
            node.bin_dir, node.conf_dir, self.state_dir, self.data_dir, CLUSTER_CIDR, self.fallback
        )


@pytest.fixture(params=["plugin-alone", "agent-running"])
def netagent_on_node(request, prefix: str, node_netns: str, tmp_path) -> Iterator[NetagentSetup]:
    """netagent's node side, in two modes.

    plugin-alone: no agent; the node state file is written here and the shim falls back to the
    Python plugin. agent-running: `netagent run --standalone` serves the shim in the node netns, and
    the fallback is /bin/false, so any successful ADD/DEL was done by the agent. Its state dir (socket,
    node.json) is under /run as on a real node, which the plugins must see from inside containerd's
    private mount namespace.
    Request this fixture before `node`, so the agent outlives the containers it serves.
    """
    data_dir = str(tmp_path / "ipam")
    if request.param == "plugin-alone":
        state_dir = str(tmp_path / "state")
        state = nodestate.NodeState("node-1", (POD_CIDR,), 1500, (CLUSTER_CIDR,))
        nodestate.write(state, os.path.join(state_dir, "node.json"))
        yield NetagentSetup(state_dir, data_dir, fallback=None)
        return
    state_dir = os.path.join("/run", f"{prefix}-netagent")
    try:
        with standalone_agent(node_netns, state_dir, POD_CIDR, CLUSTER_CIDR, str(tmp_path / "agent.log")):
            yield NetagentSetup(state_dir, data_dir, fallback="/bin/false")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def host_veths(node_netns: str) -> list[str]:
    listing = subprocess.run(
        ["ip", "-n", node_netns, "-j", "link", "show", "type", "veth"], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    return [link["ifname"] for link in json.loads(listing.stdout or "[]")]


def allocated_ips(allocations_dir: str) -> list[str]:
    """The addresses netagent's IPAM holds (one file per address) in a network's data dir."""
    if not os.path.isdir(allocations_dir):
        return []
    names = os.listdir(allocations_dir)
    return sorted(n for n in names if n.replace(".", "").isdigit() or ":" in n)


def ipv4_of(pod: Pod) -> str:
    (cidr,) = pod.ipv4_addresses()
    return cidr.split("/")[0]


def assert_reaches(client: Pod, address: str) -> None:
    ping = client.exec(["ping", "-c", "1", "-W", "10", address])
    assert ping.returncode == 0, f"{client.name} cannot ping {address}: {ping.stdout}{ping.stderr}"


def assert_serves_http(client: Pod, address: str) -> None:
    # busybox nc rather than wget: this busybox's `wget -T` (timeout) crashes
    request = f"printf 'GET /passwd HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {address} 80"
    fetch = client.exec(["sh", "-c", request])
    assert fetch.returncode == 0 and "root:x:0:0" in fetch.stdout, (
        f"{client.name} cannot fetch from {address}: {fetch.stdout}{fetch.stderr}"
    )


def test_ctr_run_cni_with_reference_bridge_plugin_connects_pods_and_releases_ips(
    node: ContainerdNode, busybox_image: oci_image.BuiltImage
) -> None:
    """Baseline for the harness itself: Debian's bridge + host-local, exactly as ctr drives any plugin."""
    ipam_dir = install_reference(node)

    server = node.run_pod(busybox_image.ref, "server", WEB_SERVER)
    client = node.run_pod(busybox_image.ref, "client", WEB_SERVER)
    server_ip = ipv4_of(server)
    assert ipaddress.ip_address(server_ip) in ipaddress.ip_network(REFERENCE_SUBNET)
    assert_reaches(client, str(next(ipaddress.ip_network(REFERENCE_SUBNET).hosts())))
    assert_reaches(client, server_ip)
    assert_serves_http(client, server_ip)

    node.remove_pod(server)
    assert not os.path.exists(os.path.join(ipam_dir, REFERENCE_NETWORK, server_ip))
    # ctr calls DEL after the task's netns is gone, so bridge leaves the host veth to the kernel,
    # which destroys it with the netns, asynchronously
    wait_until(lambda: len(host_veths(node.node_netns)) == 1, 60, "the server's host veth to go")


def test_ctr_run_cni_container_gets_its_ip_from_netagent_reaches_pods_and_releases_it_on_removal(
    netagent_on_node: NetagentSetup, node: ContainerdNode, busybox_image: oci_image.BuiltImage
) -> None:
    network = netagent_on_node.install(node)
    allocations = os.path.join(netagent_on_node.data_dir, network)

    server = node.run_pod(busybox_image.ref, "server", WEB_SERVER)
    client = node.run_pod(busybox_image.ref, "client", WEB_SERVER)
    server_ip = ipv4_of(server)
    assert ipaddress.ip_address(server_ip) in ipaddress.ip_network(POD_CIDR)
    with open(os.path.join(allocations, server_ip)) as f:
        # ctr names the CNI attachment "<containerd namespace>-<container id>"
        assert f.read().split() == ["default-server", "eth0"]
    assert len(host_veths(node.node_netns)) == 2

    gateway = str(next(ipaddress.ip_network(POD_CIDR).hosts()))
    assert_reaches(client, gateway)
    assert_reaches(client, server_ip)
    assert_serves_http(client, server_ip)

    node.remove_pod(server)
    assert allocated_ips(allocations) == [ipv4_of(client)]
    assert len(host_veths(node.node_netns)) == 1  # netagent's DEL removed the server's; the client's stays


def test_ctr_run_cni_reports_netagents_error_when_node_state_is_missing_and_leaves_nothing_behind(
    node: ContainerdNode, busybox_image: oci_image.BuiltImage, tmp_path
) -> None:
    no_agent = NetagentSetup(str(tmp_path / "no-agent"), str(tmp_path / "ipam"), fallback=None)
    network = no_agent.install(node)

    expected = r'plugin type="netagent" failed \(add\): node state .* does not exist'
    with pytest.raises(ContainerdError, match=expected):
        node.run_pod(busybox_image.ref, "orphan", WEB_SERVER)

    assert node.tasks() == {}
    assert node.ctr(["container", "list", "--quiet"]).stdout.split() == []
    assert host_veths(node.node_netns) == []
    assert allocated_ips(os.path.join(no_agent.data_dir, network)) == []


def test_closing_a_node_stops_containers_and_containerd_and_leaves_no_trace_on_the_host(
    node_netns: str, busybox_image: oci_image.BuiltImage
) -> None:
    fixed_paths = ("/etc/cni", "/opt/cni", "/var/lib/cni", "/run/containerd", "/var/lib/containerd")
    host_before = {p: os.path.exists(p) for p in fixed_paths}
    with ContainerdNode(node_netns) as node:
        node.import_image(busybox_image.path)
        ipam_dir = install_reference(node)
        pod = node.run_pod(busybox_image.ref, "left-running", WEB_SERVER)
        assert os.listdir(os.path.join(ipam_dir, REFERENCE_NETWORK))
    # closed with the pod still running, as when a test fails half-way

    def process_gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    assert process_gone(pod.pid)
    assert all(process_gone(p) for p in (node.daemon.pid, node.holder.pid))
    assert not os.path.exists(node.workdir)
    assert glob.glob(f"/sys/fs/cgroup/*/{node.cgroup_parent}") == []
    assert {p: os.path.exists(p) for p in fixed_paths} == host_before
    wait_until(lambda: host_veths(node_netns) == [], 60, "the pod's host veth to go with its netns")
