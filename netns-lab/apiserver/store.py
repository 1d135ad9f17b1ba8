"""The lab API server's object store: objects, resource versions, the watch history and the data file.

It plays etcd's part for the lab: every write gets the next resourceVersion (one global counter, as in
Kubernetes), is appended to the data file before the caller hears back, and is kept in a bounded history
so watches can resume from a resourceVersion; older than the window means `Expired`, like the real
apiserver's watch cache, and the client must list again.

Stored objects are never mutated in place: a write stores a new dict, so readers can hand out
references without copying (callers must not mutate what they get).

Data file format (JSON lines, append-only, compacted when it grows): `{"rv": N}` sets the counter,
`{"rv": N, "resource": R, "object": {...}}` stores an object, `{"rv": N, "resource": R, "deleted":
[namespace, name]}` removes one. A torn last line (crash mid-write) is ignored on load.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import logging
import os
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nodekit.files import atomic_write

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (resource, namespace or "", name)


class ApiError(Exception):
    """An API failure carrying what the HTTP layer turns into a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource})


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: str
    obj: dict
    old: dict | None  # the previous version (MODIFIED, DELETED), for listeners that need the difference


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def object_key(resource: str, obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return (resource, meta.get("namespace") or "", meta.get("name") or "")


def _content_without_meta(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


class Journal:
    """The append-only data file: one JSON line per write, compacted to a snapshot when it grows."""

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._lines = 0  # in the file now
        self._objects_at_compaction = 0  # the file is compacted again once it holds 2x these + 1000 lines

    def load(self) -> tuple[int, dict[Key, dict]]:
        rv, objects = 0, {}
        if not os.path.exists(self.path):
            return rv, objects
        with open(self.path) as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) - 1:
                    break  # torn last write: the write never completed, so nobody was told it did
                raise ValueError(f"{self.path}: line {number + 1} is not JSON") from None
            try:
                rv = max(rv, int(record["rv"]))
                if "object" in record:
                    objects[object_key(record["resource"], record["object"])] = record["object"]
                elif "deleted" in record:
                    namespace, name = record["deleted"]
                    objects.pop((record["resource"], namespace, name), None)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{self.path}: line {number + 1} is not a lab API server record ({e})"
                ) from None
        return rv, objects

    def compact(self, rv: int, objects: dict[Key, dict]) -> None:
        """Rewrite the file as a snapshot (atomically), then keep appending to it."""
        lines = [json.dumps({"rv": rv})]
        lines += [json.dumps({"rv": rv, "resource": key[0], "object": obj}) for key, obj in objects.items()]
        if self._file:
            self._file.close()
        atomic_write(self.path, "\n".join(lines) + "\n", mode=0o600)
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the store's lifetime
        self._lines = len(lines)
        self._objects_at_compaction = len(objects)

    def append(self, record: dict, objects: Callable[[], list[tuple[Key, dict]]]) -> None:
        """Add one record; `objects()` gives the whole state, for when the file is due for compaction."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # in the kernel before the client hears back: survives our crash
        self._lines += 1
        if self._lines > 2 * self._objects_at_compaction + 1000:
            self.compact(record["rv"], dict(objects()))

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class ObjectStore:
    """Objects of every resource, one resourceVersion counter, the watch history, change listeners."""

    def __init__(self, data_path: str, history_size: int = 1000):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified after every write and on close
        self.closed = False
        self._journal = Journal(data_path)
        self.rv, objects = self._journal.load()
        self._journal.compact(self.rv, objects)
        self._objects: dict[str, dict[tuple[str, str], dict]] = {}  # resource -> (namespace, name) -> object
        for (resource, namespace, name), obj in objects.items():
            self._objects.setdefault(resource, {})[(namespace, name)] = obj
        self._history: deque[Event] = deque(maxlen=history_size)
        self._listeners: list[Callable[[Event], None]] = []

    # -- reading

    def get(self, resource: str, namespace: str, name: str) -> dict:
        obj = self.find(resource, namespace, name)
        if obj is None:
            raise not_found(resource, name)
        return obj

    def find(self, resource: str, namespace: str, name: str) -> dict | None:
        return self._objects.get(resource, {}).get((namespace, name))

    def list(self, resource: str, namespace: str | None = None) -> tuple[list[dict], int]:
        """Objects of a resource (in one namespace, or all) and the resourceVersion they are current at."""
        with self.lock:
            objects = self._objects.get(resource, {})
            keys = sorted(k for k in objects if namespace is None or k[0] == namespace)
            return [objects[k] for k in keys], self.rv

    def events_since(self, rv: int) -> tuple[list[Event], int]:
        """Events after `rv` and the resourceVersion they bring a watcher up to; Expired if out of window.

        Call with `lock` held."""
        if rv == self.rv:
            return [], rv
        oldest = self._history[0].rv if self._history else self.rv + 1
        if rv > self.rv:  # only after a lost data file: the client must start over, as with an old one
            raise ApiError(410, "Expired", f"resource version {rv} is newer than the server's ({self.rv})")
        if rv + 1 < oldest:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({oldest - 1})")
        # Taken from the newest end: a watcher that is keeping up costs O(its new events), not O(window).
        newest_first = list(itertools.islice(reversed(self._history), self.rv - rv))
        return newest_first[::-1], self.rv

    # -- writing

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call `listener(event)` after every write, with the lock held (keep it short)."""
        self._listeners.append(listener)

    def objects(self) -> list[tuple[Key, dict]]:
        """Every object with its key (a copy of the index: safe to write while iterating)."""
        return [
            ((res, ns, name), obj) for res, objs in self._objects.items() for (ns, name), obj in objs.items()
        ]

    def create(self, resource: str, obj: dict) -> dict:
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            if not meta.get("name"):
                raise ApiError(
                    422, "Invalid", "metadata.name: Required value: name or generateName is required"
                )
            key = object_key(resource, obj)
            if self.find(*key) is not None:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{resource} "{key[2]}" already exists',
                    {"name": key[2], "kind": resource},
                )
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta["generation"] = 1
            return self._commit("ADDED", resource, key, obj, None)

    def update(self, resource: str, obj: dict) -> dict:
        """Replace an object; a resourceVersion in `obj` must match the stored one (optimistic locking)."""
        with self.lock:
            obj = copy.deepcopy(obj)
            key = object_key(resource, obj)
            old = self.get(*key)
            meta, old_meta = obj.setdefault("metadata", {}), old["metadata"]
            if meta.get("resourceVersion") not in (None, "", old_meta["resourceVersion"]):
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource} "{key[2]}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                    {"name": key[2], "kind": resource},
                )
            for immutable in ("uid", "creationTimestamp"):
                meta[immutable] = old_meta[immutable]
            meta["generation"] = old_meta.get("generation", 1) + (
                _content_without_meta(obj) != _content_without_meta(old)
            )
            meta.pop("resourceVersion", None)
            if obj == {**old, "metadata": {k: v for k, v in old_meta.items() if k != "resourceVersion"}}:
                return old  # a no-op write: no new resourceVersion, no event (as the real apiserver)
            return self._commit("MODIFIED", resource, key, obj, old)

    def delete(self, resource: str, namespace: str, name: str) -> dict:
        with self.lock:
            key = (resource, namespace, name)
            old = self.get(*key)
            return self._commit("DELETED", resource, key, old, old)

    def _commit(self, type_: str, resource: str, key: Key, obj: dict, old: dict | None) -> dict:
        if self.closed:
            raise ApiError(503, "ServiceUnavailable", "the lab API server is shutting down")
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        objects = self._objects.setdefault(resource, {})
        if type_ == "DELETED":
            del objects[key[1:]]
            record = {"rv": self.rv, "resource": resource, "deleted": [key[1], key[2]]}
        else:
            objects[key[1:]] = obj
            record = {"rv": self.rv, "resource": resource, "object": obj}
        self._journal.append(record, self.objects)
        event = Event(self.rv, type_, resource, obj, old)
        self._history.append(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as e:  # an odd stored object must not keep watchers asleep, nor other listeners
                log.error("store listener %s failed on %s %s %s/%s: %s: %s",
                          getattr(listener, "__qualname__", listener), type_, resource, key[1], key[2],
                          type(e).__name__, e)
        self.changed.notify_all()
        return obj

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._journal.close()
            self.changed.notify_all()
