"""Network namespace helpers shared by the CNI plugin, the agent, the lab and the tests.

Namespaces are named bind mounts under /run/netns (what `ip netns` uses), so every tool on the
machine (ip, tcpdump via `ip netns exec`, containerd) sees the same ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import subprocess
from collections.abc import Iterator, Sequence

from pyroute2 import netns as _netns

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
THREAD_NAMESPACE = "/proc/thread-self/ns/net"  # the calling thread's netns (a plugin's: the node's)
NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files (nsfs)
NS_GET_NSTYPE = 0xB703  # ioctl _IO(0xb7, 3): the CLONE_NEW* type of a namespace fd


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


class NotANetworkNamespace(OSError):
    """The path exists but does not name a network namespace."""


def open_network(ns_path: str) -> int:
    """An fd of the network namespace at `ns_path`, which is checked to be one without ever blocking.

    Opening an arbitrary path for reading can wait for ever (a FIFO waits for a writer) or act on a
    device, so the path is first opened O_PATH, which reaches no driver, and must live on nsfs; only
    then is that same inode opened for real (through /proc/self/fd, no second lookup of the path)
    and asked its namespace type. Raises NotANetworkNamespace, or OSError when it cannot be opened.
    """
    probe = os.open(ns_path, os.O_PATH | os.O_CLOEXEC)
    try:
        if _filesystem_type(probe) != NSFS_MAGIC:
            raise NotANetworkNamespace(f"{ns_path} is not a network namespace")
        fd = os.open(f"/proc/self/fd/{probe}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(probe)
    try:
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise NotANetworkNamespace(f"{ns_path} is a namespace but not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


def same(fd: int, ns_path: str) -> bool:
    """Whether the namespace open as `fd` is the one at `ns_path` (e.g. THREAD_NAMESPACE)."""
    mine, other = os.fstat(fd), os.stat(ns_path)
    return (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino)


@contextlib.contextmanager
def entered(ns: str | int) -> Iterator[None]:
    """Switch the calling thread into another netns (a path, or an fd from open_network) for the block.

    setns() is per thread, so this is safe in a threaded agent as long as the block does not
    hand work to other threads. Sockets created inside stay in that namespace after leaving.
    """
    target = open_network(ns) if isinstance(ns, str) else ns
    home = os.open(THREAD_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, f"setns({ns})")
        try:
            yield
        finally:
            _setns(home, "setns back")
    finally:
        os.close(home)
        if isinstance(ns, str):  # an fd the caller passed stays the caller's
            os.close(target)


def _setns(fd: int, what: str) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]  # struct statfs, 64-bit Linux


def _filesystem_type(fd: int) -> int:
    buf = _Statfs()
    if _libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fstatfs: {os.strerror(err)}")
    return buf.f_type


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
