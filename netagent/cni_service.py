"""The agent side of the fast CNI path: warm Python serving plugin requests over a unix socket.

The runtime execs the small C shim (cni/shim.c) per pod; the shim forwards the request here, where
pyroute2 is already imported, and `cni.plugin.handle` does exactly what the exec'd plugin would. The
shim falls back to exec'ing the Python plugin when nobody listens, so the agent being down costs
speed, never correctness.

Wire protocol (one request per connection; integers are unsigned 32-bit big-endian):

    agent -> shim   b"NAC2", u32 deadline_ms    greeting: send the request; it is answered within
                                                deadline_ms of arriving
    shim -> agent   b"NAC2"                     magic and protocol version
                    u32 env_len, env_len bytes  "KEY=VALUE\\0" for each CNI_* variable
                    u32 stdin_len, stdin bytes  the network config exactly as the runtime sent it
    agent -> shim   u32 exit_code               what the plugin would exit with, or DECLINED
                    stdout bytes until EOF      what the plugin would print

Who runs a request is never in doubt, so none runs twice (a double ADD): the shim runs the plugin
itself only when the agent provably does not, i.e. it closes or stays silent before its greeting
(no request was sent yet), the request could not be sent whole, or the answer is DECLINED (no
worker was free within QUEUE_WAIT: busy). Otherwise the agent may be running it, and a shim with no
answer fails rather than running it again. A call still running at its deadline is answered with
TIMED_OUT; its worker stays taken until it returns, and such an overdue call makes /healthz fail.

VERSION and STATUS have workers of their own, so they answer while every kernel worker is taken.

Only root may connect: the socket is mode 0600 inside a 0700 directory, and the peer's uid is
checked again with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cni import errors
from cni.errors import CniError
from cni.plugin import LATEST_VERSION, answer_version, handle

log = logging.getLogger(__name__)

MAGIC = b"NAC2"
MAX_ENV = 64 * 1024
MAX_STDIN = 16 * 1024 * 1024
DECLINED = 0xFFFFFFFF  # in place of an exit code: not run and never will be, the shim runs the plugin
CALL_DEADLINE = 60.0  # seconds from a request's arrival to its answer
QUEUE_WAIT = 2.0  # how long a request may wait for a free worker before it is declined
IO_TIMEOUT = 10.0  # a client that stalls mid-request (or does not read its answer) is dropped
MAX_CONNECTIONS = 256  # more are closed before the greeting: their shims run the plugin themselves
KERNEL_WORKERS = 16  # ADD/DEL/CHECK/GC at once (allocations serialize on the IPAM lock anyway)
QUERY_WORKERS = 4  # everything else: VERSION, STATUS, and requests refused before any work
KERNEL_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "GC"})
_U32 = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

T = TypeVar("T")


class ProtocolError(Exception):
    pass


class Busy(Exception):
    """No worker freed up in time: the call was not run."""


class WorkerPool:
    """A fixed set of long-lived threads (they keep their node netlink socket between requests, see
    cni.links.node_iproute) whose calls each have a deadline.

    A thread cannot be stopped, so a call past its deadline keeps its thread until it returns:
    `overdue` counts those, the evidence of a stuck service.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._free = threading.BoundedSemaphore(size)
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"cni-{name}")
        self._lock = threading.Lock()
        self._deadlines: dict[object, float] = {}  # running call -> its deadline (time.monotonic)

    def run(self, call: Callable[[], T], deadline: float, wait: float) -> T:
        """call() on a free thread; Busy when none frees within `wait`, TimeoutError at `deadline`."""
        if not self._free.acquire(timeout=max(0.0, min(wait, deadline - time.monotonic()))):
            raise Busy
        key = object()
        with self._lock:
            self._deadlines[key] = deadline

        def forget() -> None:
            with self._lock:
                del self._deadlines[key]
            self._free.release()

        def tracked() -> T:
            try:
                return call()
            finally:
                forget()

        try:
            future = self._threads.submit(tracked)
        except RuntimeError:  # shut down
            forget()
            raise Busy from None
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._deadlines)

    def overdue(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for deadline in self._deadlines.values() if deadline < now)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False)


class CniService:
    """Serves CNI requests on `socket_path`: a thread per connection reads the request, a
    WorkerPool runs it (kernel commands and the others in separate pools)."""

    def __init__(
        self, socket_path: str, call_deadline: float = CALL_DEADLINE, queue_wait: float = QUEUE_WAIT
    ) -> None:
        self.socket_path = socket_path
        self.call_deadline = call_deadline
        self.queue_wait = queue_wait
        self._kernel = WorkerPool("kernel", KERNEL_WORKERS)
        self._query = WorkerPool("query", QUERY_WORKERS)
        self.pools = (self._kernel, self._query)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def overdue(self) -> int:
        """Calls still running past their deadline, each holding a worker."""
        return sum(pool.overdue() for pool in self.pools)

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
        for pool in self.pools:
            pool.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _accept_loop(self) -> None:
        listener = self._listener
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._listener is listener:  # out of fds or memory: shims fall back meanwhile
                    log.warning("CNI service cannot accept: %s", e)
                    time.sleep(0.1)
                continue
            # a connection closed before the greeting is one the shim runs its own plugin for
            if not self._connections.acquire(blocking=False):
                log.warning("CNI request left to the shim's own plugin: %d connections open", MAX_CONNECTIONS)
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="cni-connection", daemon=True).start()
            except RuntimeError as e:  # no thread to be had
                log.warning("CNI request left to the shim's own plugin: %s", e)
                conn.close()
                self._connections.release()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(IO_TIMEOUT)
                _check_peer(conn)
                conn.sendall(MAGIC + _U32.pack(round(self.call_deadline * 1000)))
                code, stdout = self._answer(conn)
                conn.sendall(_U32.pack(code) + stdout)
        except (OSError, ProtocolError) as e:
            log.warning("CNI request dropped: %s", e)
        finally:
            self._connections.release()

    def _answer(self, conn: socket.socket) -> tuple[int, bytes]:
        try:
            env, stdin = read_request(conn)
        except CniError as e:  # a frame over its limit: retrying cannot help
            return 1, e.to_json(LATEST_VERSION)
        command = env.get("CNI_COMMAND", "")
        pool = self._kernel if command in KERNEL_COMMANDS else self._query
        deadline = time.monotonic() + self.call_deadline
        try:
            return pool.run(lambda: handle(env, stdin), deadline, self.queue_wait)
        except Busy:
            log.warning("CNI %s declined: all %d %s workers busy", command, pool.size, pool.name)
            return DECLINED, b""
        except TimeoutError:
            container = env.get("CNI_CONTAINERID", "")
            log.error("CNI %s %s still running after %gs", command, container, self.call_deadline)
            msg = f"CNI {command} did not finish within {self.call_deadline:g} s"
            timed_out = CniError(errors.TIMED_OUT, msg, "it may still complete: its outcome is unknown")
            return 1, timed_out.to_json(_requested_version(stdin))


def read_request(conn: socket.socket) -> tuple[dict[str, str], bytes]:
    if _recv_exact(conn, len(MAGIC)) != MAGIC:
        raise ProtocolError("bad magic: not a netagent CNI shim of this version")
    env_block = _recv_exact(conn, _recv_length(conn, MAX_ENV, errors.INVALID_ENV, "the CNI_* environment"))
    stdin = _recv_exact(conn, _recv_length(conn, MAX_STDIN, errors.DECODE_FAILURE, "the network config"))
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


def _requested_version(stdin: bytes) -> str:
    """The config's cniVersion for an error object written here (the latest when unreadable)."""
    with contextlib.suppress(ValueError, RecursionError):
        return answer_version(json.loads(stdin))
    return LATEST_VERSION


def _check_peer(conn: socket.socket) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _, uid, _ = _PEERCRED.unpack(creds)
    if uid not in (0, os.getuid()):
        raise ProtocolError(f"refusing a client with uid {uid}")


def _recv_length(conn: socket.socket, limit: int, code: int, what: str) -> int:
    (length,) = _U32.unpack(_recv_exact(conn, _U32.size))
    if length > limit:
        raise CniError(code, f"{what} is {length} bytes, over the {limit} the agent accepts")
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
