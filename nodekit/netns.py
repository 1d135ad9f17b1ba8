"""Network namespace helpers shared by the CNI plugin, the agent, the lab and the tests.

Namespaces are named bind mounts under /run/netns (what `ip netns` uses), so every tool on the
machine (ip, tcpdump via `ip netns exec`, containerd) sees the same ones.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence

from pyroute2 import netns as _netns

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> str:
    """Create a named netns with loopback up; returns its path."""
    _netns.create(name)
    run(name, ["ip", "link", "set", "lo", "up"])
    return path(name)


def delete(name: str) -> None:
    """Remove a named netns; absent is fine (cleanup must be idempotent)."""
    if exists(name):
        _netns.remove(name)


def names(prefix: str = "") -> list[str]:
    return sorted(n for n in _netns.listnetns() if n.startswith(prefix))


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside netns `name` (never through a shell)."""
    return ["ip", "netns", "exec", name, *argv]


def run(name: str, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside netns `name`, capturing text output."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(exec_argv(name, argv), check=check, **kwargs)


@contextlib.contextmanager
def entered(ns_path: str) -> Iterator[None]:
    """Switch the calling thread into another netns for the duration of the block.

    setns() is per thread, so this is safe in a threaded agent as long as the block does not
    hand work to other threads. Sockets created inside stay in that namespace after leaving.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(ns_path) as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
