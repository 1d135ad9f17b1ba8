"""The tiny server the lab runs in every pod and node: it answers with its own name.

`lab check` proves connectivity by what comes back, not by a connect alone: an answer naming the
expected pod shows the packet reached that pod (and, for a ClusterIP, which backend it reached).
One port, both protocols:
  TCP  a minimal HTTP/1.0 server: any request gets "200 OK" with body "<name>\\n" (so curl works too)
  UDP  every datagram is answered with "<name>\\n"

    python -m netns_lab.responder --name NAME [--port 8080]
"""

from __future__ import annotations

import argparse
import socketserver
import threading

DEFAULT_PORT = 8080
_MAX_REQUEST = 8192


def http_response(name: str) -> bytes:
    body = f"{name}\n".encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def parse_name(answer: bytes) -> str:
    """The responder's name out of a TCP (HTTP) or UDP answer."""
    return answer.rpartition(b"\r\n\r\n")[2].decode(errors="replace").strip()


class _HttpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(2.0)
        received = b""
        try:  # read the request head before answering, so closing never resets unread data
            while b"\r\n\r\n" not in received and len(received) < _MAX_REQUEST:
                chunk = self.request.recv(1024)
                if not chunk:
                    break
                received += chunk
            self.request.sendall(http_response(self.server.responder_name))
        except OSError:
            pass


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        _, sock = self.request
        sock.sendto(f"{self.server.responder_name}\n".encode(), self.client_address)


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(name: str, port: int = DEFAULT_PORT) -> None:
    tcp = _TcpServer(("0.0.0.0", port), _HttpHandler)
    udp = socketserver.UDPServer(("0.0.0.0", port), _UdpHandler)
    for server in (tcp, udp):
        server.responder_name = name
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    tcp.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args()
    try:
        serve(args.name, args.port)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise SystemExit(f"responder: cannot serve on port {args.port}: {e}") from None


if __name__ == "__main__":
    main()
