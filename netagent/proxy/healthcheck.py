"""healthCheckNodePort servers for externalTrafficPolicy: Local services.

A cloud load balancer probes every node on the service's healthCheckNodePort and only sends traffic
to nodes answering 200 (policy.HealthCheck: nodes with a READY local endpoint, as kube-proxy; the body
says how many); 503 otherwise. One small HTTP server per port, started and stopped as services come
and go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler

from netagent.http_endpoint import EndpointServer
from netagent.proxy.service import ServicePort
from nodekit import netns as netns_mod

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: _HealthServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        namespace, name, count = self.server.status
        body = json.dumps(
            {"service": {"namespace": namespace, "name": name}, "localEndpoints": count}
        ).encode()
        self.send_response(200 if count > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes are frequent: keep quiet
        pass


class _HealthServer(EndpointServer):
    status: tuple[str, str, int] = ("", "", 0)


class HealthCheckServers:
    """Keeps one server per healthCheckNodePort of the current snapshot."""

    def __init__(self, bind_address: str = "", netns_path: str | None = None) -> None:
        self.bind_address = bind_address
        self.netns_path = netns_path  # listen inside this netns (tests); None = where we run
        self._servers: dict[int, _HealthServer] = {}

    def update(self, ports: Iterable[ServicePort]) -> None:
        wanted: dict[int, tuple[str, str, int]] = {}
        for p in ports:
            check = p.policy.health_check
            if check:  # the ports (and families) of one Service share it: the highest count answers
                _, _, count = wanted.get(check.node_port, ("", "", 0))
                wanted[check.node_port] = (p.namespace, p.name, max(count, check.local_ready))
        for port in set(self._servers) - set(wanted):
            self._stop(port)
        for port, status in wanted.items():
            if port not in self._servers:
                try:
                    self._servers[port] = self._start(port)
                except OSError as err:
                    log.warning("healthCheckNodePort %d for %s/%s: %s", port, status[0], status[1], err)
                    continue
            self._servers[port].status = status

    def stop(self) -> None:
        for port in list(self._servers):
            self._stop(port)

    def _start(self, port: int) -> _HealthServer:
        with netns_mod.entered(self.netns_path) if self.netns_path else contextlib.nullcontext():
            server = _HealthServer((self.bind_address, port), _Handler)
        threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
        return server

    def _stop(self, port: int) -> None:
        server = self._servers.pop(port)
        server.shutdown()
        server.server_close()
