"""`netagent proxy show`'s view: which endpoints each service destination reaches in the kernel
(KernelView, read back by each backend) next to the ones the snapshot wants."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from netagent.proxy.service import ServicePort, Snapshot

if TYPE_CHECKING:
    from netagent.proxy.backend import Backend


@dataclass(frozen=True)
class ChainFacts:
    """The parts of a chain that decide where a connection ends up."""

    jumps: tuple[str, ...] = ()
    dnat_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelView:
    """Service destinations ("TCP 10.96.0.1:443", "TCP nodeport 30080") -> entry chain, and chains."""

    entries: Mapping[str, str] = field(default_factory=dict)  # keyed by str(policy.Destination)
    chains: Mapping[str, ChainFacts] = field(default_factory=dict)

    def endpoints(self) -> dict[str, frozenset[str]]:
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


def expected_endpoints(ports: Iterable[ServicePort]) -> dict[str, frozenset[str]]:
    """What KernelView.endpoints() must equal when the kernel matches the snapshot: each DNATed
    destination (str(Destination)) with every endpoint some source reaches through it."""
    expected: dict[str, frozenset[str]] = {}
    for p in ports:
        for traffic in p.policy.traffic:
            if traffic.dnat:
                addresses = frozenset(e.address for e in p.policy.reachable(traffic))
                expected.update(dict.fromkeys(map(str, traffic.destinations), addresses))
    return expected


@dataclass(frozen=True)
class Comparison:
    """One service destination: the endpoints the snapshot wants and the ones the kernel has."""

    destination: str
    desired: frozenset[str]
    kernel: frozenset[str]

    @property
    def in_sync(self) -> bool:
        return self.desired == self.kernel


def compare(backends: Sequence[Backend], snapshot: Snapshot) -> list[Comparison]:
    rows = []
    for backend in backends:
        desired = expected_endpoints(snapshot.for_family(backend.family))
        kernel = backend.kernel_view().endpoints()
        for dest in sorted(desired.keys() | kernel.keys()):
            rows.append(Comparison(dest, desired.get(dest, frozenset()), kernel.get(dest, frozenset())))
    return rows
