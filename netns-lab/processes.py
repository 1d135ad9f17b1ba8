"""The lab's background processes: start them detached, find them again, stop them for good.

Every process the lab starts (API server, agents, responders in pods) outlives the command that
started it, so it is recorded as a ProcRef: pid plus the kernel's start time, which together name one
process even after pids wrap around. `lab down` does not trust the record alone (an `up` killed
half-way may not have written it): it also sweeps /proc for anything living in one of the lab's
network namespaces or naming the lab's directory on its command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

KILL_WAIT = 5.0  # seconds a SIGKILLed process may take to disappear


@dataclass(frozen=True)
class ProcRef:
    pid: int
    start_time: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> ProcRef:
        return cls(pid=int(data["pid"]), start_time=int(data["start_time"]))

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a later process reusing the pid)."""
        stat = _stat_fields(self.pid)
        return stat is not None and stat[1] != "Z" and int(stat[20]) == self.start_time


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat split after the command name (which may contain spaces): [state, ppid, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return [text[: text.index(" ")], *text[text.rindex(")") + 2 :].split()]


def spawn(argv: Sequence[str], log_path: str, env: dict[str, str] | None = None) -> ProcRef:
    """Start argv detached (own session, stdin closed, output appended to log_path, made 0600: logs
    name pods, addresses and paths that are nobody else's business)."""
    with open_log(log_path) as log:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
    ref = proc_ref(proc.pid)
    if ref is None:
        raise RuntimeError(f"could not read the start time of {argv[0]} (pid {proc.pid})")
    return ref


def open_log(path: str) -> BinaryIO:
    """`path` opened for appending, created (or left) readable by root only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def proc_ref(pid: int) -> ProcRef | None:
    """The ProcRef of a child just started (its start time is there as soon as the kernel made the
    task, but give it a moment); None if it cannot be read."""
    for _ in range(100):
        stat = _stat_fields(pid)
        if stat is not None:
            return ProcRef(pid, int(stat[20]))
        time.sleep(0.01)
    return None


def stop(procs: Iterable[ProcRef], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left (grace 0: SIGKILL at once).

    Returns once they are all gone (or after KILL_WAIT for a process stuck in the kernel).
    """
    living = [p for p in procs if p.alive()]
    if grace > 0:
        for p in living:
            _signal(p.pid, signal.SIGTERM)
        living = _wait_for_exit(living, grace)
    for p in living:
        _signal(p.pid, signal.SIGKILL)
    _wait_for_exit(living, KILL_WAIT)


def _wait_for_exit(procs: list[ProcRef], seconds: float) -> list[ProcRef]:
    """The processes still alive after waiting up to `seconds` for them."""
    deadline = time.monotonic() + seconds
    while procs and time.monotonic() < deadline:
        time.sleep(0.02)
        procs = [p for p in procs if p.alive()]
    return procs


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def find(matches: Callable[[int], bool]) -> list[ProcRef]:
    """Every live process (except this one and its ancestors) for which matches(pid) is true."""
    spared = _self_and_ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        pid = int(entry)
        stat = _stat_fields(pid)
        if stat is None or stat[1] == "Z":
            continue
        try:
            if matches(pid):
                found.append(ProcRef(pid, int(stat[20])))
        except OSError:  # it exited while we looked
            continue
    return found


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _stat_fields(pid)
        if stat is None:
            break
        pid = int(stat[2])
    return pids | {1}


def netns_inode(pid: int) -> tuple[int, int]:
    """The identity (device, inode) of the network namespace process `pid` lives in."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return (st.st_dev, st.st_ino)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
