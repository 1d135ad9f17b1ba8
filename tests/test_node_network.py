"""Node networking without an API server: three node netns on one underlay bridge, a pod netns
behind each node's bridge, and netagent's vxlan/routes reconcilers run in-process inside each node
netns. Behaviour is proven with real TCP and UDP between pods on different nodes."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute

from netagent.node_network import (
    ROUTE_PROTOCOL,
    PeerNode,
    RoutedNetwork,
    VxlanNetwork,
    find_underlay,
)
from nodekit import netns


@dataclass
class Node:
    name: str
    ns: str
    pod_ns: str
    node_ip: str
    pod_cidr: str
    pod_ip: str
    pod_cidr6: str
    pod_ip6: str

    def peer(self, vtep_mac: str | None = None, dual_stack: bool = False) -> PeerNode:
        cidrs = (self.pod_cidr, self.pod_cidr6) if dual_stack else (self.pod_cidr,)
        return PeerNode(self.name, self.node_ip, cidrs, vtep_mac)


def ns_run(ns: str, *argv: str) -> str:
    done = netns.run(ns, list(argv), check=False)
    assert done.returncode == 0, f"{' '.join(argv)} in {ns}: {done.stderr}"
    return done.stdout


def build_cluster(make_netns: Callable[[str], str], prefix: str, node_ips: list[str]) -> list[Node]:
    """Underlay bridge netns + one node netns per IP (veth eth0 on the bridge) + one pod per node.
    Pods are dual-stack (10.244.i.10/24 and fd00:10:244:i::10/64); the node routes only what it is given."""
    underlay = make_netns("ul")
    ns_run(underlay, "ip", "link", "add", "br0", "type", "bridge")
    ns_run(underlay, "ip", "link", "set", "br0", "up")
    nodes = []
    for i, node_ip in enumerate(node_ips, start=1):
        node_ns, pod_ns = make_netns(f"n{i}"), make_netns(f"p{i}")
        uplink = f"{prefix}u{i}"
        ns_run(underlay, "ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0",
               "netns", node_ns)
        ns_run(underlay, "ip", "link", "set", uplink, "master", "br0", "up")
        ns_run(node_ns, "ip", "addr", "add", node_ip, "dev", "eth0")
        ns_run(node_ns, "ip", "link", "set", "eth0", "up")
        pod_cidr, gateway, pod_ip = f"10.244.{i}.0/24", f"10.244.{i}.1", f"10.244.{i}.10"
        ns_run(node_ns, "ip", "link", "add", "cni0", "type", "bridge")
        ns_run(node_ns, "ip", "addr", "add", f"{gateway}/24", "dev", "cni0")
        ns_run(node_ns, "ip", "link", "set", "cni0", "up")
        ns_run(node_ns, "ip", "link", "add", "vpod", "mtu", "1450", "type", "veth",
               "peer", "name", "eth0", "netns", pod_ns)
        ns_run(node_ns, "ip", "link", "set", "vpod", "master", "cni0", "up")
        ns_run(pod_ns, "ip", "link", "set", "eth0", "mtu", "1450")
        ns_run(pod_ns, "ip", "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        ns_run(pod_ns, "ip", "link", "set", "eth0", "up")
        ns_run(pod_ns, "ip", "route", "add", "default", "via", gateway)
        pod_cidr6, gateway6, pod_ip6 = f"fd00:10:244:{i}::/64", f"fd00:10:244:{i}::1", f"fd00:10:244:{i}::10"
        ns_run(node_ns, "ip", "addr", "add", f"{gateway6}/64", "dev", "cni0", "nodad")
        ns_run(pod_ns, "ip", "addr", "add", f"{pod_ip6}/64", "dev", "eth0", "nodad")
        ns_run(pod_ns, "ip", "-6", "route", "add", "default", "via", gateway6)
        nodes.append(Node(f"node{i}", node_ns, pod_ns, node_ip.split("/")[0], pod_cidr, pod_ip, pod_cidr6,
                          pod_ip6))
    return nodes


def open_iproute(ns: str) -> IPRoute:
    """A netlink socket bound to the node netns (sockets keep the netns they were created in)."""
    with netns.entered(netns.path(ns)):
        return IPRoute()


@contextlib.contextmanager
def vxlan_networks(nodes: list[Node]) -> Iterator[list[VxlanNetwork]]:
    sockets = [open_iproute(n.ns) for n in nodes]
    networks = []
    try:
        for node, ipr in zip(nodes, sockets, strict=True):
            with netns.entered(netns.path(node.ns)):
                network = VxlanNetwork(ipr, find_underlay(ipr, "eth0"))
                network.setup([node.pod_cidr])
            networks.append(network)
        yield networks
    finally:
        for ipr in sockets:
            ipr.close()


@contextlib.contextmanager
def routed_networks(nodes: list[Node]) -> Iterator[list[RoutedNetwork]]:
    """A routes-mode agent's network on each node, set up, their netlink sockets closed after."""
    sockets = [open_iproute(n.ns) for n in nodes]
    networks = []
    try:
        for node, ipr in zip(nodes, sockets, strict=True):
            with netns.entered(netns.path(node.ns)):
                network = RoutedNetwork(ipr, find_underlay(ipr, "eth0"))
                network.setup()
            networks.append(network)
        yield networks
    finally:
        for ipr in sockets:
            ipr.close()


def routed_peers(nodes: list[Node], me: int) -> list[PeerNode]:
    return [n.peer() for i, n in enumerate(nodes) if i != me]


def vxlan_peers(nodes: list[Node], networks: list[VxlanNetwork], me: int) -> list[PeerNode]:
    return [n.peer(net.vtep_mac) for i, (n, net) in enumerate(zip(nodes, networks, strict=True)) if i != me]


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def tcp_exchange(client_ns: str, server_ns: str, server_ip: str, port: int = 5001) -> bytes:
    """Connect from one pod to another and return what the server echoed back."""
    with netns.entered(netns.path(server_ns)):
        listener = socket.create_server((server_ip, port), family=_family(server_ip))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(100).upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with netns.entered(netns.path(client_ns)):
            client = socket.create_connection((server_ip, port), timeout=10)
        with client:
            client.sendall(b"hello over tcp")
            client.settimeout(10)
            return client.recv(100)
    finally:
        listener.close()
        thread.join(10)


def udp_exchange(client_ns: str, server_ns: str, server_ip: str, port: int = 5002) -> bytes:
    with netns.entered(netns.path(server_ns)):
        server = socket.socket(_family(server_ip), socket.SOCK_DGRAM)
    with netns.entered(netns.path(client_ns)):
        client = socket.socket(_family(server_ip), socket.SOCK_DGRAM)
    with server, client:
        server.bind((server_ip, port))
        server.settimeout(10)
        client.settimeout(10)
        client.sendto(b"hello over udp", (server_ip, port))
        data, source = server.recvfrom(100)
        server.sendto(data.upper(), source)
        return client.recv(100)


def reachable(client: Node, server: Node) -> bool:
    try:
        return tcp_exchange(client.pod_ns, server.pod_ns, server.pod_ip) == b"HELLO OVER TCP"
    except OSError:
        return False


def kernel_dump(ns: str) -> str:
    """Everything netagent may own in a node netns, with ifindexes (a recreated entry would differ).
    Operational state (UNKNOWN -> UP as links settle) is not ours and is left out, and so are IPv6
    link-local addressing and multicast group memberships (fdb entries for group MACs), which the
    kernel finishes (DAD, MLD joins) on its own schedule."""
    dump = "\n".join([
        ns_run(ns, "ip", "link", "show"),
        ns_run(ns, "ip", "-d", "link", "show", "type", "vxlan"),
        ns_run(ns, "ip", "-o", "addr", "show"),
        ns_run(ns, "ip", "route", "show", "table", "all"),
        ns_run(ns, "ip", "neigh", "show", "nud", "permanent"),
        ns_run(ns, "bridge", "fdb", "show"),
    ])
    return "\n".join(line for line in re.sub(r" state [A-Z]+", "", dump).splitlines()
                     if "fe80" not in line and not is_multicast_fdb_entry(line))


def is_multicast_fdb_entry(line: str) -> bool:
    """A `bridge fdb` line for a group MAC (the low bit of the first octet set): kernel-joined, not ours."""
    first = line.split(" ", 1)[0]
    return re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", first) is not None and int(first[:2], 16) & 1 == 1


class NetlinkMonitor:
    """Records the link/address/route/neighbour changes to what netagent owns (its VXLAN device and
    anything on it, routes with its protocol) notified inside a netns within the `with` block. Marker
    routes on lo bracket the window, so no sleep is needed to know it is listening. Other changes
    (ARP entries of pods refreshing as traffic flows) are the kernel's business and not recorded."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(netns.exec_argv(ns, ["ip", "-o", "monitor", "link", "address", "route",
                                                          "neigh"]), stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def _mark(self, marker: str) -> None:
        ns_run(self.ns, "ip", "route", "add", f"{marker}/32", "dev", "lo")
        ns_run(self.ns, "ip", "route", "del", f"{marker}/32", "dev", "lo")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if marker in line and line.startswith("Deleted"):
                return
            if marker not in line and ("netagent." in line or f"proto {ROUTE_PROTOCOL}" in line):
                self.lines.append(line.strip())
        raise AssertionError("netlink monitor never saw its marker")

    def __enter__(self) -> NetlinkMonitor:
        self._mark("203.0.113.1")
        self.lines.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._mark("203.0.113.2")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


def test_vxlan_mode_carries_pod_to_pod_tcp_and_udp_across_nodes(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24", "192.168.77.3/24"])
    with vxlan_networks(nodes) as networks:
        for i, network in enumerate(networks):
            report = network.program_peers(vxlan_peers(nodes, networks, i))
            assert report.errors == {}
            assert report.added == 6  # 2 peers x (fdb + neighbour + route)

        for client in nodes:
            for server in nodes:
                if client is not server:
                    assert tcp_exchange(client.pod_ns, server.pod_ns, server.pod_ip) == b"HELLO OVER TCP"
                    assert udp_exchange(client.pod_ns, server.pod_ns, server.pod_ip) == b"HELLO OVER UDP"

        link = ns_run(nodes[0].ns, "ip", "-d", "link", "show", "netagent.1")
        assert "vxlan id 1" in link and "dstport 4789" in link and "nolearning" in link
        assert "mtu 1450" in link
        assert ns_run(nodes[0].ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"


def test_vxlan_mode_carries_dual_stack_pod_traffic_over_one_ipv4_underlay(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24"])
    sockets = [open_iproute(n.ns) for n in nodes]
    try:
        networks = []
        for node, ipr in zip(nodes, sockets, strict=True):
            with netns.entered(netns.path(node.ns)):
                network = VxlanNetwork(ipr, find_underlay(ipr, "eth0"))
                network.setup([node.pod_cidr, node.pod_cidr6])
            networks.append(network)
        for i, network in enumerate(networks):
            other = nodes[1 - i]
            report = network.program_peers([other.peer(networks[1 - i].vtep_mac, dual_stack=True)])
            assert (report.added, report.errors) == (5, {})  # fdb + 2 neighbours + 2 routes

        assert tcp_exchange(nodes[0].pod_ns, nodes[1].pod_ns, nodes[1].pod_ip6) == b"HELLO OVER TCP"
        assert udp_exchange(nodes[1].pod_ns, nodes[0].pod_ns, nodes[0].pod_ip6) == b"HELLO OVER UDP"
        assert tcp_exchange(nodes[0].pod_ns, nodes[1].pod_ns, nodes[1].pod_ip) == b"HELLO OVER TCP"
    finally:
        for ipr in sockets:
            ipr.close()


def test_vxlan_node_removal_removes_exactly_its_entries(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24", "192.168.77.3/24"])
    with vxlan_networks(nodes) as networks:
        for i, network in enumerate(networks):
            network.program_peers(vxlan_peers(nodes, networks, i))
        before = ns_run(nodes[0].ns, "ip", "route", "show", "proto", str(ROUTE_PROTOCOL))

        report = networks[0].program_peers([nodes[1].peer(networks[1].vtep_mac)])  # node3 left the cluster

        assert (report.removed, report.added, report.changed) == (3, 0, 0)
        after = ns_run(nodes[0].ns, "ip", "route", "show", "proto", str(ROUTE_PROTOCOL))
        assert "10.244.3.0/24" in before and "10.244.3.0/24" not in after
        assert "10.244.2.0/24" in after
        assert networks[2].vtep_mac not in ns_run(nodes[0].ns, "bridge", "fdb", "show", "dev", "netagent.1")
        assert "10.244.3.0" not in ns_run(nodes[0].ns, "ip", "neigh", "show", "dev", "netagent.1")
        assert reachable(nodes[0], nodes[1])
        assert not reachable(nodes[0], nodes[2])


def test_vxlan_restart_reconcile_on_correct_state_changes_nothing(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24"])
    with vxlan_networks(nodes) as networks:
        for i, network in enumerate(networks):
            network.program_peers(vxlan_peers(nodes, networks, i))
    before = kernel_dump(nodes[0].ns)

    with NetlinkMonitor(nodes[0].ns) as monitor, vxlan_networks(nodes) as restarted:  # a new agent
        report = restarted[0].program_peers(vxlan_peers(nodes, restarted, 0))

    assert monitor.lines == []
    assert (report.added, report.changed, report.removed, report.errors) == (0, 0, 0, {})
    assert kernel_dump(nodes[0].ns) == before
    assert reachable(nodes[0], nodes[1])


def test_vxlan_changed_node_ip_changes_only_that_nodes_fdb_entry(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24", "192.168.77.3/24"])
    with vxlan_networks(nodes) as networks:
        for i, network in enumerate(networks):
            network.program_peers(vxlan_peers(nodes, networks, i))
        moved = PeerNode("node3", "192.168.77.33", ("10.244.3.0/24",), networks[2].vtep_mac)

        with NetlinkMonitor(nodes[0].ns) as monitor:
            report = networks[0].program_peers([nodes[1].peer(networks[1].vtep_mac), moved])

        assert (report.added, report.changed, report.removed) == (0, 1, 0)
        assert len(monitor.lines) == 1 and "192.168.77.33" in monitor.lines[0]
        assert reachable(nodes[0], nodes[1])


def test_routes_mode_carries_pod_to_pod_tcp_and_udp_across_nodes(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24"])
    with routed_networks(nodes) as networks:
        for i, network in enumerate(networks):
            report = network.program_peers(routed_peers(nodes, i))
            assert (report.added, report.errors) == (1, {})
        assert tcp_exchange(nodes[0].pod_ns, nodes[1].pod_ns, nodes[1].pod_ip) == b"HELLO OVER TCP"
        assert udp_exchange(nodes[1].pod_ns, nodes[0].pod_ns, nodes[0].pod_ip) == b"HELLO OVER UDP"
        route = ns_run(nodes[0].ns, "ip", "route", "show", "10.244.2.0/24")
        assert "via 192.168.77.2 dev eth0" in route


def test_routes_mode_reports_a_node_on_another_subnet_and_keeps_the_others_working(make_netns, prefix):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24", "192.168.88.3/24"])
    with routed_networks(nodes[:2]) as networks:
        reports = [network.program_peers(routed_peers(nodes, i)) for i, network in enumerate(networks)]

        assert set(reports[0].errors) == {"node3"}
        assert "192.168.88.3" in reports[0].errors["node3"]
        assert "not on a subnet" in reports[0].errors["node3"]
        assert "10.244.3.0/24" not in ns_run(nodes[0].ns, "ip", "route", "show")
        assert reachable(nodes[0], nodes[1])


def test_restart_in_routes_mode_replaces_the_vxlan_routes(make_netns, prefix):
    """Changing --network across a restart must not leave the previous mode's routes behind."""
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24"])
    with vxlan_networks(nodes) as networks:
        for i, network in enumerate(networks):
            network.program_peers(vxlan_peers(nodes, networks, i))
    with routed_networks(nodes) as networks:
        for i, network in enumerate(networks):
            assert network.program_peers(routed_peers(nodes, i)).errors == {}
        assert "via 192.168.77.2 dev eth0" in ns_run(nodes[0].ns, "ip", "route", "show", "10.244.2.0/24")
        assert ns_run(nodes[0].ns, "ip", "link", "show", "type", "vxlan") == ""
        assert reachable(nodes[0], nodes[1])
