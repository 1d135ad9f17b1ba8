"""The agent's health and metrics endpoints.

/healthz follows kube-proxy's contract so the same probes and dashboards work: 200 while every
controller has synced and has no change waiting longer than the timeout, 503 otherwise, with a JSON
body carrying lastUpdated/currentTime. A watched informer whose list/watch the API server keeps
refusing for this agent (a 4xx, an undecodable list) for longer than the timeout also makes it 503:
no change can reach the kernel. An API server that is down or answering 5xx does not: every node
would turn unhealthy at once and a load balancer would drain them all, while the rules they hold are
still the last known truth; the informer-failing metric shows that case. A CNI call still running
past its deadline makes it 503 too: its worker is lost until the agent restarts.
/metrics is Prometheus text from a registry of our own (not the process-global one) so several
agents can live in one test process.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from netagent.http_endpoint import ProbeServer


class SyncTracker:
    """Per-controller sync bookkeeping that /healthz and readiness are computed from.

    A controller calls changes_pending() when it learns of a change and synced() after applying
    it. It is healthy once it has synced at least once and no change has waited longer than
    `timeout` seconds (a stuck or failing controller turns unhealthy, an idle one stays healthy).
    """

    def __init__(self, registry: CollectorRegistry, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._last_synced: dict[str, float] = {}
        self._pending_since: dict[str, float] = {}
        self._expected: set[str] = set()
        self._informers: list[Any] = []
        self._cni_services: list[Any] = []
        self._informer_failing = Gauge(
            "netagent_informer_failing", "1 while an informer's list/watch fails (outage or refusal)",
            ["kind"], registry=registry,
        )
        self._informer_invalid = Gauge(
            "netagent_informer_invalid_objects", "Objects left out because they cannot be decoded",
            ["kind"], registry=registry,
        )
        self._cni_workers = Gauge(
            "netagent_cni_workers", "CNI service worker threads, by pool", ["pool"], registry=registry,
        )
        self._cni_busy = Gauge(
            "netagent_cni_workers_busy", "CNI service workers running a call: all busy means new calls are "
            "declined to the shim's own plugin", ["pool"], registry=registry,
        )
        self._cni_overdue = Gauge(
            "netagent_cni_calls_overdue", "CNI calls still running past their deadline, each holding a "
            "worker", registry=registry,
        )
        self._cni_overdue.set_function(self._overdue_cni_calls)
        self.sync_total = Counter(
            "netagent_sync_total", "Syncs run, by controller and result", ["controller", "result"],
            registry=registry,
        )
        self.sync_seconds = Histogram(
            "netagent_sync_duration_seconds", "Time to compute and apply one sync", ["controller"],
            registry=registry,
        )
        self.last_sync_timestamp = Gauge(
            "netagent_last_sync_timestamp_seconds", "Unix time of the last successful sync",
            ["controller"], registry=registry,
        )

    def expect(self, controller: str) -> None:
        """Register a controller whose first sync readiness must wait for."""
        with self._lock:
            self._expected.add(controller)
            self._pending_since.setdefault(controller, time.time())

    def watch_informer(self, informer: Any) -> None:
        """Count a netagent.kube.Informer's failures and skipped objects in /metrics and /healthz."""
        with self._lock:
            self._informers.append(informer)
        self._informer_failing.labels(informer.kind).set_function(lambda: informer.failing_since is not None)
        self._informer_invalid.labels(informer.kind).set_function(lambda: len(informer.invalid))

    def watch_cni_service(self, service: Any) -> None:
        """Show a netagent.cni_service.CniService's workers in /metrics; an overdue call fails /healthz
        (its worker is lost until the agent restarts, and enough of them leave no worker at all)."""
        with self._lock:
            self._cni_services.append(service)
        for pool in service.pools:
            self._cni_workers.labels(pool.name).set(pool.size)
            self._cni_busy.labels(pool.name).set_function(lambda pool=pool: pool.busy)

    def _overdue_cni_calls(self) -> int:
        with self._lock:
            services = list(self._cni_services)
        return sum(service.overdue() for service in services)

    def changes_pending(self, controller: str) -> None:
        with self._lock:
            self._pending_since.setdefault(controller, time.time())

    def synced(self, controller: str, duration: float) -> None:
        now = time.time()
        with self._lock:
            self._last_synced[controller] = now
            self._pending_since.pop(controller, None)
        self.sync_total.labels(controller, "ok").inc()
        self.sync_seconds.labels(controller).observe(duration)
        self.last_sync_timestamp.labels(controller).set(now)

    def failed(self, controller: str) -> None:
        self.sync_total.labels(controller, "error").inc()

    def ready(self) -> bool:
        """Every expected controller has completed its first sync."""
        with self._lock:
            return all(name in self._last_synced for name in self._expected)

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        with self._lock:
            stuck = any(now - since > self.timeout for since in self._pending_since.values())
            never = any(name not in self._last_synced for name in self._expected)
            last = max(self._last_synced.values(), default=0.0)
            refused = [
                f"{informer.kind}: {informer.last_error}"
                for informer in self._informers
                if informer.failure_is_ours and now - (informer.failing_since or now) > self.timeout
            ]
        body: dict[str, Any] = {
            "lastUpdated": _iso(last) if last else "",
            "currentTime": _iso(now),
            "nodeEligible": True,
        }
        if refused:
            body["watchesRefused"] = refused
        overdue = self._overdue_cni_calls()
        if overdue:
            body["cniCallsOverdue"] = overdue
        return not (stuck or never or refused or overdue), body


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_bind(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError with the offending text otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthServer(ProbeServer):
    """Serves /healthz (and /readyz, the same check) on one address."""

    def __init__(self, address: str, tracker: SyncTracker) -> None:
        def healthz() -> tuple[int, str, bytes]:
            healthy, body = tracker.healthz()
            return (200 if healthy else 503), "application/json", json.dumps(body).encode()

        super().__init__(parse_bind(address), {"/healthz": healthz, "/readyz": healthz}, "healthz")


class MetricsServer(ProbeServer):
    """Prometheus /metrics for the agent's own registry."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        def metrics() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

        super().__init__(parse_bind(address), {"/metrics": metrics}, "metrics")
