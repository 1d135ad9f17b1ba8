"""ADD, DEL and CHECK of one attachment: a (container id, ifname) pair plugged into the bridge.

ADD keeps an undo list of what it created and unwinds it on any failure, so a failed ADD leaves no
veth, no pod address, no allocation, and no bridge or gateway address that only it needed behind.
DEL needs neither the pod netns nor the node state:
the host veth name is derived from the attachment key and deleting it removes the pod end too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

from pyroute2 import IPRoute

from cni import errors, ipam, links, masq
from cni.config import NetConf, Network, Request
from cni.errors import CniError
from cni.result import PrevIp, PrevResult, add_result, parse_prev_result

log = logging.getLogger(__name__)


def add(request: Request, network: Network) -> dict[str, Any]:
    conf = network.conf
    store = ipam.AllocationStore(conf.data_dir, conf.name)
    host_name = links.host_veth_name(request.container_id, request.ifname)
    undo: list[Callable[[], object]] = []
    with links.open_pod(request.netns) as pod_ns, links.node_iproute() as node_ipr:
        try:
            addresses = store.allocate(request.owner, network.ranges)
            undo.append(lambda: store.release(request.owner))
            gateways = [(r.gateway, r.subnet.prefixlen) for r in network.ranges]
            made = links.ensure_bridge(node_ipr, conf.bridge, network.mtu, gateways)
            undo.append(lambda: _unmake_bridge(store, request.owner, node_ipr, made))
            bridge = made.link
            links.enable_forwarding([r.subnet for r in network.ranges])
            if links.local_index(host_name) is not None:  # the leftover of an ADD killed half-way
                links.delete(node_ipr, host_name)
            alias = links.network_alias(conf.name)
            host, pod = links.create_veth(
                node_ipr, host_name, pod_ns, request.ifname, network.mtu, bridge, alias, conf.hairpin
            )
            undo.append(lambda: links.delete(node_ipr, host_name))
            links.configure_pod_interface(
                pod_ns.ipr,
                pod,
                [(a, r.subnet.prefixlen) for a, r in zip(addresses, network.ranges, strict=True)],
                [r.gateway for r in network.ranges],
            )
            if conf.ip_masq:
                masq.apply(conf.name, [r.subnet for r in network.ranges], list(network.cluster_cidrs))
        except BaseException:
            _unwind(undo)
            raise
    return add_result(
        conf.cni_version, bridge, host, pod, request.netns, network.mtu, addresses, network.ranges
    )


def delete(request: Request, conf: NetConf) -> None:
    """Remove the veth and free the addresses; the network's last DEL also removes its masquerade.

    The bridge and its gateway addresses stay: the next pod needs them, and nothing routes through
    them without a pod behind.
    """
    with links.node_iproute() as node_ipr:
        links.delete(node_ipr, links.host_veth_name(request.container_id, request.ifname))
    # whatever this call's ipMasq says: the ADDs may have had it on, and a network without attachments
    # needs no masquerade (removing a table that is not there costs one netlink query)
    ipam.AllocationStore(conf.data_dir, conf.name).release(request.owner, lambda: masq.remove(conf.name))


def check(request: Request, conf: NetConf) -> None:
    """Fail with CHECK_FAILED when the attachment drifted from prevResult."""
    if conf.prev_result is None:
        raise CniError(errors.INVALID_CONFIG, "CHECK needs prevResult in the network config")
    prev = parse_prev_result(conf.prev_result)
    expected_ips = [ip.address for ip in prev.ips if _points_to(ip, prev, request.ifname)]
    host_name = links.host_veth_name(request.container_id, request.ifname)
    with links.open_pod(request.netns) as pod_ns, links.node_iproute() as node_ipr:
        pod_ipr = pod_ns.ipr
        pod = links.find(pod_ipr, request.ifname)
        if pod is None:
            _drift(f"{request.ifname} is missing from {request.netns}")
        for interface in prev.interfaces:
            if interface.name == request.ifname and interface.mac not in (None, pod.mac):
                _drift(f"{request.ifname} has MAC {pod.mac}, prevResult says {interface.mac}")
        present = links.addresses_of(pod_ipr, pod.index)
        for address in expected_ips:
            if address.with_prefixlen not in present:
                _drift(f"address {address} is missing from {request.ifname}")
        routes = links.routes_of(pod_ipr, pod.index)
        for route in prev.routes:
            gw = None if route.gw is None else str(route.gw)
            if (str(route.dst), gw) not in routes and (str(route.dst), None) not in routes:
                _drift(f"route to {route.dst} via {gw} is missing")
        host = links.find(node_ipr, host_name)
        bridge = links.find(node_ipr, conf.bridge)
        if host is None or bridge is None:
            _drift(f"host veth {host_name} or bridge {conf.bridge} is missing")
        if node_ipr.get_links(host.index)[0].get_attr("IFLA_MASTER") != bridge.index:
            _drift(f"host veth {host_name} is not attached to {conf.bridge}")
    store = ipam.AllocationStore(conf.data_dir, conf.name)
    with store.locked_if_exists():
        held = {a for a, owner in store.allocations().items() if owner == request.owner}
    for address in expected_ips:
        if address.ip not in held:
            _drift(f"address {address} is no longer allocated to this attachment")


def _points_to(ip: PrevIp, prev: PrevResult, ifname: str) -> bool:
    return ip.interface < len(prev.interfaces) and prev.interfaces[ip.interface].name == ifname


def _unmake_bridge(store: ipam.AllocationStore, owner: ipam.Owner, ipr: IPRoute, made: links.Bridge) -> None:
    """Undo a failed ADD's bridge work, unless another attachment holds an address (and so needs the
    bridge, or will build it again after this: it allocates first, under the same lock)."""
    with store.locked():
        if store.only(owner):
            links.unmake_bridge(ipr, made)


def _drift(msg: str) -> NoReturn:
    raise CniError(errors.CHECK_FAILED, msg)


def _unwind(undo: list[Callable[[], object]]) -> None:
    for step in reversed(undo):
        try:
            step()
        except Exception:  # keep unwinding: the original error is the one the runtime must see
            log.exception("rollback step failed")
