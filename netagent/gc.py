"""Garbage collection of leaked CNI state: the agent's periodic collector and `netagent gc` by hand.

Why: a plugin or runtime killed in the middle of ADD or DEL (OOM, crash, node pressure) leaves IPs
allocated and veths on the bridge that nobody will ever DEL. The API server knows which pods run on
this node and their IPs; whatever of our network no live pod explains is released, with the reason
logged and counted in STATE/gc.json (shown by `netagent gc` and `lab status`).

Never touching a live pod is the first rule:
  - an attachment holding the IP of a live pod on this node is kept, whatever its age, and so is
    one whose sandbox the container runtime still has, when a runtime is given (containerd);
  - anything else is kept during a grace period, because a pod being created holds its allocation
    and veth before the API server reports its IP: allocations by their file's age, and a veth that
    no allocation explains by how long it has been seen orphaned (recorded in gc.json by name and
    ifindex, since the kernel keeps no creation time for links);
  - without a pod list from the API server (or a runtime's answer, when given) nothing is collected;
  - a veth no allocation explains is kept while some live pod's IP has no allocation either (its
    veth could be that one: an IPAM dir wiped under live pods must not cut them off);
  - once the agent wrote this node's pod CIDRs (STATE/node.json), addresses outside them are not
    this node's to judge and are left alone (a data dir shared by mistake loses nothing).
The kernel and disk work is cni.gc.sweep, the same code the CNI GC verb runs; the agent also
forgets the conntrack entries of every address it releases.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from cni import gc as cni_gc
from cni.config import DEFAULT_DATA_DIR, IPNetwork
from cni.install import PLUGIN_NAME
from nodekit import conntrack, nodestate
from nodekit.files import atomic_write

log = logging.getLogger("netagent.gc")

DEFAULT_GRACE = 120.0
DEFAULT_INTERVAL = 60.0
STATE_FILE = "gc.json"
NO_LIVE_POD = "no live pod on this node has its IP"
ORPHAN_VETH = "veth without an allocation"
FINISHED_PHASES = ("Succeeded", "Failed")  # such a pod's sandbox is gone: its IP is no longer in use


class EvidenceUnavailable(RuntimeError):
    """The pods (or the runtime's sandboxes) could not be listed: the pass stops before touching anything."""


@dataclass(frozen=True)
class Evidence:
    """What says an attachment is in use, gathered before each pass."""

    pod_ips: frozenset[str]  # of the pods the API server says run on this node
    sandboxes: frozenset[str] | None = None  # container ids the runtime still has; None: no runtime known


GatherEvidence = Callable[[], Evidence]


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
def _updating_state(state_dir: str, save: bool) -> Iterator[GcState]:
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


@dataclass(frozen=True)
class PassResult:
    releases: tuple[cni_gc.Release, ...]
    waiting: int  # candidates kept only because they are still inside the grace period
    in_runtime: int  # attachments without a live pod IP kept because the runtime still has the sandbox
    held_orphans: int  # veths without allocation kept because some live pod's IP has no allocation
    foreign: int  # attachments left alone because their addresses are outside this node's pod CIDRs


class Collector:
    """One pass compares the node's attachments with the evidence of use and releases the leftovers."""

    def __init__(self, network_name: str, data_dir: str, state_dir: str, grace: float,
                 gather_evidence: GatherEvidence) -> None:
        self.network_name = network_name
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.grace = grace
        self.gather_evidence = gather_evidence

    def run_once(self, dry_run: bool = False) -> PassResult:
        try:
            evidence = self.gather_evidence()
        except Exception as exc:  # API server or runtime unreachable, bad kubeconfig, ...
            raise EvidenceUnavailable(f"{type(exc).__name__}: {exc}") from exc
        own_cidrs = _node_pod_cidrs(self.state_dir)
        with _updating_state(self.state_dir, save=not dry_run) as state:
            judge = _PassJudge(evidence, own_cidrs, self.grace, state.orphan_veths_seen)
            report = cni_gc.sweep(self.network_name, self.data_dir, judge.attachment, judge.orphan_veth,
                                  dry_run=dry_run)
            if not dry_run:
                state.passes += 1
                state.last_pass = time.time()
                state.orphan_veths_seen = judge.orphans_kept
                for release in report.releases:
                    by_reason = state.released.setdefault(release.kind, {})
                    by_reason[release.reason] = by_reason.get(release.reason, 0) + 1
        for release in report.releases:
            owner = "/".join(release.owner) if release.owner else "no owner"
            log.info("%s %s %s (attachment %s): %s", "would release" if dry_run else "released",
                     release.kind, release.name, owner, release.reason)
        if not dry_run:
            conntrack.forget_addresses(r.name for r in report.releases if r.kind == "allocation")
        if judge.held_orphans:
            log.warning("kept %d veths without allocation: live pods %s have none, one may be theirs",
                        judge.held_orphans, ", ".join(sorted(judge.unallocated_pod_ips())))
        return PassResult(report.releases, judge.waiting, judge.in_runtime, judge.held_orphans, judge.foreign)


class _PassJudge:
    """The keep-or-collect rules of the module docstring, for one pass."""

    def __init__(self, evidence: Evidence, own_cidrs: tuple[IPNetwork, ...] | None, grace: float,
                 orphans_seen: dict[str, float]) -> None:
        self.evidence = evidence
        self.own_cidrs = own_cidrs
        self.grace = grace
        self.now = time.time()
        self.orphans_seen = orphans_seen
        self.orphans_kept: dict[str, float] = {}
        self.allocated: set[str] = set()
        self.waiting = 0
        self.in_runtime = 0
        self.held_orphans = 0
        self.foreign = 0

    def attachment(self, attachment: cni_gc.Attachment) -> str | None:
        self.allocated.update(str(address) for address in attachment.addresses)
        if any(str(address) in self.evidence.pod_ips for address in attachment.addresses):
            return None
        sandboxes = self.evidence.sandboxes
        if sandboxes is not None and attachment.owner[0] in sandboxes:
            self.in_runtime += 1
            return None
        if not self._inside_own_cidrs(attachment):
            self.foreign += 1
            return None
        if attachment.age < self.grace:
            self.waiting += 1
            return None
        return NO_LIVE_POD

    def _inside_own_cidrs(self, attachment: cni_gc.Attachment) -> bool:
        if self.own_cidrs is None:
            return True
        return any(address in cidr for address in attachment.addresses for cidr in self.own_cidrs)

    def unallocated_pod_ips(self) -> set[str]:
        """Live pods' IPs inside this node's pod CIDRs that no allocation holds (sweep judges every
        attachment before any veth, so `allocated` is complete by then)."""
        inside = [ip for ip in self.evidence.pod_ips
                  if self.own_cidrs is None or any(ipaddress.ip_address(ip) in c for c in self.own_cidrs)]
        return set(inside) - self.allocated

    def orphan_veth(self, veth: cni_gc.Veth) -> str | None:
        if self.unallocated_pod_ips():
            self.held_orphans += 1
            return None
        key = f"{veth.name}@{veth.index}"
        first_seen = self.orphans_seen.get(key, self.now)
        if self.now - first_seen < self.grace:
            self.orphans_kept[key] = first_seen
            self.waiting += 1
            return None
        return ORPHAN_VETH


def _node_pod_cidrs(state_dir: str) -> tuple[IPNetwork, ...] | None:
    """This node's pod CIDRs from the agent's node state; None when it has not been written."""
    try:
        state = nodestate.read(nodestate.path_in(state_dir))
    except FileNotFoundError:
        return None
    return tuple(ipaddress.ip_network(cidr) for cidr in state.pod_cidrs)


def pod_ips(pods: list[Any]) -> frozenset[str]:
    """IPs that CNI gave to pods still holding their sandbox: host-network pods hold the node's IP,
    not one of ours, and finished pods' IPs are free to collect."""
    ips = set()
    for pod in pods:
        status = pod.status
        if status is None or status.phase in FINISHED_PHASES or (pod.spec and pod.spec.host_network):
            continue
        ips.update(ip.ip for ip in status.pod_ips or [] if ip.ip)
        if status.pod_ip:
            ips.add(status.pod_ip)
    return frozenset(ips)


def node_selector(node_name: str) -> str:
    return f"spec.nodeName={node_name}"


class GcController:
    """The agent's collector: a pass at start (once the pods of this node are listed) and every interval.

    The pod list comes from an informer, so an API server outage leaves the last known pods in force.
    """

    def __init__(self, api_client: Any, node_name: str, network_name: str, data_dir: str, state_dir: str,
                 interval: float, grace: float, containerd_socket: str | None = None) -> None:
        from kubernetes import client

        from netagent.kube import Informer, SyncLoop

        self.pods = Informer("pods", client.CoreV1Api(api_client).list_pod_for_all_namespaces,
                             field_selector=node_selector(node_name))
        self.containerd_socket = containerd_socket
        self.collector = Collector(network_name, data_dir, state_dir, grace, self._evidence)
        self.loop = SyncLoop("gc", self._pass, min_interval=min(interval, 1.0), max_interval=interval)

    def start(self) -> None:
        self.pods.start()
        self.loop.start()
        self.loop.request()

    def stop(self) -> None:
        self.loop.stop()
        self.pods.stop()

    def _evidence(self) -> Evidence:
        if not self.pods.wait_for_sync(timeout=30):
            raise RuntimeError("the pods of this node are not listed yet: collecting nothing without them")
        if _node_pod_cidrs(self.collector.state_dir) is None:  # the CIDR guard must be in force
            raise RuntimeError("this node's pod CIDRs are not known yet (no node.json): collecting nothing")
        return Evidence(pod_ips(self.pods.store.list()), _sandboxes_or_none(self.containerd_socket))

    def _pass(self) -> None:
        result = self.collector.run_once()
        log.info("GC pass: released %d; kept %d inside the grace period, %d live in the runtime",
                 len(result.releases), result.waiting, result.in_runtime)


def containerd_sandboxes(socket_path: str) -> frozenset[str]:
    """Every container id containerd still has, in the forms a CNI call names a pod by: CRI uses the
    sandbox's id, `ctr run --cni` uses "<namespace>-<id>". Raises RuntimeError when ctr cannot answer."""
    namespaces = _ctr(socket_path, "namespaces", "list", "-q")
    ids: set[str] = set()
    for namespace in namespaces:
        for container_id in _ctr(socket_path, "--namespace", namespace, "containers", "list", "-q"):
            ids.update((container_id, f"{namespace}-{container_id}"))
    return frozenset(ids)


def _ctr(socket_path: str, *args: str) -> list[str]:
    try:
        done = subprocess.run(["ctr", "--address", socket_path, *args], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot ask containerd at {socket_path} for its sandboxes: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"cannot ask containerd at {socket_path} for its sandboxes: "
                           f"{(done.stderr or done.stdout).strip()}")
    return done.stdout.split()


def _sandboxes_or_none(containerd_socket: str | None) -> frozenset[str] | None:
    return None if containerd_socket is None else containerd_sandboxes(containerd_socket)


def _listed_evidence(kubeconfig: str | None, node_name: str, containerd_socket: str | None) -> GatherEvidence:
    """For one pass by hand: list this node's pods now (and the runtime's sandboxes, if one is given)."""
    def gather() -> Evidence:
        from kubernetes import client

        from netagent.kube import load_api_client

        core = client.CoreV1Api(load_api_client(kubeconfig))
        pods = core.list_pod_for_all_namespaces(field_selector=node_selector(node_name), _request_timeout=30)
        return Evidence(pod_ips(pods.items), _sandboxes_or_none(containerd_socket))
    return gather


def _default_node_name(state_dir: str) -> str:
    """The node the agent wrote node.json for, else $NODE_NAME, else the hostname (as `netagent run`)."""
    try:
        return nodestate.read(nodestate.path_in(state_dir)).node_name
    except (OSError, ValueError, KeyError, TypeError):
        return os.environ.get("NODE_NAME") or socket.gethostname()


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only print what would be released.")
@click.option("--state-dir", default=nodestate.DEFAULT_STATE_DIR, show_default=True,
              help="The agent's state dir: node.json (node name) and gc.json (totals, orphan veths seen).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Kubeconfig file [default: in-cluster config, else ~/.kube/config].")
@click.option("--node-name", default=None,
              help="This node [default: from STATE/node.json, else $NODE_NAME, else the hostname].")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, help="The CNI IPAM dataDir.")
@click.option("--network-name", default=PLUGIN_NAME, show_default=True, help="The CNI network's name.")
@click.option("--grace", type=click.FloatRange(0.0), default=DEFAULT_GRACE, show_default=True,
              help="Seconds an attachment without a live pod is left alone (a pod may be being created).")
@click.option("--containerd-socket", default=None,
              help="Also keep every attachment whose container containerd still has (via ctr).")
def gc_cmd(dry_run: bool, state_dir: str, kubeconfig: str | None, node_name: str | None, data_dir: str,
           network_name: str, grace: float, containerd_socket: str | None) -> None:
    """Run one GC pass on this node (in its network namespace) and print what it released."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    node_name = node_name or _default_node_name(state_dir)
    evidence = _listed_evidence(kubeconfig, node_name, containerd_socket)
    collector = Collector(network_name, data_dir, state_dir, grace, evidence)
    try:
        result = collector.run_once(dry_run=dry_run)
    except EvidenceUnavailable as exc:
        raise click.ClickException(f"GC pass on node {node_name} failed, nothing released: {exc}") from None
    except Exception as exc:  # netlink or disk failure part-way: what is done is done, a rerun finishes
        raise click.ClickException(f"GC pass on node {node_name} failed part-way ({type(exc).__name__}: "
                                   f"{exc}); run it again to finish") from None
    verb = "would release" if dry_run else "released"
    for release in result.releases:
        owner = f"container {release.owner[0]} {release.owner[1]}" if release.owner else "no allocation"
        click.echo(f"{verb} {release.kind} {release.name} ({owner}): {release.reason}")
    click.echo(f"node {node_name}, network {network_name}: {verb} {len(result.releases)}; kept "
               f"{result.waiting} inside the {grace:.0f}s grace period, {result.in_runtime} live in the "
               f"runtime, {result.foreign} outside this node's pod CIDRs, {result.held_orphans} veths while "
               "live pods lack an allocation")
    click.echo(f"totals: {read_state(state_dir).summary()}")


def start_collector(api_client: Any, node_name: str, data_dir: str, state_dir: str, interval: float,
                    grace: float, containerd_socket: str | None = None) -> GcController:
    """What `netagent run` calls: the collector for the netagent network, already running."""
    controller = GcController(api_client, node_name, PLUGIN_NAME, data_dir, state_dir, interval, grace,
                              containerd_socket)
    controller.start()
    log.info("GC every %.0fs (grace %.0fs) of %s/%s", interval, grace, data_dir, PLUGIN_NAME)
    return controller

