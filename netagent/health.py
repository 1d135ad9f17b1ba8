"""The agent's health and metrics endpoints.

/healthz follows kube-proxy's contract so the same probes and dashboards work: 200 while every
controller has synced and has no change waiting longer than the timeout, 503 otherwise, with a JSON
body carrying lastUpdated/currentTime. /metrics is Prometheus text from a registry of our own (not
the process-global one) so several agents can live in one test process.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from netagent.http_endpoint import EndpointServer


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

    def healthz(self) -> tuple[bool, dict[str, str]]:
        now = time.time()
        with self._lock:
            stuck = any(now - since > self.timeout for since in self._pending_since.values())
            never = any(name not in self._last_synced for name in self._expected)
            last = max(self._last_synced.values(), default=0.0)
        body = {
            "lastUpdated": _iso(last) if last else "",
            "currentTime": _iso(now),
            "nodeEligible": True,
        }
        return not (stuck or never), body


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_bind(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError with the offending text otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthServer:
    """Serves /healthz (and /readyz, same check plus first sync done) on one address."""

    def __init__(self, address: str, tracker: SyncTracker) -> None:
        tracker_ref = tracker

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path not in ("/healthz", "/readyz"):
                    self.send_error(404)
                    return
                healthy, body = tracker_ref.healthz()
                payload = json.dumps(body).encode()
                self.send_response(200 if healthy else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # probes are not news
                return

        self._server = EndpointServer(parse_bind(address), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MetricsServer:
    """Prometheus /metrics for the agent's own registry."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                payload = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                return

        self._server = EndpointServer(parse_bind(address), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
