"""BPF on this node, in one place: compiling and loading the programs of `ebpf/` (bcc), bpffs,
pinned maps and links (libbpf through ctypes: bcc's Python API has no pinning, links or raw map
access), tc filters (pyroute2) and bpftool's answers. Every failure is a BpfError saying what the
kernel or the toolchain refused, so the socket balancer, the fast path and `netagent doctor` report
it the same way.

The programs are package data of the `ebpf` package, read through importlib.resources: they are
found the same way in a checkout, an installed wheel or the image.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "netagent")  # every pinned object of netagent lives below it
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_CGROUP_SOCK_ADDR = 18
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3  # clsact parents
ENOENT = 2


class BpfError(RuntimeError):
    """A BPF operation failed: bcc or libbpf missing, a compile or verifier refusal, a map or link
    operation the kernel refused. The message says which and why."""


# -- programs --------------------------------------------------------------------------------------
@functools.cache
def program_text(name: str) -> str:
    """The C source of one program of the `ebpf` package (e.g. "sock_lb.c"), read once per process."""
    return resources.files("ebpf").joinpath(name).read_text()


def program_version(name: str, *parameters: str) -> str:
    """A short hash of a program's text and the parameters it is compiled with: names the loaded
    objects, so an agent restart can tell that what runs is already what it would load."""
    digest = hashlib.sha256("\0".join((program_text(name), *parameters)).encode())
    return digest.hexdigest()[:12]


def compile_program(name: str, cflags: Sequence[str] = ()) -> Any:
    """A bcc.BPF module of the program (maps the program pins are created or reused). bcc is
    imported only here: reading and writing pinned maps needs neither clang nor kernel headers."""
    try:
        from bcc import BPF  # Debian's python3-bpfcc, exposed to the venv by bootstrap
    except ImportError as err:
        raise BpfError(f"bcc is not importable (Debian's python3-bpfcc): {err}") from None
    try:
        return BPF(text=program_text(name).encode(), cflags=list(cflags))
    except Exception as err:  # bcc raises plain Exception for compile and load errors
        raise BpfError(f"cannot load {name}: {err}") from None


def load_function(bpf: Any, function: str, prog_type: int, attach_type: int | None = None) -> int:
    """The fd of one loaded function of a compiled module (the verifier runs here)."""
    kwargs = {} if attach_type is None else {"attach_type": attach_type}
    try:
        return bpf.load_func(function.encode(), prog_type, **kwargs).fd
    except Exception as err:  # bcc: plain Exception with the verifier's log
        raise BpfError(f"cannot load {function}(): {err}") from None


def release(bpf: Any) -> None:
    """Free a bcc module now (bcc otherwise keeps it until exit through atexit). What is attached or
    pinned lives on in the kernel."""
    if bpf is not None:
        atexit.unregister(bpf.cleanup)
        bpf.cleanup()


# -- bpffs -----------------------------------------------------------------------------------------
def ensure_bpffs() -> None:
    """Pinning needs bpffs at /sys/fs/bpf (a filesystem mount, no network change)."""
    if not os.path.ismount(BPFFS):
        os.makedirs(BPFFS, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BpfError(f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()}")
    os.makedirs(PIN_ROOT, exist_ok=True)


# -- libbpf: pinned objects and links --------------------------------------------------------------
class LinkInfo(ctypes.Structure):
    """struct bpf_link_info up to its cgroup member."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32)]


@functools.cache
def _libbpf() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as err:
        raise BpfError(f"libbpf.so.1 is needed: {err}") from None


def _call(what: str, function: str, *args: object) -> int:
    """Call a libbpf function, which returns -errno on failure."""
    rc = getattr(_libbpf(), function)(*args)
    if rc < 0:
        raise BpfError(f"{what}: {os.strerror(-rc)}")
    return rc


def open_pinned(path: str) -> int:
    """An fd of the object pinned at path (the caller closes it)."""
    return _call(f"open pinned {path}", "bpf_obj_get", path.encode())


def pin(fd: int, path: str) -> None:
    _call(f"pin {path}", "bpf_obj_pin", fd, path.encode())


def link_info(path: str) -> LinkInfo:
    """The pinned link's program id and cgroup id (0 once its cgroup was removed)."""
    fd = open_pinned(path)
    try:
        info, size = LinkInfo(), ctypes.c_uint32(ctypes.sizeof(LinkInfo))
        _call(f"read link {path}", "bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(size))
        return info
    finally:
        os.close(fd)


def create_link(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """A new bpf_link (multi-attach: other programs on the target keep running); its fd."""
    return _call(f"attach {what}", "bpf_link_create", prog_fd, target_fd, attach_type, None)


def update_link(path: str, prog_fd: int) -> None:
    """Switch the pinned link to another program atomically: no moment without a program."""
    fd = open_pinned(path)
    try:
        _call(f"update {path}", "bpf_link_update", fd, prog_fd, None)
    finally:
        os.close(fd)


def detach_link(path: str) -> None:
    """Detach a pinned link now, then unpin it (unpinning alone detaches only after an RCU grace period)."""
    fd = open_pinned(path)
    try:
        _call(f"detach {path}", "bpf_link_detach", fd)
    finally:
        os.close(fd)
    os.unlink(path)


class PinnedMap:
    """One pinned BPF hash map; keys and values are tuples in the C structure's field order (no pads)."""

    def __init__(self, path: str, key_type: type[ctypes.Structure], value_type: type[ctypes.Structure]):
        self.path, self.key_type, self.value_type = path, key_type, value_type
        self.fd = open_pinned(path)

    def close(self) -> None:
        os.close(self.fd)

    def update(self, key: tuple, value: tuple) -> None:
        k, v = self.key_type(*key), self.value_type(*value)
        _call(f"update {self.path}", "bpf_map_update_elem", self.fd, ctypes.byref(k), ctypes.byref(v), 0)

    def delete(self, key: tuple) -> None:
        k = self.key_type(*key)
        rc = _libbpf().bpf_map_delete_elem(self.fd, ctypes.byref(k))
        if rc < 0 and -rc != ENOENT:  # already gone is what we wanted
            raise BpfError(f"delete from {self.path}: {os.strerror(-rc)}")

    def items(self) -> Iterator[tuple[tuple, tuple]]:
        key, next_key, value = self.key_type(), self.key_type(), self.value_type()
        previous = None
        while _libbpf().bpf_map_get_next_key(self.fd, previous, ctypes.byref(next_key)) == 0:
            ctypes.memmove(ctypes.byref(key), ctypes.byref(next_key), ctypes.sizeof(key))
            previous = ctypes.byref(key)
            if _libbpf().bpf_map_lookup_elem(self.fd, previous, ctypes.byref(value)) == 0:
                yield _fields(key), _fields(value)


def _fields(struct: ctypes.Structure) -> tuple:
    return tuple(getattr(struct, name) for name, *_ in struct._fields_ if not name.startswith("pad"))


# -- bpftool ---------------------------------------------------------------------------------------
def bpftool(*args: str) -> Any:
    """bpftool's JSON answer ({} for commands that print none): for objects this process has no
    handle on, such as the maps of programs an earlier agent attached."""
    try:
        done = subprocess.run(["bpftool", "--json", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BpfError(f"bpftool {' '.join(args[:2])}: {err}") from None
    if done.returncode != 0:
        raise BpfError(f"bpftool {' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()[:500]}")
    try:
        return (json.loads(done.stdout) if done.stdout.strip() else None) or {}
    except ValueError as err:
        raise BpfError(f"bpftool {' '.join(args[:2])}: unreadable answer ({err})") from None


# -- tc filters ------------------------------------------------------------------------------------
def tc_filters(ipr: Any, index: int, parent: int, prefix: str) -> list[tuple[int, str]]:
    """(tc info, name) of the BPF filters at one hook whose name starts with prefix."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except NetlinkError:  # no clsact qdisc there
        return []
    found = []
    for tc_filter in filters:
        options = tc_filter.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options else None
        if name and name.startswith(prefix):
            found.append((tc_filter["info"], name))
    return found


def attach_tc_filter(ipr: Any, index: int, parent: int, fd: int, name: str, prefix: str) -> None:
    """Put program fd at the hook (direct action) in place of our filters there (names starting with
    prefix); other filters at the hook are left alone."""
    from pyroute2.netlink.exceptions import NetlinkError

    with contextlib.suppress(NetlinkError):  # EEXIST: the clsact qdisc is already there
        ipr.tc("add", "clsact", index)
    detach_tc_filters(ipr, index, parent, prefix)
    ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name=name, parent=parent, classid=1, direct_action=True)


def detach_tc_filters(ipr: Any, index: int, parent: int, prefix: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    for info, _name in tc_filters(ipr, index, parent, prefix):
        with contextlib.suppress(NetlinkError):  # gone meanwhile (its device was deleted)
            ipr.tc("del-filter", index=index, parent=parent, info=info)
