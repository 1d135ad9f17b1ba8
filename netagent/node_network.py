"""Node networking: the kernel entries that let pods on this node reach pod CIDRs of other nodes.

Two modes, one discipline: compute the entries every other node needs (desired state), read what the
kernel holds that netagent owns (current state), and change only the difference. Entries that are
already right are never touched, so a restarted agent converges without a blip.

- vxlan (flannel's scheme): one VXLAN device; it carries the network address of each local pod CIDR
  as a /32 (/128) "VTEP address". For every other node: an FDB entry (its VTEP MAC -> its node IP),
  a permanent neighbour (its VTEP address -> its VTEP MAC) and a route (its pod CIDR via its VTEP
  address, onlink, on the VXLAN device). Our VTEP MAC is derived from our node IP, so it survives
  restarts and reboots and peers never need to relearn it.
- routes: `pod CIDR via node IP` on the underlay; only possible when the node IP is on a subnet
  directly connected to the underlay interface (same L2 segment). Others get a per-node error.

Ownership: routes carry protocol ROUTE_PROTOCOL; neighbours and FDB entries are ours when they are
permanent entries on our own VXLAN device. Nothing else is ever read for deletion.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

ADDR_GEN_MODE_NONE = 1  # IN6_ADDR_GEN_MODE_NONE

log = logging.getLogger("netagent.node_network")

ROUTE_PROTOCOL = 211  # rtnetlink protocol number marking routes netagent owns (see /etc/iproute2/rt_protos)
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
IFA_F_NODAD = 0x02
MAIN_TABLE = 254
VXLAN_DEVICE_PREFIX = "netagent."  # + VNI: the VXLAN device netagent owns

# Annotations netagent publishes on its own Node so other nodes can program their entries.
ANNOTATION_VTEP_MAC = "netagent.io/vtep-mac"  # MAC address of the node's VXLAN device
ANNOTATION_NODE_IP = "netagent.io/node-ip"  # underlay address VXLAN packets / routes are sent to


class NodeNetworkError(RuntimeError):
    """Setting up this node's own networking failed (bad underlay, device conflict)."""


@dataclass(frozen=True)
class PeerNode:
    """What another node contributes to our desired state."""

    name: str
    node_ip: str
    pod_cidrs: tuple[str, ...]
    vtep_mac: str | None = None


@dataclass(frozen=True)
class Underlay:
    """The interface towards other nodes and the node IP on it."""

    name: str
    index: int
    mtu: int
    node_ip: str | None
    subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass
class SyncReport:
    """What one sync changed; errors are per peer node and never stop the other nodes' entries."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    entries: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # peers that have not published what we need yet


def find_underlay(ipr: IPRoute, iface: str | None = None, node_ip: str | None = None) -> Underlay:
    """The named interface, else the one holding node_ip, else the default route's interface."""
    index = None
    if iface:
        found = ipr.link_lookup(ifname=iface)
        if not found:
            raise NodeNetworkError(f"underlay interface {iface!r} does not exist")
        index = found[0]
    elif node_ip:
        index = next((a["index"] for a in ipr.get_addr() if a.get("IFA_ADDRESS") == node_ip), None)
    if index is None:
        index = _default_route_iface(ipr)
    if index is None:
        raise NodeNetworkError("cannot find the underlay interface: give --underlay-iface "
                               "(no interface holds the node IP and there is no default route)")
    link = ipr.get_links(index)[0]
    addresses = [a for a in ipr.get_addr(index=index) if a["scope"] == 0]  # link-local reaches no node
    subnets = tuple(ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}").network
                    for a in addresses)
    local_ips = [str(a.get("IFA_ADDRESS")) for a in addresses]
    if node_ip not in local_ips:  # no hint, or the Node's address is not ours here: use what we hold
        if node_ip is not None:
            log.warning("node IP %s is not on %s; using that interface's own address", node_ip,
                        link.get("IFLA_IFNAME"))
        node_ip = next((ip for ip in local_ips if ipaddress.ip_address(ip).version == 4), None)
    return Underlay(link.get("IFLA_IFNAME"), index, link.get("IFLA_MTU"), node_ip, subnets)


def _default_route_iface(ipr: IPRoute) -> int | None:
    for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            return route.get("RTA_OIF")
    return None


def underlay_mtu(iface: str | None = None) -> int:
    """MTU of the underlay in the current netns (1500 when there is none, e.g. an isolated host)."""
    with IPRoute() as ipr:
        try:
            return find_underlay(ipr, iface).mtu
        except NodeNetworkError:
            if iface:
                raise
            return 1500


def enable_forwarding() -> None:
    """Turn on IP forwarding in the calling thread's netns (a node routes for its pods)."""
    for knob in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        with open(knob, "w") as f:
            f.write("1")


def remove_stale_overlays(ipr: IPRoute, keep: str | None = None) -> None:
    """Delete VXLAN devices netagent made that the current mode/VNI no longer uses (their FDB,
    neighbour and route entries go with them)."""
    for link in ipr.get_links():
        name = link.get("IFLA_IFNAME")
        info = link.get("IFLA_LINKINFO")
        is_vxlan = info is not None and info.get("IFLA_INFO_KIND") == "vxlan"
        if is_vxlan and name.startswith(VXLAN_DEVICE_PREFIX) and name != keep:
            log.info("remove %s: not used in the current network mode", name)
            ipr.link("del", index=link["index"])


def vxlan_device_name(vni: int) -> str:
    """The VXLAN device netagent owns for this VNI (interface names are at most 15 characters)."""
    return f"{VXLAN_DEVICE_PREFIX}{vni}"[:15]


def vtep_mac_for(node_ip: str) -> str:
    """A stable, locally administered unicast MAC derived from the node IP."""
    digest = hashlib.sha256(ipaddress.ip_address(node_ip).packed).digest()
    return ":".join(f"{b:02x}" for b in (0x0E, 0x6E, *digest[:4]))


def vtep_address(pod_cidr: str) -> str:
    """The VTEP address standing for a pod CIDR: its network address (flannel's convention)."""
    return str(ipaddress.ip_network(pod_cidr).network_address)


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _reconcile(kind: str, current: dict[Any, Any], desired: dict[Any, Any],
               put: Callable[[Any, Any], None], delete: Callable[[Any, Any], None],
               report: SyncReport) -> None:
    """Apply desired over current by key: put what is missing or different, delete what is extra.

    A kernel refusal for one entry is recorded in the report and the other entries still apply.
    """
    for key in current.keys() - desired.keys():
        log.info("remove %s %s", kind, key)
        if _apply(kind, key, lambda k=key: delete(k, current[k]), report):
            report.removed += 1
    for key, value in desired.items():
        if current.get(key) == value:
            continue
        log.info("%s %s %s -> %s", "change" if key in current else "add", kind, key, value)
        if _apply(kind, key, lambda k=key, v=value: put(k, v), report):
            if key in current:
                report.changed += 1
            else:
                report.added += 1
    report.entries += len(desired)


def _apply(kind: str, key: Any, action: Callable[[], None], report: SyncReport) -> bool:
    try:
        action()
    except NetlinkError as exc:
        message = f"{kind} {key}: kernel refused ({exc.code}: {exc.args[-1]})"
        log.error("%s", message)
        report.errors[f"{kind} {key}"] = message
        return False
    return True


class NextHop(NamedTuple):
    """Where one of our routes sends a pod CIDR (compared as a tuple, printed for humans)."""

    gateway: str
    oif: int
    onlink: bool

    def __str__(self) -> str:
        return f"via {self.gateway} dev #{self.oif}{' onlink' if self.onlink else ''}"


class _RouteTable:
    """Our routes (protocol ROUTE_PROTOCOL in the main table) as {dst: NextHop}."""

    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def current(self) -> dict[str, NextHop]:
        routes = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self.ipr.get_routes(family=family, table=MAIN_TABLE):
                if r["proto"] != ROUTE_PROTOCOL:
                    continue
                dst = f"{r.get('RTA_DST')}/{r['dst_len']}"
                onlink = bool(r["flags"] & RTNH_F_ONLINK)
                routes[dst] = NextHop(r.get("RTA_GATEWAY"), r.get("RTA_OIF"), onlink)
        return routes

    def put(self, dst: str, value: NextHop) -> None:
        gateway, oif, onlink = value
        self.ipr.route("replace", dst=dst, gateway=gateway, oif=oif, proto=ROUTE_PROTOCOL,
                       table=MAIN_TABLE, flags=RTNH_F_ONLINK if onlink else 0)

    def delete(self, dst: str, value: NextHop) -> None:
        gateway, oif, _ = value
        self.ipr.route("del", dst=dst, gateway=gateway, oif=oif, proto=ROUTE_PROTOCOL, table=MAIN_TABLE)


class RoutedNetwork:
    """routes mode: pod CIDR via node IP, for nodes on the same L2 segment."""

    def __init__(self, ipr: IPRoute, underlay: Underlay) -> None:
        self.ipr = ipr
        self.underlay = underlay
        self.routes = _RouteTable(ipr)

    @property
    def mtu(self) -> int:
        return self.underlay.mtu

    def setup(self) -> None:
        enable_forwarding()
        remove_stale_overlays(self.ipr)

    def program_peers(self, peers: Iterable[PeerNode]) -> SyncReport:
        report = SyncReport()
        desired = {}
        for peer in peers:
            error = self._unreachable_reason(peer)
            if error:
                report.errors[peer.name] = error
                continue
            for cidr in peer.pod_cidrs:
                if _family(vtep_address(cidr)) == _family(peer.node_ip):
                    desired[cidr] = NextHop(peer.node_ip, self.underlay.index, False)
                else:  # a v6 pod CIDR cannot be routed via a v4 next hop: vxlan mode carries both
                    report.errors[peer.name] = (f"routes mode: pod CIDR {cidr} of node {peer.name} has no "
                                                f"node IP of its family (node IP {peer.node_ip})")
        current = self.routes.current()
        _reconcile("route", current, desired, self.routes.put, self.routes.delete, report)
        return report

    def _unreachable_reason(self, peer: PeerNode) -> str | None:
        address = ipaddress.ip_address(peer.node_ip)
        if any(address in subnet for subnet in self.underlay.subnets):
            return None
        subnets = ", ".join(str(s) for s in self.underlay.subnets) or "none"
        return (f"routes mode: node IP {peer.node_ip} of node {peer.name} is not on a subnet directly "
                f"connected to {self.underlay.name} ({subnets}); use --network vxlan for nodes on "
                f"other L2 segments")


class VxlanNetwork:
    """vxlan mode: one VXLAN device and per-peer FDB, neighbour and route entries."""

    def __init__(self, ipr: IPRoute, underlay: Underlay, vni: int = 1, port: int = 4789) -> None:
        if underlay.node_ip is None:
            raise NodeNetworkError(f"underlay {underlay.name} has no IPv4 address to send VXLAN from")
        self.ipr = ipr
        self.underlay = underlay
        self.vni = vni
        self.port = port
        self.device = vxlan_device_name(vni)
        self.vtep_mac = vtep_mac_for(underlay.node_ip)
        self.index: int | None = None
        self.routes = _RouteTable(ipr)

    @property
    def mtu(self) -> int:
        return self.underlay.mtu - VXLAN_OVERHEAD

    def setup(self, local_pod_cidrs: Iterable[str]) -> None:
        """Make the device exist with our parameters, carry our VTEP addresses, and be up."""
        enable_forwarding()
        remove_stale_overlays(self.ipr, keep=self.device)
        self.index = self._ensure_device()
        self._ensure_vtep_addresses({vtep_address(c) for c in local_pod_cidrs})

    def _ensure_device(self) -> int:
        wanted = {
            "IFLA_VXLAN_ID": self.vni,
            "IFLA_VXLAN_PORT": self.port,
            "IFLA_VXLAN_LOCAL": self.underlay.node_ip,
            "IFLA_VXLAN_LINK": self.underlay.index,
            "IFLA_VXLAN_LEARNING": 0,
        }
        found = self.ipr.link_lookup(ifname=self.device)
        if found:
            link = self.ipr.get_links(found[0])[0]
            info = link.get("IFLA_LINKINFO")
            data = info.get("IFLA_INFO_DATA") if info and info.get("IFLA_INFO_KIND") == "vxlan" else None
            have = {key: data.get(key) for key in wanted} if data else {}
            if have == wanted and link.get("IFLA_ADDRESS") == self.vtep_mac:
                if link.get("IFLA_MTU") != self.mtu:
                    log.info("set %s MTU %d", self.device, self.mtu)
                    self.ipr.link("set", index=found[0], mtu=self.mtu)
                if not link["flags"] & 1:
                    self.ipr.link("set", index=found[0], state="up")
                return found[0]
            log.warning("%s exists with other parameters (%s); recreating it", self.device, have)
            self.ipr.link("del", index=found[0])
        log.info("create %s (VNI %d, port %d, local %s, MAC %s, MTU %d)", self.device, self.vni,
                 self.port, self.underlay.node_ip, self.vtep_mac, self.mtu)
        self.ipr.link("add", ifname=self.device, kind="vxlan", vxlan_id=self.vni, vxlan_port=self.port,
                      vxlan_local=self.underlay.node_ip, vxlan_link=self.underlay.index,
                      vxlan_learning=0, address=self.vtep_mac, mtu=self.mtu)
        index = self.ipr.link_lookup(ifname=self.device)[0]
        # No IPv6 link-local address: the overlay routes by VTEP addresses and permanent neighbours,
        # and a link-local address would only add DAD traffic and late kernel events after startup.
        self.ipr.link("set", index=index, IFLA_AF_SPEC={
            "attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE)]})]})
        self.ipr.link("set", index=index, state="up")
        return index

    def _ensure_vtep_addresses(self, wanted: set[str]) -> None:
        have = {
            (str(a.get("IFA_ADDRESS")), a["prefixlen"])
            for a in self.ipr.get_addr(index=self.index)
            if a["scope"] == 0
        }
        want = {(address, 128 if ":" in address else 32) for address in wanted}
        for address, prefixlen in have - want:
            log.info("remove VTEP address %s/%d from %s", address, prefixlen, self.device)
            self.ipr.addr("del", index=self.index, address=address, prefixlen=prefixlen)
        for address, prefixlen in want - have:
            log.info("add VTEP address %s/%d to %s", address, prefixlen, self.device)
            # no duplicate address detection: the address is ours by construction, and a tentative
            # address would delay the first packets to this node's pods by a second or more
            self.ipr.addr("add", index=self.index, address=address, prefixlen=prefixlen,
                          flags=IFA_F_NODAD if prefixlen == 128 else 0)

    def program_peers(self, peers: Iterable[PeerNode]) -> SyncReport:
        if self.index is None:
            raise NodeNetworkError("VxlanNetwork.program_peers() before setup()")
        report = SyncReport()
        fdb, neighbours, routes = {}, {}, {}
        for peer in peers:
            if not peer.vtep_mac:  # its agent has not started yet: normal while a cluster comes up
                report.waiting.append(peer.name)
                continue
            fdb[peer.vtep_mac] = peer.node_ip
            for cidr in peer.pod_cidrs:
                gateway = vtep_address(cidr)
                neighbours[gateway] = peer.vtep_mac
                routes[cidr] = NextHop(gateway, self.index, True)
        # Add order fdb -> neighbour -> route (a route never points at an unresolvable hop); the
        # deletions of a removed node happen in the same order, which is harmless: its route is
        # onlink and its traffic has nowhere to go anyway.
        _reconcile("fdb", self._current_fdb(), fdb, self._put_fdb, self._delete_fdb, report)
        _reconcile("neighbour", self._current_neighbours(), neighbours, self._put_neighbour,
                   self._delete_neighbour, report)
        _reconcile("route", self.routes.current(), routes, self.routes.put, self.routes.delete, report)
        return report

    def _current_fdb(self) -> dict[str, str]:
        return {
            entry.get("NDA_LLADDR"): entry.get("NDA_DST")
            for entry in self.ipr.fdb("dump", ifindex=self.index)
            if entry["ifindex"] == self.index and entry["state"] & NUD_PERMANENT and entry.get("NDA_DST")
        }

    def _put_fdb(self, mac: str, node_ip: str) -> None:
        self.ipr.fdb("replace", ifindex=self.index, lladdr=mac, dst=node_ip, state=NUD_PERMANENT,
                     flags=NTF_SELF)

    def _delete_fdb(self, mac: str, node_ip: str) -> None:
        self.ipr.fdb("del", ifindex=self.index, lladdr=mac, dst=node_ip, flags=NTF_SELF)

    def _current_neighbours(self) -> dict[str, str]:
        return {
            str(n.get("NDA_DST")): n.get("NDA_LLADDR")
            for n in self.ipr.get_neighbours(ifindex=self.index)
            if n["ifindex"] == self.index and n["state"] & NUD_PERMANENT
        }

    def _put_neighbour(self, address: str, mac: str) -> None:
        self.ipr.neigh("replace", ifindex=self.index, dst=address, lladdr=mac, state=NUD_PERMANENT,
                       family=_family(address))

    def _delete_neighbour(self, address: str, mac: str) -> None:
        self.ipr.neigh("del", ifindex=self.index, dst=address, family=_family(address))

