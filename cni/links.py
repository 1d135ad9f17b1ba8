"""Netlink work for one attachment: the node bridge, the veth pair, and the pod side of it.

All of it goes through pyroute2 sockets. A socket belongs to the netns it was opened in, so the pod's
socket is opened after a short setns() into CNI_NETNS (`open_pod`) and then used from the node's
side; the calling thread never stays in the pod's namespace while doing work.

ADD is on the critical path of every pod start, so each step here is one netlink message where the
kernel allows it, and lookups by name use a single RTM_GETLINK or an ioctl, never a dump.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import errors
from cni.config import IPAddress, IPNetwork
from cni.errors import CniError
from nodekit import netns

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


_per_thread = threading.local()


@contextlib.contextmanager
def node_iproute() -> Iterator[IPRoute]:
    """A netlink socket in the calling thread's netns, which is the node's.

    Kept open for the thread's next request (keyed by netns, so a thread that moved can never get a
    socket of another namespace): the agent serves ADDs from long-lived worker threads, and opening
    a pyroute2 socket costs about as much as a netlink request.
    """
    netns_inode = os.stat(netns.THREAD_NAMESPACE).st_ino
    sockets: dict[int, IPRoute] = _per_thread.__dict__.setdefault("sockets", {})
    if netns_inode not in sockets:
        sockets[netns_inode] = _iproute()
    yield sockets[netns_inode]


def _iproute() -> IPRoute:
    """A request-only socket: no multicast groups, so the node's link/address/route events (every
    concurrent ADD makes some) are not queued on it and parsed while waiting for our own replies."""
    return IPRoute(groups=0)


def local_index(name: str) -> int | None:
    """ifindex of a link in the calling thread's netns, by ioctl: far cheaper than a netlink query."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


@dataclass(frozen=True)
class PodNetns:
    """The pod's netns: its path, an fd (to move links into it) and a netlink socket opened inside it."""

    path: str
    fd: int
    ipr: IPRoute

    def index(self, name: str) -> int | None:
        with netns.entered(self.fd):
            return local_index(name)


@contextlib.contextmanager
def open_pod(netns_path: str) -> Iterator[PodNetns]:
    ns_fd = _open_pod_netns(netns_path)
    try:
        try:
            with netns.entered(ns_fd):
                ipr = _iproute()
        except OSError as e:
            raise CniError(errors.UNKNOWN_CONTAINER, f"cannot enter netns {netns_path}", str(e)) from None
        with ipr:
            yield PodNetns(netns_path, ns_fd, ipr)
    finally:
        os.close(ns_fd)


def _open_pod_netns(netns_path: str) -> int:
    """CNI_NETNS opened once it is known to name a pod's network namespace: the one check of it.

    A relative path would resolve against whichever process runs the plugin (the agent's working
    directory), and the node's own namespace must never receive a pod's interface and routes.
    """
    if not os.path.isabs(netns_path):
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS must be an absolute path: {netns_path!r}")
    try:
        fd = netns.open_network(netns_path)
    except netns.NotANetworkNamespace as e:
        raise CniError(errors.UNKNOWN_CONTAINER, f"CNI_NETNS: {e}") from None
    except OSError as e:
        raise CniError(errors.UNKNOWN_CONTAINER, f"cannot open netns {netns_path}", str(e)) from None
    if netns.same(fd, netns.THREAD_NAMESPACE):
        os.close(fd)
        msg = f"CNI_NETNS {netns_path} is the node's own network namespace, not a pod's"
        raise CniError(errors.INVALID_ENV, msg)
    return fd


def find(ipr: IPRoute, name: str) -> Link | None:
    message = _get_link(ipr, name)
    return None if message is None else _link(name, message)


@dataclass(frozen=True)
class Bridge:
    """The node bridge as ensure_bridge left it, and what that call made (for a failed ADD to undo)."""

    link: Link
    created: bool
    added: tuple[tuple[IPAddress, int], ...]  # gateway addresses this call assigned


def ensure_bridge(ipr: IPRoute, name: str, mtu: int, gateways: list[tuple[IPAddress, int]]) -> Bridge:
    """Create the bridge if missing, bring it up and give it each gateway address (all idempotent).

    Runs on every ADD, so the common case (all in place) costs one netlink query plus a bind() per
    gateway, which tells whether the address is already local without dumping addresses. A failure
    part-way undoes what this call made.
    """
    message = _get_link(ipr, name)
    created = False
    if message is None:
        # a fixed MAC: otherwise the bridge takes its lowest port's MAC, which changes as pods come and go
        with _kernel(f"create bridge {name}"), _unless_exists():  # a concurrent ADD may win the race
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=random_mac())
            created = True
        message = _get_link(ipr, name)
        if message is None:
            raise CniError(errors.KERNEL_FAILURE, f"bridge {name} vanished right after creation")
    kind = message.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    if kind != "bridge":
        raise CniError(errors.INVALID_CONFIG, f"{name} exists and is a {kind}, not a bridge")
    link = _link(name, message)
    added: list[tuple[IPAddress, int]] = []
    try:
        with _kernel(f"configure bridge {name}"):
            if not message["flags"] & IFF_UP:
                ipr.link("set", index=link.index, state="up")
            for address, prefixlen in gateways:
                if not _is_local(address):
                    with _unless_exists():
                        _add_address(ipr, link.index, address, prefixlen)
                        added.append((address, prefixlen))
    except BaseException:
        unmake_bridge(ipr, Bridge(link, created, tuple(added)))
        raise
    return Bridge(link, created, tuple(added))


def unmake_bridge(ipr: IPRoute, bridge: Bridge) -> None:
    """Undo what ensure_bridge made, unless a port joined the bridge since (it serves a pod now)."""
    if any(link.get_attr("IFLA_MASTER") == bridge.link.index for link in ipr.get_links()):
        return
    if bridge.created:
        delete_index(ipr, bridge.link.index, bridge.link.name)
        return
    for address, prefixlen in bridge.added:
        with contextlib.suppress(NetlinkError):  # already gone
            ipr.addr("del", index=bridge.link.index, address=str(address), prefixlen=prefixlen)


def create_veth(
    ipr: IPRoute,
    host_name: str,
    pod: PodNetns,
    pod_ifname: str,
    mtu: int,
    bridge: Link,
    alias: str,
    hairpin: bool,
) -> tuple[Link, Link]:
    """Create the pair already plugged into the bridge, the peer born inside the pod netns under its
    final name (no rename step); then, in one message, bring the host end up, stamp the network's
    alias and set hairpin. Both MACs are chosen here so the result needs no read-back.

    Either the veth ends up complete or it is removed again before the error propagates.
    """
    host_mac, pod_mac = random_mac(), random_mac()
    peer = {"ifname": pod_ifname, "net_ns_fd": pod.fd, "mtu": mtu, "address": pod_mac}
    # the host name was freed just before, so "exists" can only mean the pod's interface name is taken
    with _kernel(f"create veth {host_name}"), _exists_means(f"{pod_ifname} already exists in {pod.path}"):
        ipr.link(
            "add", ifname=host_name, kind="veth", master=bridge.index, mtu=mtu, address=host_mac, peer=peer
        )
    try:
        host_index, pod_index = local_index(host_name), pod.index(pod_ifname)
        if host_index is None or pod_index is None:
            raise CniError(errors.KERNEL_FAILURE, f"veth {host_name} vanished right after creation")
        port = {"kind": "bridge_slave", "mode": 1} if hairpin else {}  # IFLA_BRPORT_MODE 1 = hairpin
        with _kernel(f"bring up {host_name} on {bridge.name}"):
            ipr.link("set", index=host_index, ifalias=alias, flags=IFF_UP, change=IFF_UP, **port)
    except BaseException:
        delete(ipr, host_name)
        raise
    return Link(host_name, host_index, host_mac), Link(pod_ifname, pod_index, pod_mac)


def configure_pod_interface(
    ipr: IPRoute, pod: Link, addresses: list[tuple[IPAddress, int]], gateways: list[IPAddress]
) -> None:
    """Addresses, link up, then one default route per family via the bridge's gateway."""
    with _kernel(f"configure {pod.name} in the pod"):
        for address, prefixlen in addresses:
            _add_address(ipr, pod.index, address, prefixlen)
        ipr.link("set", index=pod.index, flags=IFF_UP, change=IFF_UP)
        for gateway in gateways:
            ipr.route("add", dst=default_route(gateway.version), gateway=str(gateway), oif=pod.index)


def delete(ipr: IPRoute, name: str) -> bool:
    """Remove a link by name; False when it was already gone."""
    link = find(ipr, name)
    return link is not None and delete_index(ipr, link.index, name)


def delete_index(ipr: IPRoute, index: int, name: str) -> bool:
    """Remove the link with this index (named `name` in errors); False when it was already gone."""
    try:
        ipr.link("del", index=index)
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


def _is_local(address: IPAddress) -> bool:
    """Whether an address is assigned in the calling thread's netns: only then can a socket bind to it."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


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
def _exists_means(msg: str) -> Iterator[None]:
    """EEXIST from the kernel, explained for this step."""
    try:
        yield
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            raise CniError(errors.KERNEL_FAILURE, msg) from None
        raise


@contextlib.contextmanager
def _kernel(what: str) -> Iterator[None]:
    """Turn a netlink failure into a CNI error naming the step that failed."""
    try:
        yield
    except NetlinkError as e:
        raise CniError(errors.KERNEL_FAILURE, f"{what}: {os.strerror(e.code)}", str(e)) from None
