"""The kubelet's part for a lab node's agent: run it, and start it again whenever it dies.

In a cluster the agent is a DaemonSet pod: if it crashes or is killed (SIGKILL, OOM), the kubelet
starts it again, after a back-off that grows while it keeps dying. The lab has no kubelet, and
something has to be the agent's parent to notice its death at once (a process cannot outlive a
SIGKILL to restart itself, and polling from the next `lab` command would leave the node without an
agent until someone types one), so each node gets this small process:

    python -m netns_lab.supervisor --status STATUS.json --ready-marker READY --log AGENT.log -- ARGV...

- Before every start the agent's ready marker is removed: readiness then always means *this* agent
  (a SIGKILLed agent never removes its own).
- Back-off as the kubelet's: the first restart at once, then 10 s, doubling to 5 minutes; an agent
  that ran 10 minutes starts the count again.
- STATUS.json (0600, replaced atomically) says what `lab status` shows: the agent's pid and start
  time, restarts, state (running / waiting / stopped), how it last exited, when it starts again.
- SIGTERM/SIGINT stop it: the agent gets SIGTERM (it leaves kernel state in place), SIGKILL after
  --grace seconds; then the supervisor exits. `lab down` and `restart_agent` stop it this way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from netns_lab.processes import ProcRef, open_log, proc_ref

from nodekit.files import atomic_write

FIRST_BACKOFF = 10.0  # seconds before the second restart (the first is immediate), as the kubelet
MAX_BACKOFF = 300.0
RESET_AFTER = 600.0  # an agent that ran this long starts the back-off again
STOP_GRACE = 10.0


@dataclass
class AgentStatus:
    """What the supervisor knows about its agent, as written to the status file."""

    state: str  # "running", "waiting" (to start again) or "stopped"
    restarts: int = 0
    pid: int | None = None
    start_time: int | None = None
    last_exit: str = ""  # "exit code 1", "killed by SIGKILL"
    next_start: float | None = None  # time.time() of the next start while waiting

    @property
    def agent(self) -> ProcRef | None:
        return None if self.pid is None or self.start_time is None else ProcRef(self.pid, self.start_time)


def read_status(path: str) -> AgentStatus | None:
    """The status file's content; None before the supervisor first wrote it (or if unreadable)."""
    try:
        with open(path) as f:
            return AgentStatus(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _write_status(path: str, status: AgentStatus) -> None:
    atomic_write(path, json.dumps(asdict(status)) + "\n", mode=0o600)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Backoff:
    """The kubelet's restart back-off: 0, then FIRST doubling up to MAX; reset by a long enough run."""

    def __init__(
        self, first: float = FIRST_BACKOFF, most: float = MAX_BACKOFF, reset_after: float = RESET_AFTER
    ) -> None:
        self.first, self.most, self.reset_after = first, most, reset_after
        self._next = 0.0

    def after_run(self, seconds: float) -> float:
        """The delay before the next start, for an agent that ran `seconds` before dying."""
        if seconds >= self.reset_after:
            self._next = 0.0
        delay = self._next
        self._next = min(self.most, max(self.first, 2 * self._next))
        return delay


class Supervisor:
    def __init__(self, argv: Sequence[str], status_path: str, ready_marker: str, log_path: str,
                 backoff: Backoff, grace: float) -> None:
        self.argv = list(argv)
        self.status_path = status_path
        self.ready_marker = ready_marker
        self.log_path = log_path
        self.backoff = backoff
        self.grace = grace
        self.stopping = threading.Event()
        self.status = AgentStatus(state="waiting")

    def run(self) -> None:
        while not self.stopping.is_set():
            agent, started = self._start(), time.monotonic()
            while agent.poll() is None and not self.stopping.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    agent.wait(timeout=0.5)
            if self.stopping.is_set():
                self._stop(agent)
                break
            ran = time.monotonic() - started
            delay = self.backoff.after_run(ran)
            self.status.restarts += 1
            self.status.state, self.status.pid, self.status.start_time = "waiting", None, None
            self.status.last_exit = describe_exit(agent.returncode)
            self.status.next_start = time.time() + delay
            _write_status(self.status_path, self.status)
            self._say(f"agent {self.status.last_exit} after {ran:.1f}s; restart {self.status.restarts} "
                      f"in {delay:g}s")
            self.stopping.wait(delay)
        self._remove_ready_marker()
        self.status.state, self.status.pid, self.status.start_time, self.status.next_start = (
            "stopped", None, None, None)
        _write_status(self.status_path, self.status)

    def _start(self) -> subprocess.Popen:
        self._remove_ready_marker()
        with open_log(self.log_path) as log:
            agent = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        ref = proc_ref(agent.pid)
        self.status.state, self.status.pid = "running", agent.pid
        self.status.start_time = ref.start_time if ref else None
        self.status.next_start = None
        _write_status(self.status_path, self.status)
        return agent

    def _stop(self, agent: subprocess.Popen) -> None:
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(self.grace)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        self.status.last_exit = describe_exit(agent.returncode)

    def _remove_ready_marker(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ready_marker)

    def _say(self, message: str) -> None:
        with open_log(self.log_path) as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [lab supervisor] {message}\n".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.supervisor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--status", required=True, help="status file (JSON, 0600)")
    parser.add_argument("--ready-marker", required=True,
                        help="the agent's ready marker, removed before each start")
    parser.add_argument("--log", required=True, help="the agent's log (appended to)")
    parser.add_argument("--grace", type=float, default=STOP_GRACE, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--first-backoff", type=float, default=FIRST_BACKOFF)
    parser.add_argument("--max-backoff", type=float, default=MAX_BACKOFF)
    parser.add_argument("command", nargs="+", help="the agent's argv (after --)")
    args = parser.parse_args(argv)
    supervisor = Supervisor(args.command, args.status, args.ready_marker, args.log,
                            Backoff(args.first_backoff, args.max_backoff), args.grace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    supervisor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
