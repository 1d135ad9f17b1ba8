"""The service proxy inside `netagent run --proxy iptables|iptables-legacy|nftables`.

    ProxyController(api_client, config, *, tracker=None, resync_period=300.0, families=(4, 6), netns=None)
    .start() / .stop(); .ready (threading.Event, set after the first successful sync)

config is the agent's AgentConfig (node_name, proxy backend, cluster_cidrs, min_sync_period,
state_dir); tracker is netagent.health.SyncTracker (readiness waits for our first sync). The keywords
are for tests: netns names a netns for the kernel tools and healthCheckNodePort servers (the agent
already runs inside its node netns), families limits the IP families programmed.

Services and EndpointSlices are watched through netagent.kube.Informer; every change is handed to the
SnapshotBuilder (which marks that one service for rebuilding) and requests a sync; SyncLoop coalesces
bursts (at most one sync per min_sync_period, a failed sync retried with backoff, a periodic resync).
A sync takes one Snapshot from the builder and hands it to Proxier.apply, which changes only the
difference. Nothing syncs before both caches are listed: an empty
cache must never be mistaken for "no services" and wipe working rules after a restart.
The last applied snapshot goes to STATE_DIR/proxy-desired.json for `netagent proxy show`. Before
the first sync, rules another backend left behind (the node switched --proxy) are removed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kubernetes import client

from netagent.kube import Informer, SyncLoop, as_json
from netagent.proxy.backend import NodeContext
from netagent.proxy.healthcheck import HealthCheckServers
from netagent.proxy.proxier import Proxier
from netagent.proxy.service import Snapshot
from netagent.proxy.snapshot_builder import SnapshotBuilder
from nodekit import netns as netns_mod
from nodekit.files import atomic_write

if TYPE_CHECKING:
    from netagent.config import AgentConfig

log = logging.getLogger(__name__)

CONTROLLER = "proxy"
DESIRED_FILE = "proxy-desired.json"


def desired_path(state_dir: str) -> str:
    return os.path.join(state_dir, DESIRED_FILE)


class ProxyController:
    def __init__(
        self,
        api_client: client.ApiClient,
        config: AgentConfig,
        *,
        tracker: Any = None,
        resync_period: float = 300.0,
        families: tuple[int, ...] = (4, 6),
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.node = NodeContext(config.node_name, tuple(config.cluster_cidrs))
        self.tracker = tracker  # netagent.health.SyncTracker, optional
        self.ready = threading.Event()
        health = HealthCheckServers(netns_path=netns_mod.path(netns) if netns else None)
        self.proxier = Proxier(config.proxy, self.node, families, netns, health)
        # JSON, not the client's models: service_parser checks every field it reads and leaves out
        # exactly the Service or EndpointSlice that is malformed, with the reason in `proxy show`
        self.services = Informer(
            "services",
            client.CoreV1Api(api_client).list_service_for_all_namespaces,
            decode=as_json,
            resync_period=resync_period,
        )
        self.slices = Informer(
            "endpointslices",
            client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
            decode=as_json,
            resync_period=resync_period,
        )
        self._loop = SyncLoop(
            CONTROLLER, self._apply_snapshot, min_interval=config.min_sync_period, max_interval=resync_period
        )
        header = {
            "backend": config.proxy,
            "node_name": config.node_name,
            "cluster_cidrs": list(config.cluster_cidrs),
            "families": list(families),
        }
        self._writer = DesiredStateWriter(desired_path(config.state_dir), header)
        self._builder = SnapshotBuilder(config.node_name)
        self._stopping = threading.Event()

    def start(self) -> None:
        if self.tracker:
            self.tracker.expect(CONTROLLER)
            for informer in (self.services, self.slices):
                self.tracker.watch_informer(informer)
        self.services.add_handler(self._on_service_event)
        self.slices.add_handler(self._on_slice_event)
        for informer in (self.services, self.slices):
            informer.start()
        self._loop.start()
        threading.Thread(target=self._sync_once_listed, name="proxy-first-list", daemon=True).start()

    def stop(self) -> None:
        """Stops watching; the kernel rules stay, so traffic keeps flowing across a restart."""
        self._stopping.set()
        self._loop.stop()
        for informer in (self.services, self.slices):
            informer.stop()
        if self.proxier.health:
            self.proxier.health.stop()
        self._writer.stop()

    def _sync_once_listed(self) -> None:
        """Request the first sync when both caches are listed (even empty ones bring no events)."""
        try:
            self.proxier.remove_other_backends()
        except Exception:  # stale rules of another mode are worth a warning, not a dead proxy
            log.warning("could not remove another proxy backend's rules", exc_info=True)
        for informer in (self.services, self.slices):
            while not informer.wait_for_sync(timeout=1.0):
                if self._stopping.is_set():
                    return
        self._loop.request()

    def _on_service_event(self, event_type: str, obj: Any, old: Any) -> None:
        self._builder.service_changed(obj, deleted=event_type == "DELETED")
        self._request_sync()

    def _on_slice_event(self, event_type: str, obj: Any, old: Any) -> None:
        self._builder.slice_changed(obj, deleted=event_type == "DELETED")
        self._request_sync()

    def _request_sync(self) -> None:
        if self.tracker:
            self.tracker.changes_pending(CONTROLLER)
        self._loop.request()

    def _apply_snapshot(self) -> None:
        """One round of the SyncLoop: the builder's current snapshot, applied."""
        started = time.monotonic()
        if not (self.services.synced and self.slices.synced):
            log.debug("proxy sync deferred: caches not listed yet (_sync_once_listed requests it)")
            return
        snapshot = self._builder.snapshot()  # rebuilds only the services the events touched
        try:
            changed = self.proxier.apply(snapshot)
        except Exception:
            if self.tracker:
                self.tracker.failed(CONTROLLER)
            raise
        self._writer.publish(snapshot)
        duration = time.monotonic() - started
        if self.tracker:
            self.tracker.synced(CONTROLLER, duration)
        if changed or not self.ready.is_set():
            log.info(
                "proxy synced %d service ports (%d skipped) in %.3fs",
                len(snapshot.ports),
                len(snapshot.skipped),
                duration,
            )
        self.ready.set()


class DesiredStateWriter:
    """Writes the last applied snapshot to STATE/proxy-desired.json for `netagent proxy show`, off the
    sync path (10,000 services are megabytes of JSON and seconds of CPU): a background thread writes
    the newest snapshot, skipping any that were superseded meanwhile."""

    def __init__(self, path: str, header: dict) -> None:
        self.path = path
        self.header = header
        self._lock = threading.Lock()
        self._pending: Snapshot | None = None
        self._written: Snapshot | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy-desired-writer", daemon=True)
        self._thread.start()

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._pending = snapshot
        self._wake.set()

    def stop(self) -> None:
        """Writes what is pending, then ends the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        with self._lock:
            snapshot, self._pending = self._pending, None
        if snapshot is None or snapshot == self._written:
            return
        document = {**self.header, "snapshot": snapshot.to_dict()}
        try:
            atomic_write(self.path, json.dumps(document, separators=(",", ":")) + "\n")
            self._written = snapshot
        except OSError as err:
            log.warning("cannot write %s for `netagent proxy show`: %s", self.path, err)
