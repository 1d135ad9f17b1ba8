"""Talking to responders from inside a namespace: the primitive every connectivity check uses.

The socket is created inside the source netns (setns on this thread only) and then used from here,
so one Python process can probe from every pod and node without starting a process per probe.
"""

from __future__ import annotations

import socket

from netns_lab.responder import parse_name

from nodekit import netns

DEFAULT_TIMEOUT = 3.0


def _socket_in(source_netns: str, kind: int) -> socket.socket:
    with netns.entered(netns.path(source_netns)):
        return socket.socket(socket.AF_INET, kind)


def tcp_name(source_netns: str, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Connect from source_netns, send an HTTP request, return the name the responder answered."""
    with _socket_in(source_netns, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return parse_name(answer)


def http_get(source_netns: str, host: str, port: int, path: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The HTTP status ("200 OK") of a GET made from inside source_netns."""
    with _socket_in(source_netns, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    status_line = answer.decode(errors="replace").split("\r\n", 1)[0]
    return status_line.partition(" ")[2] or "no HTTP answer"


def udp_name(source_netns: str, host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
             attempts: int = 3) -> str:
    """Send a datagram from source_netns (retried: UDP may drop the first while ARP resolves)."""
    with _socket_in(source_netns, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout / attempts)
        sock.connect((host, port))
        for attempt in range(attempts):
            sock.send(b"who\n")
            try:
                return sock.recv(4096).decode(errors="replace").strip()
            except TimeoutError:
                if attempt == attempts - 1:
                    raise
    raise AssertionError("unreachable")
