"""The agent side of the fast CNI path: warm Python serving plugin requests over a unix socket.

The runtime execs the small C shim (cni/shim.c) per pod; the shim forwards the request here, where
pyroute2 is already imported, and `cni.plugin.handle` does exactly what the exec'd plugin would. The
shim falls back to exec'ing the Python plugin when nobody listens, so the agent being down costs
speed, never correctness.

Wire protocol (one request per connection; integers are unsigned 32-bit big-endian):

    shim -> agent   b"NAC1"                     magic and protocol version
                    u32 env_len, env_len bytes  "KEY=VALUE\\0" for each CNI_* variable
                    u32 stdin_len, stdin bytes  the network config exactly as the runtime sent it
    agent -> shim   u32 exit_code               what the plugin would exit with
                    stdout bytes until EOF      what the plugin would print

Only root may connect: the socket is mode 0600 inside a 0700 directory, and the peer's uid is
checked again with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from cni.plugin import handle

log = logging.getLogger(__name__)

MAGIC = b"NAC1"
MAX_ENV = 64 * 1024
MAX_STDIN = 16 * 1024 * 1024
REQUEST_READ_TIMEOUT = 30.0  # a client that stalls mid-request must not pin a worker forever
WORKERS = 16  # requests served at once; more wait in line (allocations serialize on the IPAM lock anyway)
_U32 = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class ProtocolError(Exception):
    pass


class CniService:
    """Serves CNI requests on `socket_path` from a pool of long-lived worker threads.

    Long-lived workers keep their node netlink socket between requests (see cni.links.node_iproute).
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None

    def start(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.socket_path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        # bind under a temporary name, restrict it, then rename: the final path is never connectable
        # with looser permissions, and a stale socket of a previous agent is replaced atomically
        staging = f"{self.socket_path}.{os.getpid()}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(staging)
            os.chmod(staging, 0o600)
            listener.listen(128)
            os.replace(staging, self.socket_path)
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        self._listener = listener
        self._workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cni-request")
        self._acceptor = threading.Thread(target=self._accept_loop, name="cni-service", daemon=True)
        self._acceptor.start()
        log.debug("CNI service listening on %s", self.socket_path)

    def stop(self) -> None:
        """Stop accepting; requests already accepted are still answered."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _accept_loop(self) -> None:
        listener, workers = self._listener, self._workers
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stop() closed the listener
            workers.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                _check_peer(conn)
                conn.settimeout(REQUEST_READ_TIMEOUT)
                env, stdin = read_request(conn)
                conn.settimeout(None)
                code, stdout = handle(env, stdin)
                conn.sendall(_U32.pack(code) + stdout)
            except (OSError, ProtocolError) as e:
                log.warning("CNI request dropped: %s", e)


def read_request(conn: socket.socket) -> tuple[dict[str, str], bytes]:
    if _recv_exact(conn, len(MAGIC)) != MAGIC:
        raise ProtocolError("bad magic: not a netagent CNI shim")
    env_block = _recv_exact(conn, _recv_length(conn, MAX_ENV))
    stdin = _recv_exact(conn, _recv_length(conn, MAX_STDIN))
    env = {}
    for item in env_block.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            env[key] = value
    return env, stdin


def encode_request(env: dict[str, str], stdin: bytes) -> bytes:
    """The shim's side of the protocol, for Python clients (tests, tools)."""
    env_block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return MAGIC + _U32.pack(len(env_block)) + env_block + _U32.pack(len(stdin)) + stdin


def _check_peer(conn: socket.socket) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(creds)
    if uid not in (0, os.getuid()):
        raise ProtocolError(f"refusing a client with uid {uid}")


def _recv_length(conn: socket.socket, limit: int) -> int:
    (length,) = _U32.unpack(_recv_exact(conn, _U32.size))
    if length > limit:
        raise ProtocolError(f"field of {length} bytes exceeds the limit of {limit}")
    return length


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 20))
        if not chunk:
            raise ProtocolError("client closed the connection mid-request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
