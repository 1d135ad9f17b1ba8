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


@dataclass(frozen=True)
class Keys:
    """The names a diff needs to look at (the rest is known to be equal)."""

    chains: frozenset[str] = frozenset()
    objects: frozenset[str] = frozenset()
    elements: frozenset[tuple[str, str]] = frozenset()


def diff_mappings(
    old: Mapping[K, object], new: Mapping[K, object], keys: frozenset[K] | None = None
) -> Delta[K]:
    if keys is None:
        added = (k for k in new if k not in old)
        removed = (k for k in old if k not in new)
        common = (k for k in new if k in old)
    else:
        added = (k for k in keys if k in new and k not in old)
        removed = (k for k in keys if k in old and k not in new)
        common = (k for k in keys if k in new and k in old)
    changed = (k for k in common if old[k] is None or old[k] != new[k])
    return Delta(added=tuple(sorted(added)), changed=tuple(sorted(changed)), removed=tuple(sorted(removed)))


def diff(old: RuleSet, new: RuleSet, only: Keys | None = None) -> RuleSetDiff:
    """What turns `old` into `new`; with `only`, just those keys are compared (all others are equal)."""
    return RuleSetDiff(
        chains=diff_mappings(old.chains, new.chains, only and only.chains),
        objects=diff_mappings(
            dict.fromkeys(old.objects, ""), dict.fromkeys(new.objects, ""), only and only.objects
        ),
        elements=diff_mappings(old.elements, new.elements, only and only.elements),
    )
