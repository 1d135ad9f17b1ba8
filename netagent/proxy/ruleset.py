"""Backend-neutral rendered state and the one diff step every backend uses.

A backend renders a snapshot into a RuleSet (named chains with their rules, named objects such as
nftables sets, and map/set elements), compares it with what it last applied, and writes only the
difference in one kernel transaction. Content None marks "present in the kernel, content unknown"
(after a restart): such a chain always counts as changed, so it is rewritten, never flushed first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass(frozen=True)
class RuleSet:
    chains: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    objects: Mapping[str, str] = field(default_factory=dict)  # name -> declaration (name encodes content)
    elements: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (map/set, key) -> value


@dataclass(frozen=True)
class Delta(Generic[K]):
    added: tuple[K, ...] = ()
    changed: tuple[K, ...] = ()
    removed: tuple[K, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass(frozen=True)
class RuleSetDiff:
    chains: Delta[str]
    objects: Delta[str]
    elements: Delta[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.chains or self.objects or self.elements)


def diff_mappings(old: Mapping[K, object], new: Mapping[K, object]) -> Delta[K]:
    added = tuple(sorted(k for k in new if k not in old))
    removed = tuple(sorted(k for k in old if k not in new))
    changed = tuple(sorted(k for k in new if k in old and (old[k] is None or old[k] != new[k])))
    return Delta(added=added, changed=changed, removed=removed)


def diff(old: RuleSet, new: RuleSet) -> RuleSetDiff:
    return RuleSetDiff(
        chains=diff_mappings(old.chains, new.chains),
        objects=diff_mappings(dict.fromkeys(old.objects, ""), dict.fromkeys(new.objects, "")),
        elements=diff_mappings(old.elements, new.elements),
    )
