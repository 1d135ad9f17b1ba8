"""The node controller: keeps this node's networking in step with the cluster's Node objects.

From the Nodes it learns (1) this node's pod CIDRs, which it writes into the node state file for the
CNI plugin together with the MTU pods must use, and (2) every other node's pod CIDRs, node IP and
VTEP MAC, from which node_network programs the kernel. It publishes its own node IP and VTEP MAC as
annotations on its Node so the other nodes can do the same.

Every sync recomputes everything from the informer's cache (level-triggered), so a missed event or a
crash mid-sync is repaired by the next one; node_network changes only entries that differ.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge
from pyroute2 import IPRoute

from netagent.config import AgentConfig
from netagent.health import SyncTracker
from netagent.kube import Informer, SyncLoop
from netagent.node_network import (
    ANNOTATION_NODE_IP,
    ANNOTATION_VTEP_MAC,
    VXLAN_OVERHEAD,
    PeerNode,
    RoutedNetwork,
    SyncReport,
    VxlanNetwork,
    find_underlay,
)
from nodekit import nodestate

log = logging.getLogger("netagent.node_controller")

CONTROLLER = "node"


class NodeNotReadyError(RuntimeError):
    """This node's own Node object cannot be used yet (missing, or no pod CIDR assigned)."""


def pod_cidrs_of(node: Any) -> tuple[str, ...]:
    spec = node.spec
    if spec is None:
        return ()
    return tuple(spec.pod_cidrs or ([spec.pod_cidr] if spec.pod_cidr else []))


def internal_ip_of(node: Any) -> str | None:
    """The node's InternalIP from its status, IPv4 preferred (the VXLAN underlay is IPv4)."""
    addresses = [a.address for a in (node.status.addresses or []) if a.type == "InternalIP"] \
        if node.status else []
    addresses.sort(key=lambda a: ipaddress.ip_address(a).version)
    return addresses[0] if addresses else None


def peer_from_node(node: Any) -> PeerNode | None:
    """What node_network needs from another node; None while it has no node IP or pod CIDR yet."""
    annotations = node.metadata.annotations or {}
    node_ip = annotations.get(ANNOTATION_NODE_IP) or internal_ip_of(node)
    pod_cidrs = pod_cidrs_of(node)
    if not node_ip or not pod_cidrs:
        return None
    return PeerNode(node.metadata.name, node_ip, pod_cidrs, annotations.get(ANNOTATION_VTEP_MAC))


def networking_view(node: Any) -> tuple[Any, ...]:
    """Everything a sync reads from a Node: equal views mean a change is irrelevant to us."""
    annotations = node.metadata.annotations or {}
    return (pod_cidrs_of(node), internal_ip_of(node), annotations.get(ANNOTATION_NODE_IP),
            annotations.get(ANNOTATION_VTEP_MAC))


class NodeController:
    """Watches Nodes and runs node syncs in its own thread (see module docstring)."""

    def __init__(self, api_client: client.ApiClient, config: AgentConfig, *, tracker: SyncTracker,
                 registry: CollectorRegistry) -> None:
        self.config = config
        self.tracker = tracker
        self._core = client.CoreV1Api(api_client)
        self.informer = Informer("nodes", self._core.list_node)
        self.informer.add_handler(self._on_node_event)
        self._loop = SyncLoop(CONTROLLER, self.reconcile, min_interval=config.min_sync_period)
        self._ipr: IPRoute | None = None
        self._network: VxlanNetwork | RoutedNetwork | None = None
        self._last_errors: dict[str, str] = {}
        self._last_waiting: list[str] = []
        self._entries = Gauge("netagent_node_network_entries", "Kernel entries programmed for other nodes",
                              registry=registry)
        self._node_errors = Gauge("netagent_node_network_errors",
                                  "Other nodes (or entries) that could not be programmed", registry=registry)

    def start(self) -> None:
        self.tracker.expect(CONTROLLER)
        self.tracker.watch_informer(self.informer)
        self.informer.start()
        self._loop.start()
        self._loop.request()  # sync even if the cluster has no Node events to deliver

    def stop(self) -> None:
        self.informer.stop()
        self._loop.stop()
        if self._ipr is not None:
            self._ipr.close()

    def _on_node_event(self, event_type: str, node: Any, old: Any) -> None:
        # Nodes are rewritten often for reasons we don't care about (status conditions, images,
        # heartbeats): only a change of what we program from a Node is worth a sync.
        if event_type == "MODIFIED" and networking_view(node) == networking_view(old):
            return
        self.tracker.changes_pending(CONTROLLER)
        self._loop.request()

    def reconcile(self) -> None:
        """One level-triggered pass; raises (and is retried) when this node cannot be set up yet."""
        if not self.informer.wait_for_sync(timeout=30):
            raise NodeNotReadyError("Node list not received from the API server yet")
        started = time.monotonic()
        try:
            me = self.informer.store.get(self.config.node_name)
            if me is None:
                raise NodeNotReadyError(f"Node {self.config.node_name!r} does not exist in the API server")
            pod_cidrs = pod_cidrs_of(me)
            if not pod_cidrs:
                raise NodeNotReadyError(f"Node {self.config.node_name!r} has no spec.podCIDRs assigned yet")
            mtu = self._setup_local(internal_ip_of(me), pod_cidrs)
            self._publish_annotations(me)
            self._write_node_state(pod_cidrs, mtu)
            if self._network is not None:
                self._program_peers()
        except Exception:
            self.tracker.failed(CONTROLLER)
            raise
        self.tracker.synced(CONTROLLER, time.monotonic() - started)

    def _setup_local(self, node_ip: str | None, pod_cidrs: tuple[str, ...]) -> int:
        """Create/verify this node's own device and addresses; returns the MTU pods must use."""
        cfg = self.config
        if self._ipr is None:
            self._ipr = IPRoute()
        underlay = find_underlay(self._ipr, cfg.underlay_iface, node_ip)
        if cfg.network == "none":
            return underlay.mtu
        if self._network is None or self._network.underlay != underlay:
            if cfg.network == "vxlan":
                self._network = VxlanNetwork(self._ipr, underlay, cfg.vxlan_vni, cfg.vxlan_port)
            else:
                self._network = RoutedNetwork(self._ipr, underlay)
        if isinstance(self._network, VxlanNetwork):
            self._network.setup(pod_cidrs)
            return underlay.mtu - VXLAN_OVERHEAD
        self._network.setup()
        return underlay.mtu

    def _publish_annotations(self, me: Any) -> None:
        wanted = {}
        if self._network is not None:
            wanted[ANNOTATION_NODE_IP] = self._network.underlay.node_ip
        if isinstance(self._network, VxlanNetwork):
            wanted[ANNOTATION_VTEP_MAC] = self._network.vtep_mac
        current = me.metadata.annotations or {}
        changed = {key: value for key, value in wanted.items() if current.get(key) != value}
        if changed:
            self._core.patch_node(self.config.node_name, {"metadata": {"annotations": changed}})
            log.info("published %s on Node %s", changed, self.config.node_name)

    def _write_node_state(self, pod_cidrs: tuple[str, ...], mtu: int) -> None:
        state = nodestate.NodeState(self.config.node_name, pod_cidrs, mtu, self.config.cluster_cidrs)
        try:
            if nodestate.read(self.config.node_state_path) == state:
                return
        except (OSError, ValueError, KeyError):
            pass  # missing or unreadable: (re)write it
        nodestate.write(state, self.config.node_state_path)
        log.info("wrote %s (pod CIDRs %s, MTU %d)", self.config.node_state_path, ",".join(pod_cidrs), mtu)

    def _program_peers(self) -> None:
        peers = []
        for node in self.informer.store.list():
            if node.metadata.name == self.config.node_name:
                continue
            peer = peer_from_node(node)
            if peer is None:
                log.debug("node %s has no node IP or pod CIDR yet; skipped", node.metadata.name)
            else:
                peers.append(peer)
        report = self._network.program_peers(peers)
        self._log_report(report, len(peers))

    def _log_report(self, report: SyncReport, peer_count: int) -> None:
        self._entries.set(report.entries)
        self._node_errors.set(len(report.errors))
        if report.added or report.changed or report.removed:
            log.info("node sync: %d peers, %d entries (+%d ~%d -%d)", peer_count, report.entries,
                     report.added, report.changed, report.removed)
        if report.waiting != self._last_waiting:
            if report.waiting:
                log.info("waiting for node(s) %s to publish %s", ", ".join(report.waiting),
                         ANNOTATION_VTEP_MAC)
            self._last_waiting = report.waiting
        for name, message in report.errors.items():
            if self._last_errors.get(name) != message:
                log.error("cannot program node %s: %s", name, message)
        for name in self._last_errors.keys() - report.errors.keys():
            log.info("node %s: programmed (earlier error resolved)", name)
        self._last_errors = report.errors
