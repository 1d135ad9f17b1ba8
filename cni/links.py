"""Netlink work for one attachment: the node bridge, the veth pair, and the pod side of it.

All of it goes through pyroute2 sockets. A socket belongs to the netns it was opened in, so the pod's
socket is opened after a short setns() into CNI_NETNS (`pod_iproute`) and then used from the node's
side; the calling thread never stays in the pod's namespace while doing work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import errors
from cni.config import IPAddress, IPNetwork
from cni.errors import CniError

IFF_UP = 0x1
IFA_F_NODAD = 0x02  # pod and gateway addresses are unique by IPAM: skip IPv6 duplicate detection delay
ALIAS_PREFIX = "netagent/"


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mac: str


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL and GC find the host side from (container id, ifname) alone."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return f"na{digest[:12]}"


def network_alias(network_name: str) -> str:
    """Alias stamped on every host veth: tells GC which network the veth belongs to."""
    return f"{ALIAS_PREFIX}{network_name}"


def node_iproute() -> IPRoute:
    """A netlink socket in the calling thread's netns, which is the node's."""
    return IPRoute()


def node_index(name: str) -> int | None:
    """ifindex of a link in the calling thread's netns, by ioctl: far cheaper than a netlink query."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


@contextlib.contextmanager
def pod_iproute(netns_path: str) -> Iterator[tuple[IPRoute, int]]:
    """A netlink socket inside the pod's netns plus an fd of that netns (for moving links into it)."""
    from netagent.netns import entered

    try:
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CniError(errors.UNKNOWN_CONTAINER, f"cannot open netns {netns_path}", str(e)) from None
    try:
        try:
            with entered(netns_path):
                ipr = IPRoute()
        except OSError as e:
            msg = f"{netns_path} is not a network namespace"
            raise CniError(errors.UNKNOWN_CONTAINER, msg, str(e)) from None
        with ipr:
            yield ipr, ns_fd
    finally:
        os.close(ns_fd)


def find(ipr: IPRoute, name: str) -> Link | None:
    message = _get_link(ipr, name)
    return None if message is None else _link(name, message)


def ensure_bridge(ipr: IPRoute, name: str, mtu: int, gateways: list[tuple[IPAddress, int]]) -> Link:
    """Create the bridge if missing, bring it up and give it each gateway address (all idempotent).

    Runs on every ADD, so the common case (all in place) costs two small netlink queries.
    """
    message = _get_link(ipr, name)
    if message is None:
        # a fixed MAC: otherwise the bridge takes its lowest port's MAC, which changes as pods come and go
        with _kernel(f"create bridge {name}"), _unless_exists():  # a concurrent ADD may win the race
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=random_mac())
        message = _get_link(ipr, name)
        if message is None:
            raise CniError(errors.KERNEL_FAILURE, f"bridge {name} vanished right after creation")
    kind = message.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "bridge":
        raise CniError(errors.INVALID_CONFIG, f"{name} exists and is a {kind}, not a bridge")
    bridge = _link(name, message)
    with _kernel(f"configure bridge {name}"):
        if not message["flags"] & IFF_UP:
            ipr.link("set", index=bridge.index, state="up")
        present = addresses_of(ipr, bridge.index)
        for address, prefixlen in gateways:
            if f"{address}/{prefixlen}" not in present:
                with _unless_exists():
                    _add_address(ipr, bridge.index, address, prefixlen)
    return bridge


def create_veth(
    ipr: IPRoute, host_name: str, pod_ifname: str, pod_ns_fd: int, mtu: int, alias: str
) -> tuple[Link, str]:
    """Create the pair with the peer born inside the pod netns under its final name (no rename step).

    Both MACs are chosen here so the result needs no read-back; returns the host end and the pod MAC.
    """
    host_mac, pod_mac = random_mac(), random_mac()
    with _kernel(f"create veth {host_name}"):
        ipr.link(
            "add",
            ifname=host_name,
            kind="veth",
            mtu=mtu,
            address=host_mac,
            peer={"ifname": pod_ifname, "net_ns_fd": pod_ns_fd, "mtu": mtu, "address": pod_mac},
        )
    index = node_index(host_name)
    if index is None:
        raise CniError(errors.KERNEL_FAILURE, f"veth {host_name} vanished right after creation")
    with _kernel(f"set alias on {host_name}"):
        ipr.link("set", index=index, ifalias=alias)
    return Link(host_name, index, host_mac), pod_mac


def plug_into_bridge(ipr: IPRoute, host: Link, bridge: Link, hairpin: bool) -> None:
    with _kernel(f"attach {host.name} to {bridge.name}"):
        ipr.link("set", index=host.index, master=bridge.index, state="up")
        if hairpin:
            ipr.brport("set", index=host.index, mode=1)


def configure_pod_interface(
    ipr: IPRoute, ifname: str, mac: str, addresses: list[tuple[IPAddress, int]], gateways: list[IPAddress]
) -> Link:
    """Addresses, link up, then one default route per family via the bridge's gateway."""
    with _kernel(f"configure {ifname} in the pod"):
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise CniError(errors.KERNEL_FAILURE, f"{ifname} did not appear in the pod netns")
        pod = Link(ifname, found[0], mac)
        for address, prefixlen in addresses:
            _add_address(ipr, pod.index, address, prefixlen)
        ipr.link("set", index=pod.index, state="up")
        for gateway in gateways:
            ipr.route("add", dst=default_route(gateway.version), gateway=str(gateway), oif=pod.index)
    return pod


def delete(ipr: IPRoute, name: str) -> bool:
    """Remove a link by name; False when it was already gone."""
    link = find(ipr, name)
    if link is None:
        return False
    try:
        ipr.link("del", index=link.index)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise CniError(errors.KERNEL_FAILURE, f"cannot delete {name}", str(e)) from None
    return True


def veths_of_network(ipr: IPRoute, network_name: str) -> list[str]:
    alias = network_alias(network_name)
    return [
        link.get_attr("IFLA_IFNAME")
        for link in ipr.get_links()
        if link.get_attr("IFLA_IFALIAS") == alias
        and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"
    ]


def addresses_of(ipr: IPRoute, index: int) -> set[str]:
    """'address/prefixlen' strings on a link."""
    return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)}


def routes_of(ipr: IPRoute, index: int) -> set[tuple[str, str | None]]:
    """(dst, gateway) of the main-table routes leaving through a link."""
    found = set()
    for family in (2, 10):  # AF_INET, AF_INET6
        for route in ipr.get_routes(family=family, oif=index, table=254):
            dst = route.get_attr("RTA_DST")
            dst_cidr = f"{dst}/{route['dst_len']}" if dst else default_route(4 if family == 2 else 6)
            found.add((dst_cidr, route.get_attr("RTA_GATEWAY")))
    return found


def default_route(version: int) -> str:
    return "0.0.0.0/0" if version == 4 else "::/0"


def enable_forwarding(subnets: list[IPNetwork]) -> None:
    """The node must route for its pods (like the reference bridge plugin); write only if needed."""
    knobs = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
    for version in {subnet.version for subnet in subnets}:
        with open(knobs[version], "r+") as f:
            if f.read().strip() != "1":
                f.seek(0)
                f.write("1")


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    return "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


def _get_link(ipr: IPRoute, name: str):
    """One RTM_GETLINK by name (a filtered dump would cost O(links on the node) per lookup)."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise CniError(errors.KERNEL_FAILURE, f"cannot look up {name}", str(e)) from None


def _link(name: str, message) -> Link:
    return Link(name, message["index"], message.get_attr("IFLA_ADDRESS"))


def _add_address(ipr: IPRoute, index: int, address: IPAddress, prefixlen: int) -> None:
    flags = IFA_F_NODAD if address.version == 6 else 0
    ipr.addr("add", index=index, address=str(address), prefixlen=prefixlen, flags=flags)


@contextlib.contextmanager
def _unless_exists() -> Iterator[None]:
    try:
        yield
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


@contextlib.contextmanager
def _kernel(what: str) -> Iterator[None]:
    """Turn a netlink failure into a CNI error naming the step that failed."""
    try:
        yield
    except NetlinkError as e:
        raise CniError(errors.KERNEL_FAILURE, f"{what}: {os.strerror(e.code)}", str(e)) from None
