"""The three PATCH bodies Kubernetes clients send, applied to a copy of the stored object.

kubectl uses strategic merge (apply, edit, label), the `kubernetes` client merge patch, and some
tools JSON patch; PATCHERS maps each request Content-Type to its function."""

from __future__ import annotations

import copy
from collections.abc import Callable

from netns_lab.apiserver.api_errors import invalid


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists merged element by element in strategic merge patches (path without list indices -> merge key),
# from the Kubernetes types' patchMergeKey tags for the resources served here. Other lists are replaced.
MERGE_KEYS = {
    "metadata.ownerReferences": "uid",
    "spec.ports": "port",
    "spec.containers": "name",
    "spec.initContainers": "name",
    "spec.containers.ports": "containerPort",
    "spec.containers.env": "name",
    "spec.volumes": "name",
    "status.conditions": "type",
    "status.addresses": "type",
}
PRIMITIVE_SET_LISTS = {"metadata.finalizers"}


def strategic_merge(target: object, patch: object, path: str = "") -> object:
    """Kubernetes strategic merge patch for the lists above, including kubectl apply's directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder, $retainKeys: ordering/pruning hints we need not honour
        elif value is None:
            result.pop(key, None)
        else:
            child = f"{path}.{key}" if path else key
            result[key] = (
                _merge_list(result.get(key), value, child)
                if isinstance(value, list)
                else strategic_merge(result.get(key), value, child)
            )
    return result


def _merge_list(current: object, patch: list, path: str) -> list:
    current = current if isinstance(current, list) else []
    if path in PRIMITIVE_SET_LISTS:
        return current + [v for v in patch if v not in current]
    key = MERGE_KEYS.get(path)
    if key is None:
        return copy.deepcopy(patch)
    merged = list(current)
    for item in patch:
        index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append(strategic_merge({}, item, path))
        else:
            merged[index] = strategic_merge(merged[index], item, path)
    return merged


def json_patch(target: dict, operations: list) -> dict:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    doc = copy.deepcopy(target)

    def locate(pointer: str) -> tuple[object, str | int]:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        if not parts:
            raise invalid("JSON patch on the whole document is not supported")
        parent: object = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        return parent, (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last

    def get(pointer: str) -> object:
        parent, key = locate(pointer)
        return copy.deepcopy(parent[key])

    def put(pointer: str, value: object, insert: bool) -> None:
        parent, key = locate(pointer)
        if isinstance(parent, list) and insert:
            parent.insert(key, value)
        else:
            parent[key] = value

    def remove(pointer: str) -> object:
        parent, key = locate(pointer)
        return parent.pop(key)

    for op in operations:
        try:
            kind, pointer = op["op"], op["path"]
            if kind == "add":
                put(pointer, op["value"], insert=True)
            elif kind == "remove":
                remove(pointer)
            elif kind == "replace":
                get(pointer)
                put(pointer, op["value"], insert=False)
            elif kind == "test":
                if get(pointer) != op["value"]:
                    raise invalid(f"JSON patch test failed at {pointer}")
            elif kind in ("move", "copy"):
                value = remove(op["from"]) if kind == "move" else get(op["from"])
                put(pointer, value, insert=True)
            else:
                raise invalid(f"unknown JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise invalid(f"JSON patch {op!r} does not apply: {e}") from None
    return doc


PATCHERS: dict[str, Callable[[dict, object], object]] = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge,
    "application/json-patch+json": json_patch,
}
