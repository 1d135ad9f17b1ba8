"""STATE/gc.json: what the collector keeps across passes and restarts, shown by `netagent gc` and
`lab status`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from nodekit.files import atomic_write

STATE_FILE = "gc.json"


@dataclass
class GcState:
    """What gc.json keeps across passes and restarts: running totals and orphan veths under watch."""

    passes: int = 0
    last_pass: float | None = None  # epoch seconds
    released: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> reason -> count
    orphan_veths_seen: dict[str, float] = field(default_factory=dict)  # "name@ifindex" -> first seen

    def count(self, kind: str) -> int:
        return sum(self.released.get(kind, {}).values())

    def summary(self) -> str:
        if not self.passes:
            return "no GC pass yet"
        ago = time.time() - (self.last_pass or 0)
        reasons = {}
        for by_reason in self.released.values():
            for reason, n in by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        passes = f"{self.passes} pass{'es' if self.passes > 1 else ''} (last {ago:.0f}s ago)"
        released = f"released {self.count('allocation')} allocations and {self.count('veth')} veths"
        return f"{passes}, {released}" + (f" ({why})" if why else "")


def read_state(state_dir: str) -> GcState:
    """The collector's totals; empty when no pass ran yet or the file is unreadable (never fatal)."""
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            data = json.load(f)
        return GcState(**{key: data[key] for key in asdict(GcState()) if key in data})
    except (OSError, ValueError, TypeError):
        return GcState()


@contextlib.contextmanager
def updating_state(state_dir: str, save: bool) -> Iterator[GcState]:
    """Read-modify-write gc.json under a lock: the agent and a `netagent gc` by hand may overlap."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, STATE_FILE + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = read_state(state_dir)
        yield state
        if save:
            atomic_write(os.path.join(state_dir, STATE_FILE), json.dumps(asdict(state), indent=2) + "\n")
    finally:
        os.close(fd)
