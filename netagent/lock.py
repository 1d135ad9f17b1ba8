"""One agent per node: an exclusive flock on STATE_DIR/agent.lock.

Two agents programming the same kernel state would fight over it, so the second one must refuse to
start (as flannel does with /run/flannel). flock is released by the kernel when the holder dies, even
by SIGKILL, so a crashed agent never blocks its successor. The holder's pid is written into the file
only to make the refusal message useful; the lock itself is the flock, not the file's content.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


class LockHeldError(RuntimeError):
    """Another live process holds the agent lock."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        holder = f"pid {holder_pid}" if holder_pid else "another process"
        super().__init__(
            f"another netagent is already running on this node: {path} is locked by {holder}"
        )
        self.path = path
        self.holder_pid = holder_pid


class AgentLock:
    """Held from acquire() until release() or process exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; raises LockHeldError if someone else has it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; the file stays (removing it would race with a starting successor)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> AgentLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
