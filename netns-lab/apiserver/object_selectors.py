"""Label and field selectors: which objects a list or watch returns.

The selector grammar is the Kubernetes one (equality- and set-based labels, dotted field paths) so
clients can filter server-side exactly as they would against a real cluster."""

from __future__ import annotations

import re
from collections.abc import Callable

from netns_lab.apiserver.api_errors import bad_request

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_requirements(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p.strip()]


def label_selector(selector: str) -> Callable[[dict], bool]:
    """A predicate on labels for a Kubernetes label selector string (equality- and set-based)."""
    checks = []
    for requirement in _split_requirements(selector):
        match = _REQUIREMENT.match(requirement)
        if not match or (match["neg"] and (match["op"] or match["setop"])):
            raise bad_request(f"unable to parse requirement: {requirement!r}")
        key, op = match["key"], match["op"] or match["setop"]
        if op in ("=", "=="):
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) != v)
        elif op in ("in", "notin"):
            values = {v.strip() for v in match["values"].split(",")}
            want = op == "in"
            checks.append(lambda labels, k=key, vs=values, w=want: (k in labels and labels[k] in vs) == w)
        else:
            checks.append(lambda labels, k=key, present=not match["neg"]: (k in labels) == present)
    return lambda labels: all(check(labels) for check in checks)


def field_value(obj: dict, path: str) -> str:
    """The value at a dotted path as a field selector compares it: a string, "" when absent."""
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(selector: str) -> Callable[[dict], bool]:
    """A predicate on whole objects for a field selector (`a.b=v`, `a.b==v`, `a.b!=v`, comma-joined)."""
    checks = []
    for requirement in _split_requirements(selector):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not match:
            raise bad_request(f"invalid field selector: {requirement!r}")
        path, op, value = match.groups()
        equal = op != "!="
        checks.append(lambda obj, p=path, v=value, e=equal: (field_value(obj, p) == v) == e)
    return lambda obj: all(check(obj) for check in checks)


def object_filter(query: dict[str, str]) -> Callable[[dict], bool]:
    """The predicate for a list or watch request's labelSelector and fieldSelector query parameters."""
    labels = label_selector(query.get("labelSelector", ""))
    fields = field_selector(query.get("fieldSelector", ""))
    return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)
