"""Incremental rendering into a RuleSet: each ServicePort is rendered once into a Fragment (memoized
while the port is unchanged) and the fragments are merged, or the last RuleSet patched, into the
complete desired RuleSet that ruleset.diff compares with the kernel's."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from netagent.proxy.ruleset import Keys, RuleSet
from netagent.proxy.service import ServicePort


@dataclass(frozen=True)
class Fragment:
    """What one ServicePort contributes: its own chains/objects/elements, and its lines in the
    backend's shared chains (e.g. iptables' NA-SERVICES), which render() concatenates. Filled while
    its port is rendered, never changed afterwards."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    objects: dict[str, str] = field(default_factory=dict)
    elements: dict[tuple[str, str], str] = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)


def _parts(fragment: Fragment) -> tuple[Mapping, Mapping, Mapping]:
    return fragment.chains, fragment.objects, fragment.elements


class IncrementalRenderer(ABC):
    """render(ports) -> the complete RuleSet, costing only what changed since the last call.

    After render(), `_dirty` holds the keys that may differ from the previous RuleSet and, when that
    RuleSet was patched in place, `_before` their old values: what a diff against it needs."""

    def __init__(self) -> None:
        self._fragments: dict[ServicePort, Fragment] = {}  # memo: unchanged ports are not re-rendered
        self._dirty = Keys()  # keys the last render() may have changed
        self._merged: tuple[dict, dict, dict] | None = None  # the last render's chains, objects, elements
        self._counts: tuple[dict, dict, dict] = ({}, {}, {})  # how many fragments use each of those keys
        self._shared: dict[str, list[str]] = {}  # the last render's shared chain lines
        self._before: RuleSet | None = None  # after an in-place patch: the patched keys' old values

    def render(self, ports: Sequence[ServicePort]) -> RuleSet:
        """The complete desired RuleSet for these ports.

        Only new ports are rendered (the rest come from the memo), and unless a new or vanished port
        has lines in the shared chains, the previous RuleSet is patched rather than merged again from
        every fragment: at 10,000 services, one changed port costs its own keys, not 10,000 merges. The
        patch is in place (the last RuleSet becomes the new one), so the old values of the keys it may
        change are kept in self._before for the diff. A key several fragments contribute (an
        endpoint's hairpin element) is counted, so it stays while any of them does."""
        fragments, touched = {}, []
        memo = self._fragments
        # dict.fromkeys: a port listed twice must count once, or its keys' use counts would keep
        # them alive after the port is gone
        for p in dict.fromkeys(ports):
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
