"""IP address management on disk: one file per allocated address, named by the address.

Layout under <dataDir>/<network name>/:
    10.244.1.7          an allocation; content "<container id>\\n<ifname>\\n" (its owner)
    lock                flock()ed by whoever changes allocations (plugin processes and agent threads)
    last_reserved_ip.4  where the next search starts, so a freed address is not handed out again at once

Privacy: the directory is 0700 and every file 0600, as the owners are container ids; a directory
made by an older version with 0755 is tightened on its next use.

Crash safety: an allocation file is written completely under a temporary name and then hard-linked
to its address name. link() is atomic and fails if the name exists, so a kill -9 at any instant
leaves either a complete allocation (which GC can reclaim) or none; a temporary file left behind is
removed by the next lock holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from cni import errors
from cni.config import IPAddress, IpRange
from cni.errors import CniError

Owner = tuple[str, str]  # (container id, ifname)
LOCK_FILE = "lock"
TMP_PREFIX = ".tmp-"
INDEX_PREFIX = "owner-"
LAST_RESERVED_PREFIX = "last_reserved_ip."
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class _Scan:
    """One read of the directory's names (no file contents)."""

    # names are kept as text: parsing hundreds of addresses per ADD would cost more than the disk work
    inodes: dict[str, int]  # every allocation's address and its inode
    indexed: dict[str, list[str]]  # owner key -> addresses whose index entry is current


class AllocationStore:
    """The allocations of one network."""

    def __init__(self, data_dir: str, network_name: str) -> None:
        self.directory = os.path.join(data_dir, network_name)

    def exists(self) -> bool:
        """Whether any ADD ever wrote here: DEL and STATUS of a network without one create nothing."""
        return os.path.isdir(self.directory)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the network's allocation lock (an flock: released by the kernel if the holder dies)."""
        lock_path = os.path.join(self.directory, LOCK_FILE)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            try:  # the directory exists on every call but a network's first: try the lock first
                fd = os.open(lock_path, flags, FILE_MODE)
            except FileNotFoundError:
                os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
                fd = os.open(lock_path, flags, FILE_MODE)
            try:
                if os.stat(self.directory).st_mode & 0o777 != DIRECTORY_MODE:
                    os.chmod(self.directory, DIRECTORY_MODE)
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            raise CniError(errors.IO_FAILURE, f"cannot open IPAM store {self.directory}", str(e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def locked_if_exists(self) -> Iterator[bool]:
        """The lock for readers (CHECK, GC, STATUS): a network no ADD ever wrote is read as empty and
        nothing is created for it. Yields whether the store exists."""
        if not self.exists():
            yield False
            return
        with self.locked():
            yield True

    def allocations(self) -> dict[IPAddress, Owner]:
        """Every allocation of this network (caller holds the lock)."""
        found: dict[IPAddress, Owner] = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    address = _address_or_none(entry.name)
                    if address is not None:
                        found[address] = _read_owner(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            return {}  # a network no ADD wrote reads as empty
        except OSError as e:
            raise CniError(errors.IO_FAILURE, f"cannot read IPAM store {self.directory}", str(e)) from None
        return found

    def allocated_at(self, address: IPAddress) -> float | None:
        """When ADD wrote the allocation (file mtime; caller holds the lock), for GC's grace period."""
        try:
            return os.stat(os.path.join(self.directory, str(address))).st_mtime
        except FileNotFoundError:
            return None

    def drop(self, address: IPAddress) -> None:
        """Remove one allocation (caller holds the lock): GC decides per address under one lock hold."""
        with contextlib.suppress(OSError):
            owner = _read_owner(self._path(address))
            self._unlink(_index_name(owner, address))
        self._unlink(str(address))

    def allocate(self, owner: Owner, ranges: Iterable[IpRange]) -> list[IPAddress]:
        """One address per range for owner; an owner that already holds one keeps it (retried ADD)."""
        allocated: list[IPAddress] = []
        with self.locked():
            scan = self._scan()
            held = self._held_by(owner, scan)
            taken = set(scan.inodes)  # addresses as text
            try:
                for pool in ranges:
                    mine = [a for a in held if a in pool.subnet]
                    allocated.append(mine[0] if mine else self._reserve(owner, pool, taken))
            except BaseException:
                for address in allocated:
                    if address not in held:
                        self._unlink(str(address))
                        self._unlink(_index_name(owner, address))
                raise
        return allocated

    def release(self, owner: Owner, when_emptied: Callable[[], object] | None = None) -> list[IPAddress]:
        """Free every address owner holds; an unknown owner is not an error (DEL is idempotent).

        when_emptied runs, still under the lock, if the network holds no allocation afterwards: what it
        tears down for the network as a whole cannot race an ADD, which allocates before it builds.
        """
        if not self.exists():
            return []
        with self.locked():
            scan = self._scan()
            freed = self._held_by(owner, scan)
            for address in freed:
                self._unlink(str(address))
                self._unlink(_index_name(owner, address))
            if when_emptied is not None and scan.inodes.keys() <= {str(address) for address in freed}:
                when_emptied()
        return freed

    def only(self, owner: Owner) -> bool:
        """Whether owner holds every allocation of the network (caller holds the lock)."""
        return all(holder == owner for holder in self.allocations().values())

    def exhausted(self, ranges: Iterable[IpRange]) -> list[IpRange]:
        """The ranges with no free address left."""
        with self.locked_if_exists() as exists:
            taken = [ipaddress.ip_address(text) for text in self._scan().inodes] if exists else []
        return [pool for pool in ranges if _free_count(pool, taken) == 0]

    def _scan(self) -> _Scan:
        """List the directory once (caller holds the lock) and sweep what crashed writers left behind."""
        inodes: dict[str, int] = {}
        index_entries: list[os.DirEntry] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    self._unlink(entry.name)
                elif entry.name.startswith(INDEX_PREFIX):
                    index_entries.append(entry)
                elif entry.name[0].isdigit() or ":" in entry.name:  # only address files look like this
                    inodes[entry.name] = entry.inode()
        indexed: dict[str, list[str]] = {}
        for entry in index_entries:
            _, key, text = entry.name.split("-", 2)
            if inodes.get(text) == entry.inode():
                indexed.setdefault(key, []).append(text)
            else:  # its allocation is gone (or was never linked): a stale hint
                self._unlink(entry.name)
        return _Scan(inodes, indexed)

    def _held_by(self, owner: Owner, scan: _Scan) -> list[IPAddress]:
        """owner's addresses; reading the few candidate files rules out a hash collision."""
        candidates = [ipaddress.ip_address(text) for text in scan.indexed.get(_owner_key(owner), [])]
        return [address for address in candidates if _read_owner(self._path(address)) == owner]

    def _reserve(self, owner: Owner, pool: IpRange, taken: set[str]) -> IPAddress:
        address = self._next_free(pool, taken)
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{os.getpid()}-{address}")
        try:
            _write(tmp, f"{owner[0]}\n{owner[1]}\n")
            os.link(tmp, os.path.join(self.directory, _index_name(owner, address)))
            os.link(tmp, self._path(address))
            os.unlink(tmp)
            _write(os.path.join(self.directory, f"{LAST_RESERVED_PREFIX}{pool.subnet.version}"), str(address))
        except OSError as e:
            raise CniError(errors.IO_FAILURE, f"cannot record allocation of {address}", str(e)) from None
        taken.add(str(address))
        return address

    def _next_free(self, pool: IpRange, taken: Collection[str]) -> IPAddress:
        """Round-robin from just after the last reserved address, wrapping inside the range."""
        first, last = int(pool.start), int(pool.end)
        size = last - first + 1
        offset = 0
        previous = self._last_reserved(pool)
        if previous is not None and first <= int(previous) < last:
            offset = int(previous) + 1 - first
        # a free address is found within len(taken)+2 steps unless the range is full
        for step in range(min(size, len(taken) + 2)):
            candidate = ipaddress.ip_address(first + (offset + step) % size)
            if candidate != pool.gateway and str(candidate) not in taken:
                return candidate
        used = _used_count(pool, [ipaddress.ip_address(text) for text in taken])
        raise CniError(
            errors.POOL_EXHAUSTED,
            f"no free address left in {pool.subnet} ({pool.start}-{pool.end})",
            f"{used} addresses allocated under {self.directory}",
        )

    def _last_reserved(self, pool: IpRange) -> IPAddress | None:
        try:
            with open(os.path.join(self.directory, f"{LAST_RESERVED_PREFIX}{pool.subnet.version}")) as f:
                return _address_or_none(f.read().strip())
        except OSError:
            return None

    def _path(self, address: IPAddress) -> str:
        return os.path.join(self.directory, str(address))

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, name))


def _write(path: str, text: str) -> None:
    """Create or replace a file's content, readable by root only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _owner_key(owner: Owner) -> str:
    return hashlib.sha256(f"{owner[0]}\n{owner[1]}".encode()).hexdigest()[:16]


def _index_name(owner: Owner, address: IPAddress) -> str:
    return f"{INDEX_PREFIX}{_owner_key(owner)}-{address}"


def _address_or_none(name: str) -> IPAddress | None:
    if not name or not (name[0].isdigit() or ":" in name):
        return None
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _read_owner(path: str) -> Owner:
    with open(path) as f:
        lines = f.read().split("\n")
    return (lines[0], lines[1]) if len(lines) >= 2 else ("", "")


def _used_count(pool: IpRange, taken: Iterable[IPAddress]) -> int:
    return sum(1 for address in taken if _in_range(pool, address) and address != pool.gateway)


def _in_range(pool: IpRange, address: IPAddress) -> bool:
    return address.version == pool.subnet.version and pool.start <= address <= pool.end


def _free_count(pool: IpRange, taken: Iterable[IPAddress]) -> int:
    size = int(pool.end) - int(pool.start) + 1
    if pool.start <= pool.gateway <= pool.end:
        size -= 1
    return size - _used_count(pool, taken)
