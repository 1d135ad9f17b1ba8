"""`--proxy ebpf`: socket-level load balancing for ClusterIP services, the way Cilium's socket-LB does it.

Scope: ClusterIP only, IPv4, TCP and UDP. NOT covered (yet): NodePort, externalIPs, LoadBalancer IPs
and externalTrafficPolicy (they need a tc program on the node's interfaces, which this backend does not
have), IPv6 (no connect6 program), SCTP and sessionAffinity. Such ports are logged once and left out;
`netagent proxy show` lists them as out of sync, which they are.

How it works: ebpf/sock_lb.c runs on connect()/sendmsg()/recvmsg()/getpeername() of every socket whose
process is in the configured cgroup v2 (or below it), whatever netns the socket lives in. A connect to a
ClusterIP is rewritten to a random endpoint before any packet exists: no DNAT, no conntrack entry, and an
established connection is a plain pod-to-pod one, so removing an endpoint or restarting the agent cannot
touch it.
A service without endpoints makes connect()/sendto() fail with EPERM (refuse, never blackhole).

Kernel state, pinned under /sys/fs/bpf/netagent/<node>/ so it outlives the agent:
  services             (ClusterIP, port, protocol) -> (endpoint count, service id)
  endpoints            (service id, slot) -> (pod IP, port), slots 0..count-1
  reverse              the program's own LRU cache (socket, endpoint) -> ClusterIP, so UDP replies and
                       getpeername() show the ClusterIP
  <hook>-<version>     bpf_links attaching each program to the cgroup; version hashes sock_lb.c
A restart that finds links of its own version on the same cgroup only re-opens the maps: no compile,
no re-attach, no flush. A changed program replaces the attached one atomically (bpf_link_update).
A change to a map's layout in sock_lb.c is the exception: bcc refuses a pinned map of another shape,
so that upgrade needs `cleanup()` first (connections survive it; new ones are balanced again once
the next sync has filled the new maps).

Each sync computes the desired map contents from the Snapshot, diffs them with what the maps hold and
writes only the differing entries, ordered so the program never picks a slot that is not there (slots
are written before a count grows; a count is lowered before its slots are deleted). Service ids and
slots are stable: a surviving endpoint keeps its slot, a leaving one's slot takes a newcomer or the
last endpoint, so one endpoint change rewrites at most two entries.

Which cgroup: on a real node the root of the unified hierarchy (pods' cgroups are below it). Where
several "nodes" share one host (the netns lab, tests), each node needs its own cgroup holding its
pods' processes, or one node's services would rewrite every process's sockets: the root cgroup is
refused when the node is a netns (the agent runs outside the host's netns, or was given a netns).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

from netagent.proxy.backend import Backend, NodeContext, SyncError
from netagent.proxy.inspection import ChainFacts, KernelView
from netagent.proxy.policy import Destination
from netagent.proxy.service import ServicePort
from nodekit import bpf

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRAM = "sock_lb.c"
DEFAULT_CGROUP = "/sys/fs/cgroup/unified"
PROTOCOLS = {"TCP": 6, "UDP": 17}  # IPPROTO_*
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
MAPS = ("services", "endpoints", "reverse")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,252}$")


@dataclass(frozen=True)
class Hook:
    name: str  # also the link's pin name
    function: str  # in sock_lb.c
    attach_type: int  # enum bpf_attach_type


HOOKS = (
    Hook("connect4", "sock4_connect", 10),  # BPF_CGROUP_INET4_CONNECT
    Hook("sendmsg4", "sock4_sendmsg", 14),  # BPF_CGROUP_UDP4_SENDMSG
    Hook("recvmsg4", "sock4_recvmsg", 19),  # BPF_CGROUP_UDP4_RECVMSG
    Hook("getpeername4", "sock4_getpeername", 29),  # BPF_CGROUP_INET4_GETPEERNAME
)


# -- map layouts, as in sock_lb.c (addresses in network byte order: big-endian structures) ----------
class _ServiceKey(ctypes.BigEndianStructure):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("protocol", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class _ServiceValue(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class _EndpointKey(ctypes.Structure):
    _fields_ = [("service_id", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class _EndpointValue(ctypes.BigEndianStructure):
    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class ServiceAddr(NamedTuple):
    ip: int  # IPv4 address as an integer
    port: int
    protocol: int  # IPPROTO_*


class ServiceEntry(NamedTuple):
    count: int
    id: int


class EndpointSlot(NamedTuple):
    service_id: int
    slot: int


class Addr(NamedTuple):
    ip: int
    port: int

    def __str__(self) -> str:
        return f"{ipaddress.IPv4Address(self.ip)}:{self.port}"


@dataclass(frozen=True)
class MapState:
    """The services map, and the endpoints map grouped per service id in slot order (None marks a slot
    the kernel lacks: only seen when reading maps that a failed sync left half written)."""

    services: dict[ServiceAddr, ServiceEntry] = field(default_factory=dict)
    slots: dict[int, tuple[Addr | None, ...]] = field(default_factory=dict)

    def live_slots(self, entry: ServiceEntry) -> tuple[Addr | None, ...]:
        """The slots the program picks from (any beyond the count are leftovers to delete)."""
        return self.slots.get(entry.id, ())[: entry.count]


@dataclass(frozen=True)
class MapChanges:
    """Entries to write and delete, per map; falsy when the maps already match."""

    set_services: dict[ServiceAddr, ServiceEntry] = field(default_factory=dict)
    deleted_services: tuple[ServiceAddr, ...] = ()
    set_endpoints: dict[EndpointSlot, Addr] = field(default_factory=dict)
    deleted_endpoints: tuple[EndpointSlot, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set_services or self.deleted_services or self.set_endpoints
                    or self.deleted_endpoints)

    @classmethod
    def between(cls, current: MapState, desired: MapState) -> MapChanges:
        set_endpoints: dict[EndpointSlot, Addr] = {}
        deleted_endpoints: list[EndpointSlot] = []
        for service_id in current.slots.keys() | desired.slots.keys():
            old, new = current.slots.get(service_id, ()), desired.slots.get(service_id, ())
            if old is new:  # an unchanged service: the common case, and free
                continue
            for i, addr in enumerate(new):
                if i >= len(old) or old[i] != addr:
                    set_endpoints[EndpointSlot(service_id, i)] = addr
            deleted_endpoints += [EndpointSlot(service_id, i) for i in range(len(new), len(old)) if old[i]]
        return cls(
            set_services={k: v for k, v in desired.services.items() if current.services.get(k) != v},
            deleted_services=tuple(k for k in current.services if k not in desired.services),
            set_endpoints=set_endpoints,
            deleted_endpoints=tuple(deleted_endpoints),
        )


# -- desired state ----------------------------------------------------------------------------------
def wanted_service(p: ServicePort) -> tuple[ServiceAddr, frozenset[Addr]] | None:
    """The ClusterIP with the endpoints its policy balances cluster traffic over (no endpoints: the
    program refuses the connect); None for a port this backend skips."""
    if p.family != 4 or p.protocol not in PROTOCOLS:
        return None
    cluster = p.policy.cluster
    (dest,) = cluster.destinations
    key = ServiceAddr(_ip4(dest.ip), dest.port, PROTOCOLS[dest.protocol])
    return key, frozenset(Addr(_ip4(e.ip), e.port) for e in cluster.endpoints)


def _ip4(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")  # 5x ipaddress: 100,000 endpoints per cold sync


def unsupported(ports: Sequence[ServicePort]) -> Iterator[str]:
    """Why each port (or part of one) is not served by this backend."""
    for p in ports:
        if p.family != 4:
            yield f"{p.display_name}: IPv6 is not covered by the ebpf proxy"
        elif p.protocol not in PROTOCOLS:
            yield f"{p.display_name}: {p.protocol} is not covered by the ebpf proxy"
        elif p.policy.external:
            yield f"{p.display_name}: only the ClusterIP is served (ebpf proxy: no NodePort/external IPs)"
        elif p.policy.affinity_timeout:
            yield f"{p.display_name}: sessionAffinity is not covered by the ebpf proxy"


def assign_slots(current: Sequence[Addr | None], wanted: frozenset[Addr]) -> list[Addr]:
    """The slot list for `wanted` that moves as few current endpoints as possible: survivors stay in
    place, newcomers fill the holes first, remaining holes are filled by moving the last endpoint."""
    slots: list[Addr | None] = [a if a in wanted else None for a in current]
    newcomers = sorted(wanted.difference(slots))
    for index, addr in enumerate(slots):
        if addr is None and newcomers:
            slots[index] = newcomers.pop(0)
    slots += newcomers
    while None in slots:
        last = slots.pop()
        if last is not None:
            slots[slots.index(None)] = last
    return cast(list[Addr], slots)  # no None left


def plan_maps(
    current: MapState,
    wanted: dict[ServiceAddr, frozenset[Addr]],
    current_wanted: dict[ServiceAddr, frozenset[Addr]] | None = None,
) -> MapState:
    """The desired map contents. `current_wanted`, what `current` was planned from, lets services whose
    endpoints did not change keep their slots without recomputing them (10,000 services per sync).
    A new service takes an id no current entry uses (not even one being removed in this sync, so a
    connect racing the update never reaches another service's endpoints)."""
    used = {entry.id for entry in current.services.values()}
    free_ids = (i for i in range(1, 2**32) if i not in used)
    services, slots = {}, {}
    for key, addrs in wanted.items():
        old = current.services.get(key)
        if old and current_wanted is not None and current_wanted.get(key) is addrs:
            services[key], slots[old.id] = old, current.slots[old.id]
            continue
        service_id = old.id if old else next(free_ids)
        slots[service_id] = tuple(assign_slots(current.live_slots(old) if old else (), addrs))
        services[key] = ServiceEntry(len(slots[service_id]), service_id)
    return MapState(services, slots)


def program_version() -> str:
    return bpf.program_version(PROGRAM)


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id (its inode number); a clear error for anything else."""
    if not os.path.isfile(os.path.join(path, "cgroup.controllers")):
        raise SyncError(f"{path} is not a cgroup v2 directory (no cgroup.controllers)")
    return os.stat(path).st_ino


def _in_init_netns() -> bool:
    return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino


def _as_sync_error(method: Callable[..., T]) -> Callable[..., T]:
    """The proxy's callers handle SyncError; a BPF failure is one."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except bpf.BpfError as err:
            raise SyncError(str(err)) from None

    return wrapper


# -- the backend ------------------------------------------------------------------------------------
class EbpfBackend(Backend):
    """Socket-LB for one node: a Backend that programs BPF maps instead of rendering rules.

    Creating one is cheap and touches nothing (Proxier builds one just to clean up after a backend
    switch); the first sync mounts bpffs, attaches the programs if needed and opens the maps."""

    kind = "ebpf"

    def __init__(
        self,
        node: NodeContext,
        family: int = 4,
        netns: str | None = None,  # unused: cgroup programs see sockets of every netns
        cgroup: str = DEFAULT_CGROUP,
        pin_dir: str | None = None,
    ) -> None:
        if not _NODE_NAME.fullmatch(node.node_name):
            raise ValueError(f"node name {node.node_name!r} cannot name a bpffs directory")
        super().__init__(node, family, netns)
        self.cgroup = cgroup
        self.pin_dir = pin_dir or os.path.join(bpf.PIN_ROOT, node.node_name)
        self._maps: dict[str, bpf.PinnedMap] = {}
        self._applied: MapState | None = None  # None: unknown, read the maps before the next sync
        self._applied_wanted: dict[ServiceAddr, frozenset[Addr]] = {}  # what _applied was planned from
        self._memo: dict[ServicePort, tuple[ServiceAddr, frozenset[Addr]] | None] = {}  # per unchanged port
        self._warned: set[str] = set()

    @_as_sync_error
    def sync(self, ports: Sequence[ServicePort]) -> MapChanges:
        """Make the maps hold exactly the ClusterIPs of `ports`; returns what was written.

        After a failure the next sync re-reads the maps, so it completes whatever was left half done."""
        self._warn_unsupported(ports)
        if self.family != 4:
            return MapChanges()
        if not self._maps:
            self._attach()
            self._open_maps()
        memo = {p: self._memo[p] if p in self._memo else wanted_service(p) for p in ports}
        self._memo = memo
        wanted = dict(entry for entry in memo.values() if entry)
        if self._applied is None:
            current = self.read_maps()
            desired = plan_maps(current, wanted)
        else:
            current = self._applied
            desired = plan_maps(current, wanted, self._applied_wanted)
        changes = MapChanges.between(current, desired)
        try:
            self._write(changes)
        except BaseException:
            self._applied = None
            raise
        self._applied, self._applied_wanted = desired, wanted
        return changes

    def _warn_unsupported(self, ports: Sequence[ServicePort]) -> None:
        for reason in unsupported(ports):
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("%s", reason)

    def _write(self, changes: MapChanges) -> None:
        services, endpoints = self._maps["services"], self._maps["endpoints"]
        for slot, addr in changes.set_endpoints.items():
            endpoints.update(slot, addr)
        for key, entry in changes.set_services.items():
            services.update(key, entry)
        for key in changes.deleted_services:
            services.delete(key)
        for slot in changes.deleted_endpoints:
            endpoints.delete(slot)

    def read_maps(self) -> MapState:
        """What the pinned maps hold now."""
        if not self._maps:
            self._open_maps()
        slots: dict[int, list[Addr | None]] = {}
        for (service_id, slot), addr in self._maps["endpoints"].items():
            row = slots.setdefault(service_id, [])
            row.extend([None] * (slot + 1 - len(row)))
            row[slot] = Addr(*addr)
        return MapState(
            services={ServiceAddr(*k): ServiceEntry(*v) for k, v in self._maps["services"].items()},
            slots={service_id: tuple(row) for service_id, row in slots.items()},
        )

    def _open_maps(self) -> None:
        self._maps = {
            "services": bpf.PinnedMap(os.path.join(self.pin_dir, "services"), _ServiceKey, _ServiceValue),
            "endpoints": bpf.PinnedMap(os.path.join(self.pin_dir, "endpoints"), _EndpointKey, _EndpointValue),
        }

    # -- attaching ----------------------------------------------------------------------------------
    def pinned_links(self) -> dict[str, str]:
        """Hook name -> pin path of its link, for the links pinned in pin_dir."""
        names = os.listdir(self.pin_dir) if os.path.isdir(self.pin_dir) else []
        hooks = {hook.name for hook in HOOKS}
        return {name.split("-")[0]: os.path.join(self.pin_dir, name) for name in names
                if name.split("-")[0] in hooks}

    def _attach(self) -> None:
        """Attach every program to the cgroup unless a link of this program version already is."""
        target = cgroup_id(self.cgroup)
        if target == cgroup_id(DEFAULT_CGROUP) and (self.netns or not _in_init_netns()):
            raise SyncError(
                f"refusing to attach to the root cgroup {self.cgroup} for a node that is a netns (lab, "
                "tests): it would balance every process on the host; give this node its own cgroup"
            )
        bpf.ensure_bpffs()
        os.makedirs(self.pin_dir, exist_ok=True)
        version = program_version()
        links = self.pinned_links()
        maps_pinned = all(os.path.exists(os.path.join(self.pin_dir, name)) for name in MAPS)
        same_cgroup = {hook for hook, path in links.items() if bpf.link_info(path).cgroup_id == target}
        if maps_pinned and all(
            hook.name in same_cgroup and links[hook.name].endswith(f"-{version}") for hook in HOOKS
        ):
            return
        log.info("attaching socket-LB programs (version %s) to cgroup %s", version, self.cgroup)
        for hook, path in links.items():
            if hook not in same_cgroup:  # configured for another cgroup, or its cgroup is gone
                bpf.detach_link(path)
        module = bpf.compile_program(PROGRAM, [f'-DPIN_DIR="{self.pin_dir}"'])
        try:
            cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for hook in HOOKS:
                    prog_fd = bpf.load_function(module, hook.function, bpf.PROG_TYPE_CGROUP_SOCK_ADDR,
                                                hook.attach_type)
                    old = links.get(hook.name) if hook.name in same_cgroup else None
                    self._link(hook, prog_fd, cgroup_fd, old, version)
                    if old and old != self._link_path(hook, version):
                        os.unlink(old)  # re-pinned under the new version's name
            finally:
                os.close(cgroup_fd)
        finally:
            bpf.release(module)

    def _link_path(self, hook: Hook, version: str) -> str:
        return os.path.join(self.pin_dir, f"{hook.name}-{version}")

    def _link(self, hook: Hook, prog_fd: int, cgroup_fd: int, replace: str | None, version: str) -> None:
        """Pin a link running prog_fd on the cgroup: the `replace` link switched to it atomically, or a
        new one (links attach in multi mode, so other users' programs on the cgroup keep running)."""
        new_path = self._link_path(hook, version)
        if replace:
            bpf.update_link(replace, prog_fd)
            if replace != new_path:
                fd = bpf.open_pinned(replace)
                try:
                    bpf.pin(fd, new_path)
                finally:
                    os.close(fd)
            return
        fd = bpf.create_link(prog_fd, cgroup_fd, hook.attach_type, f"{hook.name} to {self.cgroup}")
        try:
            bpf.pin(fd, new_path)
        finally:
            os.close(fd)

    # -- inspection and cleanup ---------------------------------------------------------------------
    @_as_sync_error
    def kernel_view(self) -> KernelView:
        """Each ClusterIP with the endpoints the maps hold; empty unless every program is attached."""
        if self.family != 4 or set(self.pinned_links()) != {hook.name for hook in HOOKS}:
            return KernelView()
        state = self.read_maps()
        entries, chains = {}, {}
        for key, entry in state.services.items():
            if entry.count:
                name = f"service-{entry.id}"
                ip = str(ipaddress.IPv4Address(key.ip))
                entries[str(Destination(PROTOCOL_NAMES[key.protocol], key.port, ip))] = name
                chains[name] = ChainFacts(dnat_to=tuple(str(a) for a in state.live_slots(entry) if a))
        return KernelView(entries=entries, chains=chains)

    def close(self) -> None:
        """Release this process's handles on the maps; the kernel state stays, as when the agent exits."""
        for pinned in self._maps.values():
            pinned.close()
        self._maps, self._applied = {}, None

    @_as_sync_error
    def cleanup(self) -> None:
        """Detach the programs and drop the maps."""
        self.close()
        if not os.path.isdir(self.pin_dir):
            return
        try:
            for path in self.pinned_links().values():
                bpf.detach_link(path)
            for name in os.listdir(self.pin_dir):  # the maps: unpinned, freed with their last user
                os.unlink(os.path.join(self.pin_dir, name))
            os.rmdir(self.pin_dir)  # PIN_ROOT stays: other nodes' agents may be creating theirs in it
        except OSError as err:
            raise SyncError(f"cannot remove {self.pin_dir}: {err}") from None
