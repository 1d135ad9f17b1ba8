"""The threaded HTTP server behind the agent's probe endpoints (/healthz, /metrics, healthCheckNodePorts).

http.server's HTTPServer.server_bind looks its own address up with socket.getfqdn(), a reverse DNS
query. On a node whose resolver silently drops packets that stalls every listener's start by the
resolver timeout (~10 s each). Probe endpoints never use the name, so binding skips the lookup.
"""

from __future__ import annotations

import socketserver
from http.server import ThreadingHTTPServer


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port
