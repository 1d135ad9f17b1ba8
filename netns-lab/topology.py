"""The lab's wires: an underlay bridge in its own netns and one veth per node into it.

Everything is created inside the lab's namespaces (`ip -n NS ...`, veth peers created straight into
the node netns), never in the host's root namespace. One `ip -batch` per namespace keeps the number
of processes small, which is most of what `lab up` costs.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Mapping, Sequence

from netns_lab.state import LabError

from nodekit import netns

UNDERLAY = ipaddress.ip_network("172.18.0.0/24")
UNDERLAY_GATEWAY = str(UNDERLAY.network_address + 1)  # the bridge; the API server listens here
UNDERLAY_BRIDGE = "br0"
NODE_IFACE = "eth0"
MAX_NODES = 50


def node_ip(index: int) -> str:
    return str(UNDERLAY.network_address + 10 + index)


def ip_batch(netns_name: str, commands: Sequence[str]) -> None:
    """Run `ip` commands (no shell involved) inside one netns; a failure names the command."""
    proc = subprocess.run(
        ["ip", "-n", netns_name, "-batch", "-"], input="\n".join(commands) + "\n",
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise LabError(f"ip -n {netns_name}: {proc.stderr.strip()}")


def set_sysctls(netns_name: str, values: Mapping[str, str]) -> None:
    """Write per-netns sysctls (net.*) from inside that netns: /proc/sys/net follows the caller."""
    with netns.entered(netns.path(netns_name)):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)


def create_underlay(netns_name: str) -> None:
    netns.create(netns_name)
    prefix = UNDERLAY.prefixlen
    ip_batch(netns_name, [
        f"link add {UNDERLAY_BRIDGE} type bridge",
        f"addr add {UNDERLAY_GATEWAY}/{prefix} dev {UNDERLAY_BRIDGE}",
        f"link set {UNDERLAY_BRIDGE} up",
    ])
    # The underlay is a plain switch: bridged frames need not traverse this netns' (empty) iptables.
    set_sysctls(netns_name, {
        "net.bridge.bridge-nf-call-iptables": "0",
        "net.bridge.bridge-nf-call-ip6tables": "0",
        "net.bridge.bridge-nf-call-arptables": "0",
    })


def attach_node(underlay_netns: str, node_netns: str, port_name: str, address: str,
                service_cidr: str) -> None:
    """Create node_netns and wire its eth0 (holding `address`) to the underlay bridge."""
    netns.create(node_netns)
    ip_batch(underlay_netns, [
        f"link add {port_name} type veth peer name {NODE_IFACE} netns {node_netns}",
        f"link set {port_name} master {UNDERLAY_BRIDGE} up",
    ])
    # A node's own connections to a ClusterIP need a route before the proxy's DNAT applies; a real
    # node's default route does that. The lab routes only the service CIDR: the underlay has no
    # upstream, and a default route into it would turn every DNS lookup (e.g. the reverse lookup
    # Python's HTTPServer does on bind) into a resolver timeout instead of an immediate failure.
    ip_batch(node_netns, [
        f"addr add {address}/{UNDERLAY.prefixlen} dev {NODE_IFACE}",
        f"link set {NODE_IFACE} up",
        f"route add {service_cidr} via {UNDERLAY_GATEWAY} dev {NODE_IFACE}",
    ])
    # A node routes for its pods, as on any Kubernetes node.
    set_sysctls(node_netns, {"net.ipv4.ip_forward": "1"})
