"""The small HTTP listeners behind the agent's probe endpoints (/healthz, /metrics, healthCheckNodePorts).

http.server's HTTPServer.server_bind looks its own address up with socket.getfqdn(), a reverse DNS
query. On a node whose resolver silently drops packets that stalls every listener's start by the
resolver timeout (~10 s each). Probe endpoints never use the name, so binding skips the lookup.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# a route answers GET with (status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port


class ProbeServer:
    """GET-only listener on one address: each path is answered by its route, anything else is 404."""

    def __init__(self, address: tuple[str, int], routes: Mapping[str, Route], name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                status, content_type, payload = route()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # probes and scrapes are not news
                return

        self._server = EndpointServer(address, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
