"""IP address management on disk: one file per allocated address, named by the address.

Layout under <dataDir>/<network name>/:
    10.244.1.7          an allocation; content "<container id>\\n<ifname>\\n" (its owner)
    lock                flock()ed by whoever changes allocations (plugin processes and agent threads)
    last_reserved_ip.4  where the next search starts, so a freed address is not handed out again at once

Crash safety: an allocation file is written completely under a temporary name and then hard-linked
to its address name. link() is atomic and fails if the name exists, so a kill -9 at any instant
leaves either a complete allocation (which GC can reclaim) or none; a temporary file left behind is
removed by the next lock holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator

from cni import errors
from cni.config import IPAddress, IpRange
from cni.errors import CniError

Owner = tuple[str, str]  # (container id, ifname)
LOCK_FILE = "lock"
TMP_PREFIX = ".tmp-"
LAST_RESERVED_PREFIX = "last_reserved_ip."


class Store:
    """The allocations of one network."""

    def __init__(self, data_dir: str, network_name: str) -> None:
        self.directory = os.path.join(data_dir, network_name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the network's allocation lock; on entry, sweep temp files of crashed writers."""
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            lock_path = os.path.join(self.directory, LOCK_FILE)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CniError(errors.IO_FAILURE, f"cannot open IPAM store {self.directory}", str(e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_temp_files()
            yield
        finally:
            os.close(fd)  # releases the flock

    def allocations(self) -> dict[IPAddress, Owner]:
        """Every allocation of this network (caller holds the lock)."""
        found: dict[IPAddress, Owner] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as entries:
            for entry in entries:
                address = _address_or_none(entry.name)
                if address is not None:
                    found[address] = _read_owner(entry.path)
        return found

    def allocated_at(self, address: IPAddress) -> float | None:
        """When ADD wrote the allocation (file mtime; caller holds the lock), for GC's grace period."""
        try:
            return os.stat(os.path.join(self.directory, str(address))).st_mtime
        except FileNotFoundError:
            return None

    def drop(self, address: IPAddress) -> None:
        """Remove one allocation (caller holds the lock): GC decides per address under one lock hold."""
        self._unlink(address)

    def allocate(self, owner: Owner, ranges: Iterable[IpRange]) -> list[IPAddress]:
        """One address per range for owner; an owner that already holds one keeps it (retried ADD)."""
        allocated: list[IPAddress] = []
        with self.locked():
            taken = self.allocations()
            try:
                for pool in ranges:
                    held = [a for a, o in taken.items() if o == owner and a in pool.subnet]
                    address = held[0] if held else self._reserve(owner, pool, taken)
                    allocated.append(address)
            except BaseException:
                for address in allocated:
                    if address not in taken:
                        self._unlink(address)
                raise
        return allocated

    def release(self, owner: Owner) -> list[IPAddress]:
        """Free every address owner holds; an unknown owner is not an error (DEL is idempotent)."""
        return self._release_unless(lambda candidate: candidate != owner)

    def release_all_except(self, valid: frozenset[Owner]) -> list[IPAddress]:
        return self._release_unless(lambda candidate: candidate in valid)

    def _release_unless(self, keep: Callable[[Owner], bool]) -> list[IPAddress]:
        with self.locked():
            freed = [address for address, owner in self.allocations().items() if not keep(owner)]
            for address in freed:
                self._unlink(address)
        return freed

    def exhausted(self, ranges: Iterable[IpRange]) -> list[IpRange]:
        """The ranges with no free address left."""
        with self.locked():
            taken = self.allocations()
        return [pool for pool in ranges if _free_count(pool, taken) == 0]

    def _reserve(self, owner: Owner, pool: IpRange, taken: dict[IPAddress, Owner]) -> IPAddress:
        address = self._next_free(pool, taken)
        path = os.path.join(self.directory, str(address))
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{os.getpid()}-{address}")
        try:
            with open(tmp, "w") as f:
                f.write(f"{owner[0]}\n{owner[1]}\n")
            os.link(tmp, path)
            os.unlink(tmp)
            with open(os.path.join(self.directory, f"{LAST_RESERVED_PREFIX}{pool.subnet.version}"), "w") as f:
                f.write(str(address))
        except OSError as e:
            raise CniError(errors.IO_FAILURE, f"cannot record allocation of {address}", str(e)) from None
        taken[address] = owner
        return address

    def _next_free(self, pool: IpRange, taken: dict[IPAddress, Owner]) -> IPAddress:
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
            if candidate != pool.gateway and candidate not in taken:
                return candidate
        raise CniError(
            errors.POOL_EXHAUSTED,
            f"no free address left in {pool.subnet} ({pool.start}-{pool.end})",
            f"{_used_count(pool, taken)} addresses allocated under {self.directory}",
        )

    def _last_reserved(self, pool: IpRange) -> IPAddress | None:
        try:
            with open(os.path.join(self.directory, f"{LAST_RESERVED_PREFIX}{pool.subnet.version}")) as f:
                return _address_or_none(f.read().strip())
        except OSError:
            return None

    def _unlink(self, address: IPAddress) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, str(address)))

    def _remove_temp_files(self) -> None:
        for name in os.listdir(self.directory):
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))


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
