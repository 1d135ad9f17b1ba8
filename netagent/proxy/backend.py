"""What every proxy backend shares: the sync loop (render -> diff -> one transaction) and the
"what does the kernel hold" view `netagent proxy show` compares with the desired snapshot.

A backend handles ONE IP family; dual-stack nodes run one per family. It runs its kernel tools
(iptables-restore, nft) in the current netns, or in the named netns when given one (tests, tooling).
"""

from __future__ import annotations

import ipaddress
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from netagent.proxy.gc_pause import gc_paused
from netagent.proxy.ruleset import Keys, RuleSet, RuleSetDiff, diff
from netagent.proxy.service import ServicePort
from nodekit.tools import ToolError, run_tool

log = logging.getLogger(__name__)

MASQUERADE_MARK = 0x4000  # the bit kube-proxy also uses: "SNAT this packet on the way out"


class SyncError(RuntimeError):
    """The kernel refused a transaction; nothing of it was applied."""


@dataclass(frozen=True)
class NodeContext:
    node_name: str
    cluster_cidrs: tuple[str, ...] = ()  # traffic from outside these is masqueraded to cluster IPs

    def cidrs(self, family: int) -> tuple[str, ...]:
        return tuple(c for c in self.cluster_cidrs if ipaddress.ip_network(c, strict=False).version == family)


@dataclass(frozen=True)
class Fragment:
    """What one ServicePort contributes: its own chains/objects/elements, and its lines in the
    backend's shared chains (e.g. iptables' NA-SERVICES), which render() concatenates."""

    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    objects: Mapping[str, str] = field(default_factory=dict)
    elements: Mapping[tuple[str, str], str] = field(default_factory=dict)
    shared: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainFacts:
    """The parts of a chain that decide where a connection ends up."""

    jumps: tuple[str, ...] = ()
    dnat_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelView:
    """Service destinations ("TCP 10.96.0.1:443", "TCP nodeport 30080") -> entry chain, and chains."""

    entries: Mapping[str, str] = field(default_factory=dict)
    chains: Mapping[str, ChainFacts] = field(default_factory=dict)

    def backends(self) -> dict[str, frozenset[str]]:
        """Each destination with the endpoint addresses it can be DNATed to."""
        return {dest: frozenset(self._reachable(chain, set())) for dest, chain in self.entries.items()}

    def _reachable(self, chain: str, seen: set[str]) -> set[str]:
        if chain in seen or chain not in self.chains:
            return set()
        seen.add(chain)
        facts = self.chains[chain]
        found = set(facts.dnat_to)
        for target in facts.jumps:
            found |= self._reachable(target, seen)
        return found


def destination(protocol: str, ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"{protocol} {host}:{port}"


def nodeport_destination(protocol: str, port: int) -> str:
    return f"{protocol} nodeport {port}"


def expected_backends(ports: Iterable[ServicePort]) -> dict[str, frozenset[str]]:
    """What KernelView.backends() must equal when the kernel matches the snapshot."""
    expected: dict[str, frozenset[str]] = {}
    for p in ports:
        if p.cluster_endpoints:
            expected[destination(p.protocol, p.cluster_ip, p.port)] = frozenset(
                e.address for e in p.cluster_endpoints
            )
        external = {e.address for e in p.external_endpoints}
        if p.external_local:  # pods and the node itself take the cluster path even under eTP Local
            external |= {e.address for e in p.cluster_endpoints}
        if not external:
            continue
        for ip in p.external_ips:
            expected[destination(p.protocol, ip, p.port)] = frozenset(external)
        if p.node_port:
            expected[nodeport_destination(p.protocol, p.node_port)] = frozenset(external)
    return expected


def _parts(fragment: Fragment) -> tuple[Mapping, Mapping, Mapping]:
    return fragment.chains, fragment.objects, fragment.elements


class Backend(ABC):
    """Renders ServicePorts of one family into kernel rules and keeps the kernel in step."""

    kind: str

    def __init__(self, node: NodeContext, family: int = 4, netns: str | None = None) -> None:
        self.node = node
        self.family = family
        self.netns = netns
        self._applied: RuleSet | None = None  # None: unknown, read the kernel before the next sync
        self._fragments: dict[ServicePort, Fragment] = {}  # memo: unchanged ports are not re-rendered
        self._dirty = Keys()  # keys the last render() may have changed
        self._merged: tuple[dict, dict, dict] | None = None  # the last render's chains, objects, elements
        self._counts: tuple[dict, dict, dict] = ({}, {}, {})  # how many fragments use each of those keys
        self._shared: dict[str, list[str]] = {}  # the last render's shared chain lines
        self._before: RuleSet | None = None  # after an in-place patch: the patched keys' old values

    def sync(self, ports: Sequence[ServicePort]) -> RuleSetDiff:
        """Make the kernel match `ports` in one transaction; returns what changed.

        After a failure the kernel is unchanged (the transaction is atomic) and the next sync starts
        again from what the kernel really holds.
        """
        with gc_paused():
            desired = self.render([p for p in ports if p.family == self.family])
        if self._applied is None:
            current, changes = self.read_kernel(), None
        else:  # only what came from new or vanished ports can differ, plus the fixed chains
            current = self._applied if self._before is None else self._before
            changes = self._dirty
        changes = diff(current, desired, changes)
        if changes:
            try:
                with gc_paused():
                    transaction = self.transaction(current, desired, changes)
                self.apply(transaction)
            except BaseException:
                self._applied = None  # the memo already moved on: the retry must compare with the kernel
                raise
        self._applied = desired
        return changes

    def render(self, ports: Sequence[ServicePort]) -> RuleSet:
        """The complete desired RuleSet for these ports (all of this backend's family).

        Only new ports are rendered (the rest come from the memo), and unless a new or vanished port
        has lines in the shared chains, the previous RuleSet is patched rather than merged again from
        every fragment: at 10,000 services, one changed port costs its own keys, not 10,000 merges. The
        patch is in place (the last RuleSet becomes the new one), so the old values of the keys it may
        change are kept in self._before for sync's diff. A key several fragments contribute (an
        endpoint's hairpin element) is counted, so it stays while any of them does."""
        fragments, touched = {}, []
        memo = self._fragments
        for p in ports:
            fragment = memo.get(p)
            if fragment is None:
                fragment = self.render_port(p)
                touched.append(fragment)
            fragments[p] = fragment
        gone = [fragment for p, fragment in memo.items() if p not in fragments]
        self._fragments = fragments
        full = self._merged is None or any(f.shared for f in (*touched, *gone))
        if full:
            self._merged = self._merge(fragments.values())
        chains, objects, elements = self._merged
        fixed_chains, fixed_objects = self.fixed_chains(self._shared), self.fixed_objects()
        changed = [*touched, *gone]
        self._dirty = dirty = Keys(
            chains=frozenset(fixed_chains).union(*(f.chains for f in changed)),
            objects=frozenset(fixed_objects).union(*(f.objects for f in changed)),
            elements=frozenset().union(*(f.elements for f in changed)),
        )
        self._before = None
        if not full:
            self._before = RuleSet(
                chains={k: chains[k] for k in dirty.chains if k in chains},
                objects={k: objects[k] for k in dirty.objects if k in objects},
                elements={k: elements[k] for k in dirty.elements if k in elements},
            )
            self._patch(gone, touched, chains, objects, elements)
        chains.update(fixed_chains)
        objects.update(fixed_objects)
        return RuleSet(chains=chains, objects=objects, elements=elements)

    def _merge(self, fragments: Iterable[Fragment]) -> tuple[dict, dict, dict]:
        """All fragments' chains, objects and elements (with their use counts) and shared lines."""
        merged: tuple[dict, dict, dict] = ({}, {}, {})
        counts: tuple[dict, dict, dict] = ({}, {}, {})
        shared: dict[str, list[str]] = {}
        for fragment in fragments:
            for part, into, count in zip(_parts(fragment), merged, counts, strict=True):
                into.update(part)
                for key in part:
                    count[key] = count.get(key, 0) + 1
            for name, lines in fragment.shared.items():
                shared.setdefault(name, []).extend(lines)
        self._counts, self._shared = counts, shared
        return merged

    def _patch(self, gone: list[Fragment], new: list[Fragment], *merged: dict) -> None:
        """Take the vanished fragments' keys out of `merged` (unless still used) and add the new ones."""
        for fragment in gone:
            for part, into, count in zip(_parts(fragment), merged, self._counts, strict=True):
                for key in part:
                    count[key] -= 1
                    if not count[key]:
                        del count[key], into[key]
        for fragment in new:
            for part, into, count in zip(_parts(fragment), merged, self._counts, strict=True):
                into.update(part)
                for key in part:
                    count[key] = count.get(key, 0) + 1

    @abstractmethod
    def render_port(self, p: ServicePort) -> Fragment:
        """Everything one service port needs."""

    @abstractmethod
    def fixed_chains(self, shared: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
        """The chains every node has, shared chains filled with the ports' lines."""

    def fixed_objects(self) -> dict[str, str]:
        """Sets/maps every node has (none unless the backend uses them)."""
        return {}

    @abstractmethod
    def read_kernel(self) -> RuleSet:
        """What the kernel holds now, chain contents None (unknown), objects and elements exact."""

    @abstractmethod
    def transaction(self, current: RuleSet, desired: RuleSet, changes: RuleSetDiff) -> str:
        """The text of one atomic kernel transaction turning `current` into `desired`."""

    @abstractmethod
    def apply(self, transaction: str) -> None:
        """Run the transaction; raise SyncError if the kernel refused it."""

    @abstractmethod
    def kernel_view(self) -> KernelView:
        """The service destinations programmed in the kernel, for `netagent proxy show`."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove everything this backend ever created (tests, switching backends)."""

    def run(self, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
        """Run a kernel tool here or in self.netns; a failure becomes SyncError with its stderr."""
        try:
            return run_tool(argv, netns_name=self.netns, stdin=stdin, check=check)
        except ToolError as err:
            raise SyncError(str(err)) from None
