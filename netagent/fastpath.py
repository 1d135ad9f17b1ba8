"""`netagent run --fast-path`: forward pod-to-pod traffic between nodes with tc BPF (ebpf/fastpath.c).

Pod traffic to another node normally crosses this node's IP stack twice over (routing and netfilter on
the way out, bridge and routing again on the way in). The BPF program makes the same routing decision
with bpf_fib_lookup() and hands the packet straight to the device the stack would have chosen: the
bridge (towards a local pod) or the uplink (the underlay interface in routes mode, the VXLAN device in
vxlan mode). It is an optimisation only: whatever it does not take (other protocols, IPv6, fragments,
unresolved neighbours, host-network peers, flows the stack NATed) goes through the stack as before, so
it can be switched on and off under traffic: on attaching, the flows conntrack already DNATed are
recorded as the stack's; `--no-fast-path` detaches everything at agent start.

In vxlan mode the programs also encapsulate and decapsulate themselves, which skips the VXLAN device
and the outer packet's trip through both nodes' IP stacks (ebpf/fastpath.c says how). They need each
remote VTEP's node address: `VxlanMaps` copies the device's forwarding table, which the node
controller writes, into the programs' `vteps` map at every poll.

Attachments: `forward` at tc ingress of the uplink and of every pod's host-side veth (before the
bridge, so pod packets skip the bridge's netfilter hooks too), `note_stack_flow` at tc egress of the
bridge and the uplink, and in vxlan mode `receive_vxlan` at tc ingress of the underlay interface.
The bridge and the veths come and go with pods (the CNI plugin makes them), so the attacher polls; a
pod's first packets before its veth is attached simply take the stack.
Each tc filter is named after a hash of the program text and its parameters: an agent restart that
finds its filters in place touches nothing (no compile, no re-attach; the attached programs keep their
flow map). A restarted agent that must load the program again (a new pod's veth, a new version)
re-attaches every hook so all share one map: the pinned `stack_flows` when bpffs is the host's (a
DaemonSet mounts /sys/fs/bpf), else (under `ip netns exec`, as in the lab, /sys and so the bpffs
mount are private to the agent) the running programs' map, found through bpftool and pinned anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodekit import bpf, conntrack
from nodekit.tools import ToolError

log = logging.getLogger(__name__)

PROGRAM = "fastpath.c"
FAST_MARK = 0x20000  # skb->mark bit: "forward() took this packet" (kube-proxy uses 0x4000 and 0x8000)
FILTER_PREFIX = "netagent-fp-"
# bpf_skb_adjust_room() flag BPF_F_ADJ_ROOM_DECAP_L4_UDP (bpf-next, 2026): strip a UDP tunnel and reset
# the packet's tunnel GSO state. Kernels before it (6.18 included) refuse it with -EINVAL.
ADJ_ROOM_DECAP_L4_UDP = 1 << 10
ADJ_ROOM_DECAP_L4_UDP_CFLAG = f"-DADJ_ROOM_DECAP_L4_UDP={ADJ_ROOM_DECAP_L4_UDP}ULL"
RETRY_FAILED_LOAD = 60.0  # seconds before a program version that failed to load is tried again


class FastPathError(RuntimeError):
    """The fast path could not be set up (bcc missing, compile or attach refused); traffic keeps
    taking the stack."""


def pin_path(state_dir: str) -> str:
    """Where this node's `stack_flows` map is pinned; one per agent state dir, so the nodes of a netns
    lab (one host, one bpffs) do not share it."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
    return f"{bpf.PIN_ROOT}/fastpath-{digest}"


@dataclass(frozen=True)
class Vxlan:
    """The uplink VXLAN device's settings: the fast path writes and strips the headers it would."""
    vni: int
    port: int
    local: str  # this node's underlay address, the outer source
    mac: str  # this node's VTEP MAC
    underlay: int  # the interface the device sends through


@dataclass(frozen=True)
class Devices:
    bridge: int
    uplink: int
    pod_veths: tuple[int, ...]  # the bridge's ports
    vxlan: Vxlan | None  # None in routes mode (or a VXLAN device without a local address)

    def hooks(self) -> list[tuple[int, int, str]]:
        """(ifindex, clsact parent, function) for every attachment."""
        return [
            (self.uplink, bpf.TC_INGRESS, "forward"),
            (self.uplink, bpf.TC_EGRESS, "note_stack_flow"),
            (self.bridge, bpf.TC_EGRESS, "note_stack_flow"),
            *((veth, bpf.TC_INGRESS, "forward") for veth in self.pod_veths),
            *([(self.vxlan.underlay, bpf.TC_INGRESS, "receive_vxlan")] if self.vxlan else []),
        ]


class FastPath:
    """Keeps the fast path attached to this node's pod bridge and uplink (in the current netns)."""

    def __init__(
        self, cluster_cidr: str, uplink: str, local_pod_cidrs: Callable[[], Iterable[str]], state_dir: str
    ) -> None:
        """local_pod_cidrs: read at every check (the node state file may not exist yet); the bridge
        is the device holding an address in one of them."""
        self.cluster = ipaddress.ip_network(cluster_cidr)
        if self.cluster.version != 4:
            raise ValueError(f"the fast path is IPv4 only; cluster CIDR {cluster_cidr} is not")
        self.uplink = uplink
        self.local_pod_cidrs = local_pod_cidrs
        self.pin_path = pin_path(state_dir)
        self._bpf: Any = None  # the loaded bcc module: its program fds attach later pods' veths too
        self._functions: dict[str, int] = {}  # function -> program fd
        self._loaded = ""  # the filter name (program version) self._functions belong to
        self._failed = ("", 0.0)  # the version whose load failed last, and when
        self._vxlan_maps = VxlanMaps(uplink)

    def ensure(self) -> Devices | None:
        """Attach wherever our current filters are missing; the devices it is attached to, None while
        the node has no pod bridge yet."""
        with IPRoute() as ipr:
            devices = self._devices(ipr)
            if devices is None:
                return None
            name = self._filter_name(devices)
            missing = [hook for hook in devices.hooks() if _filter_name(ipr, hook[0], hook[1]) != name]
            if missing:
                self._attach(ipr, devices, name, missing)
            if devices.vxlan:
                self._vxlan_maps.mirror(_vtep_addresses(ipr, devices.uplink), devices.pod_veths)
            return devices

    @property
    def remote_vteps(self) -> int:
        """VTEPs the programs can encapsulate for (vxlan mode)."""
        return self._vxlan_maps.remote_vteps

    def _attach(self, ipr: IPRoute, devices: Devices, name: str, missing: list[tuple[int, int, str]]) -> None:
        reloaded = self._loaded != name
        if reloaded:  # a fresh load: every hook must share its flow map
            try:
                bpf.ensure_bpffs()
            except bpf.BpfError as err:
                raise FastPathError(str(err)) from None
            self._adopt_running_flow_map()
            self._load(devices, name)
            self._vxlan_maps.forget()
            missing = devices.hooks()
        # Between replacing a hook's filter and the new one, packets take the stack; a flow the stack
        # NATs meanwhile is not noted by the egress hook, hence the conntrack seeding below.
        for index, parent, function in missing:
            bpf.attach_tc_filter(ipr, index, parent, self._functions[function], name, FILTER_PREFIX)
        _detach_all_except(ipr, {(index, parent) for index, parent, _function in devices.hooks()})
        if reloaded:  # after attaching: a flow NATed while the filters were replaced is in conntrack
            self._seed_from_conntrack()
        log.info("fast path attached at %d hooks (uplink %s, bridge #%d, %d pod veths%s)", len(missing),
                 self.uplink, devices.bridge, len(devices.pod_veths),
                 ", VXLAN encapsulation" if devices.vxlan else "")

    def _seed_from_conntrack(self) -> None:
        """Record the flows the stack has DNATed so far (connections opened before the fast path, or
        with a map that could not be adopted): their replies must keep going through the stack."""
        try:
            replies = list(conntrack.dnat_replies(family=4))
        except ToolError as err:
            log.warning("fast path: cannot read conntrack's NATed flows: %s", err)
            return
        table, seeded = self._bpf["stack_flows"], 0
        for reply in replies:
            if all(ipaddress.ip_address(address) in self.cluster for address in reply[:2]):
                table[table.Key(*_flow_key(*reply))] = table.Leaf(1)
                seeded += 1
        log.info("fast path: %d NATed flows known from conntrack", seeded)

    def _adopt_running_flow_map(self) -> None:
        """Before a load: pin the flow map of the programs already attached, if it is not pinned
        where we look (a restarted agent with its own bpffs mount, as in the lab), so the new
        programs share it and keep knowing which flows the stack NATed."""
        if os.path.exists(self.pin_path):
            return
        try:
            map_id = _running_maps(self.uplink).get("stack_flows")
            if map_id is not None:
                bpf.bpftool("map", "pin", "id", str(map_id), self.pin_path)
                log.info("fast path: kept the running programs' flow map (id %d)", map_id)
        except (OSError, bpf.BpfError, ValueError) as err:
            log.warning("fast path: cannot adopt the running flow map, starting an empty one: %s", err)

    def _devices(self, ipr: IPRoute) -> Devices | None:
        pod_nets = [ipaddress.ip_network(c) for c in self.local_pod_cidrs() if ":" not in c]
        gateways = {a["index"] for a in ipr.get_addr(family=2)
                    if any(ipaddress.ip_address(a.get("IFA_ADDRESS")) in net for net in pod_nets)}
        links = ipr.get_links()
        uplink = next((link for link in links if link.get_attr("IFLA_IFNAME") == self.uplink), None)
        # the bridge, not the VXLAN device, which holds an address in our pod CIDR too
        bridges = [link["index"] for link in links if link["index"] in gateways and _kind(link) == "bridge"]
        bridge = bridges[0] if bridges else None
        if uplink is None or bridge is None:
            return None
        ports = tuple(link["index"] for link in links if link.get_attr("IFLA_MASTER") == bridge)
        return Devices(bridge=bridge, uplink=uplink["index"], pod_veths=ports, vxlan=_vxlan(uplink))

    def _cflags(self, devices: Devices) -> list[str]:
        return [
            f"-DCLUSTER_NET={int(self.cluster.network_address)}U",
            f"-DCLUSTER_MASK={int(self.cluster.netmask)}U",
            f"-DBRIDGE_IFINDEX={devices.bridge}",
            f"-DUPLINK_IFINDEX={devices.uplink}",
            f"-DFAST_MARK={FAST_MARK}",
            f'-DPIN_PATH="{self.pin_path}"',
            *(_vxlan_cflags(devices.vxlan) if devices.vxlan else []),
        ]

    def _filter_name(self, devices: Devices) -> str:
        """Names the program text and parameters, so a restart can tell its own filters apart."""
        return FILTER_PREFIX + bpf.program_version(PROGRAM, *self._cflags(devices))

    def _load(self, devices: Devices, name: str) -> None:
        """Compile and load; the previous load's objects are released (the attached programs, and
        through them the map, live on in the kernel). A version that failed is not retried for a
        minute: a verifier refusal would otherwise be recompiled on every poll."""
        failed_name, failed_at = self._failed
        if failed_name == name and time.monotonic() - failed_at < RETRY_FAILED_LOAD:
            raise FastPathError(f"loading {PROGRAM} failed recently; retrying later")
        module = None
        try:
            module = bpf.compile_program(PROGRAM, self._cflags(devices))
            functions = {f: bpf.load_function(module, f, bpf.PROG_TYPE_SCHED_CLS)
                         for f in {function for _index, _parent, function in devices.hooks()}}
        except bpf.BpfError as err:
            bpf.release(module)
            self._failed = (name, time.monotonic())
            raise FastPathError(str(err)) from None
        bpf.release(self._bpf)
        self._bpf, self._functions, self._loaded = module, functions, name


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _vxlan(uplink) -> Vxlan | None:
    if _kind(uplink) != "vxlan":
        return None
    data = uplink.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    local, underlay = data.get_attr("IFLA_VXLAN_LOCAL"), data.get_attr("IFLA_VXLAN_LINK")
    if not local or ":" in local or not underlay:  # the encapsulation needs a fixed IPv4 source
        return None
    return Vxlan(vni=data.get_attr("IFLA_VXLAN_ID"), port=data.get_attr("IFLA_VXLAN_PORT"), local=local,
                 mac=uplink.get_attr("IFLA_ADDRESS"), underlay=underlay)


def _vxlan_cflags(vxlan: Vxlan) -> list[str]:
    mac = ",".join(f"0x{octet}" for octet in vxlan.mac.split(":"))
    return [
        f"-DVXLAN_VNI={vxlan.vni}",
        f"-DVXLAN_PORT={vxlan.port}",
        f"-DVTEP_MAC={{{mac}}}",
        f"-DNODE_IP={_native(socket.inet_aton(vxlan.local))}U",
        f"-DUNDERLAY_IFINDEX={vxlan.underlay}",
        ADJ_ROOM_DECAP_L4_UDP_CFLAG,
    ]


def _vtep_addresses(ipr: IPRoute, vxlan_device: int) -> dict[str, str]:
    """Remote VTEP MAC -> node address, from the VXLAN device's forwarding table (the node controller
    writes one entry per node; the all-zeros default entries are flooding, not a VTEP)."""
    found = {}
    for entry in ipr.fdb("dump", ifindex=vxlan_device):
        mac, address = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
        if entry["ifindex"] == vxlan_device and mac and mac != "00:00:00:00:00:00" and address \
                and ":" not in address:
            found[mac] = address
    return found


class RunningMap:
    """One map of the programs attached at the uplink's ingress, read and written through bpftool by
    id: a restarted agent that found its programs in place never loaded them, so it has no bcc handle
    on their maps."""

    def __init__(self, uplink: str, name: str) -> None:
        self.uplink = uplink
        self.name = name
        self._id: int | None = None  # found at first use

    def forget(self) -> None:
        """The programs were replaced (or an operation failed): find the map again at next use."""
        self._id = None

    def entries(self) -> dict[bytes, bytes]:
        """Key -> value, as raw bytes (bpftool prints each byte as a "0x.." string)."""
        def raw(octets: list[str]) -> bytes:
            return bytes(int(octet, 16) for octet in octets)

        return {raw(entry["key"]): raw(entry["value"]) for entry in self._bpftool("dump") or []}

    def update(self, key: bytes, value: bytes) -> None:
        self._bpftool("update", "key", "hex", *key.hex(" ").split(), "value", "hex", *value.hex(" ").split())

    def delete(self, key: bytes) -> None:
        self._bpftool("delete", "key", "hex", *key.hex(" ").split())

    def _bpftool(self, command: str, *args: str) -> Any:
        try:
            if self._id is None:
                self._id = _running_maps(self.uplink)[self.name]
            return bpf.bpftool("map", command, "id", str(self._id), *args)
        except (bpf.BpfError, ValueError, KeyError) as err:
            self.forget()
            raise FastPathError(f"the running programs' {self.name} map: {err}") from None


class VxlanMaps:
    """What the agent keeps in the running programs' maps in vxlan mode: `vteps` (remote VTEP MAC ->
    node address) equal to the VXLAN device's forwarding table, and no `local_pods` entry for a veth
    that is gone, whose address would otherwise lead decapsulated packets to a deleted interface
    (dropped) where the stack would find the neighbour unreachable."""

    def __init__(self, uplink: str) -> None:
        self._vteps = RunningMap(uplink, "vteps")
        self._local_pods = RunningMap(uplink, "local_pods")
        self._written: dict[bytes, bytes] | None = None  # what `vteps` holds; None: read it first
        self._pruned_for: tuple[int, ...] | None = None  # the pod veths `local_pods` was pruned for

    def forget(self) -> None:
        """Programs were loaded anew, with maps of their own (or an update failed half-way)."""
        self._vteps.forget()
        self._local_pods.forget()
        self._written = self._pruned_for = None

    def mirror(self, vteps: dict[str, str], pod_veths: tuple[int, ...]) -> None:
        try:
            self._sync_vteps({_vtep_key(mac): socket.inet_aton(address) for mac, address in vteps.items()})
            if pod_veths != self._pruned_for:
                for key, value in self._local_pods.entries().items():
                    if int.from_bytes(value[:4], sys.byteorder) not in pod_veths:
                        self._local_pods.delete(key)
                self._pruned_for = pod_veths
        except FastPathError:
            self.forget()  # what the maps hold is read again next time
            raise

    @property
    def remote_vteps(self) -> int:
        """Entries known to be in `vteps` (0 until a sync has read or written them)."""
        return len(self._written or {})

    def _sync_vteps(self, desired: dict[bytes, bytes]) -> None:
        if desired == self._written:
            return
        if self._written is None:
            self._written = self._vteps.entries()
        for key in self._written.keys() - desired.keys():
            self._vteps.delete(key)
            del self._written[key]
        for key, address in desired.items():
            if self._written.get(key) != address:
                self._vteps.update(key, address)
                self._written[key] = address
        log.info("fast path: %d remote VTEPs", len(desired))


def _vtep_key(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) + bytes(2)  # struct mac: six octets and two of padding


def _running_maps(device: str) -> dict[str, int]:
    """Map name -> id of the maps our programs attached at the device's ingress use."""
    attached = bpf.bpftool("net", "show", "dev", device)  # pyroute2 does not parse the ids
    running = [tc["id"] for entry in attached for tc in entry.get("tc", [])
               if tc.get("name", "").startswith(FILTER_PREFIX) and tc.get("kind") == "clsact/ingress"]
    map_ids = bpf.bpftool("prog", "show", "id", str(running[0])).get("map_ids", []) if running else []
    return {bpf.bpftool("map", "show", "id", str(map_id))["name"]: map_id for map_id in map_ids}


def remove(state_dir: str) -> None:
    """Detach every netagent fast-path filter in this netns and unpin the flow map: the stack takes
    all traffic again (`netagent run --no-fast-path` does this at start)."""
    with IPRoute() as ipr:
        _detach_all_except(ipr, keep=set())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin_path(state_dir))


def _flow_key(src: str, dst: str, sport: int, dport: int, protocol: int) -> tuple[int, ...]:
    """struct flow's fields as ctypes wants them: addresses and ports in network byte order in memory."""
    return (_native(socket.inet_aton(src)), _native(socket.inet_aton(dst)), _native(sport.to_bytes(2, "big")),
            _native(dport.to_bytes(2, "big")), protocol)


def _native(raw: bytes) -> int:
    """The integer these network-order bytes are to this host's CPU (what BPF code compares with)."""
    return int.from_bytes(raw, sys.byteorder)


def _filter_name(ipr: IPRoute, index: int, parent: int) -> str | None:
    return next((name for _info, name in bpf.tc_filters(ipr, index, parent, FILTER_PREFIX)), None)


def _detach_all_except(ipr: IPRoute, keep: set[tuple[int, int]]) -> None:
    """Our filters at every hook not in `keep` (an older program's layout, a bridge that went away)."""
    for link in ipr.get_links():
        for parent in (bpf.TC_INGRESS, bpf.TC_EGRESS):
            if (link["index"], parent) not in keep:
                bpf.detach_tc_filters(ipr, link["index"], parent, FILTER_PREFIX)


class FastPathAttacher:
    """Polls until the bridge exists, then keeps the fast path attached (a pod bridge recreated by the
    CNI plugin, an uplink that came back)."""

    def __init__(self, fast_path: FastPath, registry: CollectorRegistry | None = None,
                 interval: float = 2.0) -> None:
        self.fast_path = fast_path
        self.interval = interval
        self._hooks = Gauge("netagent_fast_path_hooks",
                            "tc hooks with the fast path's programs (0 until the pod bridge exists)",
                            registry=registry)
        self._failing = Gauge("netagent_fast_path_failing",
                              "1 while attaching or updating the fast path fails (the stack carries what "
                              "it does not)", registry=registry)
        self._remote_vteps = Gauge("netagent_fast_path_remote_vteps",
                                   "Remote VTEPs the programs encapsulate for (vxlan mode)",
                                   registry=registry)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fast-path", daemon=True)

    def start(self) -> FastPathAttacher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leaves the filters attached: traffic keeps its fast path across an agent restart."""
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        failed = False
        while not self._stopping.is_set():
            try:
                devices = self.fast_path.ensure()
                self._hooks.set(len(devices.hooks()) if devices else 0)
                self._remote_vteps.set(self.fast_path.remote_vteps)
                failed = False
            except Exception as err:  # whatever it is, the thread must keep trying
                if not failed:  # once per failure streak, not every poll
                    log.warning("fast path incomplete, the stack carries what it does not: %s", err,
                                exc_info=not isinstance(err, (FastPathError, NetlinkError, OSError)))
                failed = True
            self._failing.set(int(failed))
            self._stopping.wait(self.interval)
