"""A real container runtime drives the CNI plugin: containerd 1.6's `ctr run --cni`.

containerd, its shims and ctr run confined to a netns standing in for the node (see
netns_lab.containerd_node); the image is busybox, built locally as an OCI tarball and imported.
Each container runs busybox httpd, so reachability is proven with real TCP (an HTTP GET) and ICMP (ping)
from inside another container.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from netns_lab import oci_image
from netns_lab.containerd_node import ContainerdNode, Pod, wait_until

from netagent import nodestate

pytestmark = pytest.mark.skipif(
    not (shutil.which("containerd") and shutil.which("ctr") and shutil.which("runc")),
    reason="containerd, ctr and runc are installed by ./bootstrap",
)

REFERENCE_PLUGINS = "/usr/lib/cni"
NETAGENT_PLUGIN = os.path.join(os.path.dirname(sys.executable), "netagent-cni")
POD_CIDR = "10.88.1.0/24"
CLUSTER_CIDR = "10.88.0.0/16"
WEB_SERVER = ["httpd", "-f", "-p", "80", "-h", "/etc"]  # serves the image's /etc/passwd


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> oci_image.BuiltImage:
    return oci_image.build(str(tmp_path_factory.mktemp("image") / "busybox.tar"))


@pytest.fixture
def node(make_netns, busybox_image: oci_image.BuiltImage) -> Iterator[ContainerdNode]:
    with ContainerdNode(make_netns("node")) as containerd:
        containerd.import_image(busybox_image.path)
        yield containerd


def host_veths(node_netns: str) -> list[str]:
    listing = subprocess.run(
        ["ip", "-n", node_netns, "-j", "link", "show", "type", "veth"], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    return [link["ifname"] for link in json.loads(listing.stdout or "[]")]


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
    for plugin in ("bridge", "host-local"):
        os.symlink(os.path.join(REFERENCE_PLUGINS, plugin), os.path.join(node.bin_dir, plugin))
    ipam_dir = node.path("host-local")
    conflist = {
        "cniVersion": "1.0.0",
        "name": "reference",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni-ref0",
                "isGateway": True,
                "ipam": {"type": "host-local", "subnet": "10.77.0.0/24", "dataDir": ipam_dir},
            }
        ],
    }
    with open(os.path.join(node.conf_dir, "10-reference.conflist"), "w") as f:
        json.dump(conflist, f)

    server = node.run_pod(busybox_image.ref, "server", WEB_SERVER)
    client = node.run_pod(busybox_image.ref, "client", WEB_SERVER)
    (server_cidr,) = server.ipv4_addresses()
    server_ip = server_cidr.split("/")[0]
    assert ipaddress.ip_interface(server_cidr).network == ipaddress.ip_network("10.77.0.0/24")
    assert_reaches(client, "10.77.0.1")
    assert_reaches(client, server_ip)
    assert_serves_http(client, server_ip)

    node.remove_pod(server)
    assert not os.path.exists(os.path.join(ipam_dir, "reference", server_ip))
    # ctr calls DEL after the task's netns is gone, so bridge leaves the host veth to the kernel,
    # which destroys it with the netns, asynchronously
    wait_until(lambda: len(host_veths(node.node_netns)) == 1, 60, "the server's host veth to go")


def install_netagent(node: ContainerdNode) -> tuple[str, str]:
    """netagent as the node's only network, pod CIDR from the agent's node state file.

    Returns (network name, IPAM data dir).
    """
    state_file, data_dir = node.path("netagent", "node.json"), node.path("netagent", "ipam")
    nodestate.write(nodestate.NodeState("node-1", (POD_CIDR,), 1500, (CLUSTER_CIDR,)), state_file)
    os.symlink(NETAGENT_PLUGIN, os.path.join(node.bin_dir, "netagent"))
    os.symlink(os.path.join(REFERENCE_PLUGINS, "portmap"), os.path.join(node.bin_dir, "portmap"))
    conflist = {
        "cniVersion": "1.0.0",
        "name": "netagent",
        "plugins": [
            {"type": "netagent", "nodeStateFile": state_file, "ipam": {"dataDir": data_dir}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    with open(os.path.join(node.conf_dir, "10-netagent.conflist"), "w") as f:
        json.dump(conflist, f)
    return conflist["name"], data_dir


def test_ctr_run_cni_container_gets_its_ip_from_netagent_reaches_pods_and_releases_it_on_removal(
    node: ContainerdNode, busybox_image: oci_image.BuiltImage
) -> None:
    network, data_dir = install_netagent(node)
    allocations = os.path.join(data_dir, network)

    server = node.run_pod(busybox_image.ref, "server", WEB_SERVER)
    client = node.run_pod(busybox_image.ref, "client", WEB_SERVER)
    (server_cidr,) = server.ipv4_addresses()
    server_ip = server_cidr.split("/")[0]
    assert ipaddress.ip_interface(server_cidr).network == ipaddress.ip_network(POD_CIDR)
    with open(os.path.join(allocations, server_ip)) as f:
        # ctr names the CNI attachment "<containerd namespace>-<container id>"
        assert f.read().split() == ["default-server", "eth0"]
    assert len(host_veths(node.node_netns)) == 2

    gateway = str(next(ipaddress.ip_network(POD_CIDR).hosts()))
    assert_reaches(client, gateway)
    assert_reaches(client, server_ip)
    assert_serves_http(client, server_ip)

    node.remove_pod(server)
    assert not os.path.exists(os.path.join(allocations, server_ip))
    assert len(host_veths(node.node_netns)) == 1  # only the client's is left
    (client_cidr,) = client.ipv4_addresses()
    assert os.path.exists(os.path.join(allocations, client_cidr.split("/")[0]))
