"""Seeded generators of hostile inputs for the fuzz suites (no tests here), and the tally they report.

Every input starts as a valid document and gets a few mutations, so that most inputs get past the
first check and reach deeper code: wrong types, nulls, huge numbers, odd unicode (lone surrogates,
bidi controls, astral characters), deep nesting, missing and unknown fields, unknown enum values,
bad CIDRs and addresses, duplicated list entries, and byte-level damage of the encoded JSON.

Sizes and seed come from the environment (see tests/test_fuzz_cni.py):
    NETAGENT_FUZZ_EXAMPLES   in-process CNI inputs (default 2500; the other classes scale with it)
    NETAGENT_FUZZ_SEED       the generator's seed (default 11: CI runs the same inputs every time)
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EXAMPLES = int(os.environ.get("NETAGENT_FUZZ_EXAMPLES", "2500"))
SEED = int(os.environ.get("NETAGENT_FUZZ_SEED", "11"))
DEEP_PLACEHOLDER = "\x00deep\x00"  # replaced in the encoded bytes by 100,000 nested arrays
DEEP_BYTES = b"[" * 100_000 + b"]" * 100_000


def scaled(fraction: float, minimum: int) -> int:
    """A class of inputs that costs more per input (a process, a watch event) gets a share of EXAMPLES."""
    return max(minimum, int(EXAMPLES * fraction))


# values that break types and assumptions, usable for any field
ODD_STRINGS = (
    "", " ", "\n", "\ud800", "x\udfffy", "é", "\u202eevil", "𝔁𝔂", "a/b", "../..", "x" * 5000, "null",
    "-1", "1e400", "\t", "ＡＢ", "\ufeff", "%s%n", "$(reboot)",
)
ODD_NUMBERS = (0, -1, 1, 2**31, 2**63, 2**70, 10**30, -(10**30), 1.5, float("inf"), float("nan"), 65536, 0.0)


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(ODD_STRINGS)
    if kind == 2:
        return rng.choice(ODD_NUMBERS)
    if kind == 3:
        return rng.choice((True, False))
    if kind == 4:
        return [] if depth > 2 else [odd_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 5:
        return {} if depth > 2 else {rng.choice(ODD_STRINGS): odd_value(rng, depth + 1)}
    if kind == 6:
        nested: Any = rng.choice((1, "x", None))
        for _ in range(rng.randrange(2, 40)):
            nested = [nested] if rng.random() < 0.5 else {"a": nested}
        return nested
    if kind == 7:
        return rng.choice(("Hibernating", "tcp", "IPv5", "UNKNOWN", "ClusterIP ", "Local\x00"))
    return rng.randrange(-5, 70000)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into doc (dict keys and list indexes), containers included."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _parent(doc: Any, path: tuple) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


def mutate(rng: random.Random, doc: dict, special: dict[str, tuple] | None = None,
           deep: bool = False) -> dict:
    """One structural mutation at a random place in doc (in place; returns doc).

    `special` maps a field name to values that matter for that field (bad CIDRs for "subnet", ...):
    where the chosen place is such a field, one of them is used half of the time.
    """
    paths = [p for p in _paths(doc) if p]
    if not paths:
        doc[rng.choice(ODD_STRINGS)] = odd_value(rng)
        return doc
    path = rng.choice(paths)
    parent, key = _parent(doc, path), path[-1]
    action = rng.randrange(10)
    if special and isinstance(key, str) and key in special and rng.random() < 0.5:
        parent[key] = rng.choice(special[key])
    elif action <= 1:  # remove the field / list entry
        del parent[key]
    elif action == 2 and isinstance(parent, list):  # duplicate a list entry
        parent.insert(key, copy.deepcopy(parent[key]))
    elif action == 3 and isinstance(parent, dict):  # an unknown sibling field
        parent[rng.choice(("futureField", "x-extra", "\u202e", "spec", "ipam"))] = odd_value(rng)
    elif action == 4 and deep:
        parent[key] = DEEP_PLACEHOLDER
    else:
        parent[key] = odd_value(rng)
    return doc


def mutated(rng: random.Random, doc: dict, special: dict[str, tuple] | None = None, deep: bool = False,
            most: int = 3) -> tuple[dict, int]:
    """A deep copy of doc with 0..most mutations (0 about a fifth of the time): (document, count)."""
    result = copy.deepcopy(doc)
    count = 0 if rng.random() < 0.2 else rng.randint(1, most)
    for _ in range(count):
        mutate(rng, result, special, deep)
    return result, count


def encode(rng: random.Random, doc: Any, damage: float = 0.08) -> bytes:
    """JSON bytes of doc (DEEP_PLACEHOLDER becomes 100,000 nested arrays); sometimes damaged bytes."""
    data = json.dumps(doc).encode()  # ensure_ascii: lone surrogates travel as \\udXXX escapes
    data = data.replace(json.dumps(DEEP_PLACEHOLDER).encode(), DEEP_BYTES)
    if rng.random() >= damage:
        return data
    kind = rng.randrange(7)
    if kind == 0:
        return data[: rng.randrange(len(data) + 1)]
    if kind == 1:
        position = rng.randrange(len(data))
        return data[:position] + bytes([rng.randrange(256)]) + data[position + 1:]
    if kind == 2:
        return b"\xef\xbb\xbf" + data  # a UTF-8 byte order mark
    if kind == 3:
        return data.decode().encode("utf-16")
    if kind == 4:
        return rng.choice((b"", b"null", b"[]", b"5", b'"x"', b"{}", b" \n"))
    if kind == 5:
        return data[:-1] + b', "cniVersion": 5}' if data.endswith(b"}") else data  # a duplicated key
    return b"[" * 100_000 + b"]" * 100_000


@dataclass
class Tally:
    """Inputs tried per class, outcomes, and invariant violations grouped by what went wrong."""

    name: str
    tried: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=dict)

    def violation(self, kind: str, example: str) -> None:
        self.violations.setdefault(kind, []).append(example)

    @property
    def violation_count(self) -> int:
        return sum(len(examples) for examples in self.violations.values())

    def report(self) -> str:
        lines = [f"fuzz {self.name} (seed {SEED}, NETAGENT_FUZZ_EXAMPLES={EXAMPLES}):"]
        lines.append("  inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(self.tried.items())))
        lines.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())))
        lines.append(f"  violations: {self.violation_count}")
        for kind, examples in sorted(self.violations.items()):
            lines.append(f"  - {kind} (x{len(examples)}); first: {examples[0][:1500]}")
        return "\n".join(lines)

    def finish(self) -> None:
        """Print the tally (and append it to $NETAGENT_FUZZ_REPORT), then fail on any violation."""
        text = self.report()
        print(text)
        if os.environ.get("NETAGENT_FUZZ_REPORT"):
            with open(os.environ["NETAGENT_FUZZ_REPORT"], "a") as f:
                f.write(text + "\n")
        assert not self.violations, text


def squeezed(data: bytes) -> bytes:
    """data with long runs of one bracket shown as a count (a 100,000-deep document stays readable)."""
    return re.sub(rb"([\[\]{])\1{20,}", lambda m: b"%s*%d" % (m.group(1), len(m.group(0))), data)


def short(value: Any, limit: int = 600) -> str:
    """repr of an input, cut so a 100,000-deep document does not flood the report."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
