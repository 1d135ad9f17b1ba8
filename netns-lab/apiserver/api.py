"""The Kubernetes API's behaviour, independent of HTTP: reads, writes with admission, watches.

Kept apart from the HTTP layer so the rules (optimistic locking, status subresources, graceful pod
deletion, namespace cleanup, watch semantics) read as one piece and the handler only translates."""

from __future__ import annotations

import calendar
import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from netns_lab.apiserver.allocator import ServiceAllocator
from netns_lab.apiserver.api_errors import bad_request, invalid, status_object
from netns_lab.apiserver.object_selectors import object_filter
from netns_lab.apiserver.patches import PATCHERS
from netns_lab.apiserver.resources import Resource
from netns_lab.apiserver.store import ApiError, Event, ObjectStore, not_found
from netns_lab.apiserver.validation import decoded, validate_endpoint_slice, validate_service

DEFAULT_WATCH_TIMEOUT = 1800.0
SYSTEM_NAMESPACES = ("default", "kube-system")
DELETION_FIELDS = ("deletionTimestamp", "deletionGracePeriodSeconds")  # only a delete sets these


@dataclass
class Target:
    """What a request path names."""

    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def store_namespace(self) -> str:
        """The store keys cluster-scoped objects by the empty namespace."""
        return self.namespace or ""


class Api:
    """The API's behaviour independent of HTTP: reads, writes with admission, watches."""

    def __init__(self, store: ObjectStore, allocator: ServiceAllocator, bookmark_interval: float) -> None:
        self.store = store
        self.allocator = allocator
        self.bookmark_interval = bookmark_interval
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        with store.lock:
            for key, obj in store.objects():
                allocator.observe(Event(0, "ADDED", key[0], obj, None))
            store.add_listener(allocator.observe)
            for name in SYSTEM_NAMESPACES:
                if store.find("namespaces", "", name) is None:
                    store.create(
                        "namespaces",
                        {
                            "apiVersion": "v1",
                            "kind": "Namespace",
                            "metadata": {"name": name},
                            "status": {"phase": "Active"},
                        },
                    )
            for key, obj in store.objects():
                if key[0] == "pods" and obj["metadata"].get("deletionTimestamp"):
                    self._schedule_removal(obj)

    # -- reads

    def get(self, t: Target) -> dict:
        return self.store.get(t.resource.name, t.store_namespace, t.name)

    def list(self, t: Target, query: dict[str, str]) -> dict:
        matches = object_filter(query)
        items, rv = self.store.list(t.resource.name, t.namespace)
        return {
            "kind": f"{t.resource.kind}List",
            "apiVersion": t.resource.group_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": [o for o in items if matches(o)],
        }

    # -- writes

    def create(self, t: Target, body: dict) -> dict:
        obj = self._identify(t, body, name_from_url=False)
        for field in DELETION_FIELDS:
            obj["metadata"].pop(field, None)
        with self.store.lock:
            if t.resource.namespaced:
                self._require_namespace(t.namespace)
            self._admit(t.resource, obj, None)
            return self.store.create(t.resource.name, obj)

    def update(self, t: Target, body: dict) -> dict:
        obj = self._identify(t, body, name_from_url=True)
        with self.store.lock:
            return self._write_update(t, obj, self.get(t))

    def patch(self, t: Target, content_type: str, patch: object) -> dict:
        patcher = PATCHERS.get(content_type)
        if patcher is None:
            raise ApiError(
                415, "UnsupportedMediaType", f"the lab API server does not accept {content_type!r}"
            )
        if content_type == "application/json-patch+json" and not isinstance(patch, list):
            raise bad_request("a JSON patch is a list of operations")
        if content_type != "application/json-patch+json" and not isinstance(patch, dict):
            raise bad_request("a merge patch is a JSON object")
        with self.store.lock:
            current = self.get(t)
            patched = patcher(current, patch)
            if not isinstance(patched, dict):
                raise invalid("the patch does not yield an object")
            if (patched.get("metadata") or {}).get("resourceVersion") == current["metadata"][
                "resourceVersion"
            ]:
                patched["metadata"] = {**patched["metadata"], "resourceVersion": ""}  # patches don't lock
            return self._write_update(t, self._identify(t, patched, name_from_url=True), current)

    def _write_update(self, t: Target, obj: dict, current: dict) -> dict:
        for field in DELETION_FIELDS:
            if field in current["metadata"]:
                obj["metadata"][field] = current["metadata"][field]
            else:
                obj["metadata"].pop(field, None)
        if t.subresource == "status":
            obj = {
                **current,
                "metadata": {
                    **current["metadata"],
                    "resourceVersion": obj["metadata"].get("resourceVersion"),
                },
                "status": obj.get("status"),
            }
        elif t.resource.has_status:
            obj["status"] = current.get("status")
            if obj["status"] is None:
                obj.pop("status")
            self._admit(t.resource, obj, current)
        else:
            self._admit(t.resource, obj, current)
        return self.store.update(t.resource.name, obj)

    def delete(self, t: Target, options: dict) -> dict:
        with self.store.lock:
            current = self.get(t)
            preconditions = options.get("preconditions") or {}
            for field in ("uid", "resourceVersion"):
                if preconditions.get(field) and preconditions[field] != current["metadata"].get(field):
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: {field} in precondition: "
                        f"{preconditions[field]}, {field} in object meta: {current['metadata'].get(field)}",
                    )
            grace = options.get("gracePeriodSeconds") or 0
            if not str(grace).isdigit():
                raise bad_request(f"gracePeriodSeconds: {grace!r} is not a number of seconds")
            grace = int(grace)
            if t.resource.name == "pods" and grace > 0 and not current["metadata"].get("deletionTimestamp"):
                deadline = time.time() + grace
                meta = {
                    **current["metadata"],
                    "deletionGracePeriodSeconds": grace,
                    "deletionTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)),
                }
                terminating = self.store.update("pods", {**current, "metadata": meta})
                self._schedule_removal(terminating)
                return terminating
            if t.resource.name == "namespaces":
                if t.name in SYSTEM_NAMESPACES:
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'namespaces "{t.name}" is forbidden: this namespace may not be deleted',
                    )
                for key, _ in self.store.objects():  # the namespace's objects go with it
                    if key[1] == t.name:
                        self.store.delete(*key)
            deleted = self.store.delete(t.resource.name, t.store_namespace, t.name)
        if t.resource.name in ("pods", "services"):
            return deleted  # these return the object, others a Status (as the real apiserver)
        return status_object(
            200, "", "", {"name": t.name, "kind": t.resource.name, "uid": deleted["metadata"]["uid"]}
        )

    def _schedule_removal(self, pod: dict) -> None:
        """Remove a terminating pod when its grace period ends (in the lab no kubelet does)."""
        meta = pod["metadata"]
        deadline = calendar.timegm(time.strptime(meta["deletionTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))

        def remove() -> None:
            with self.store.lock:
                still = self.store.find("pods", meta["namespace"], meta["name"])
                if still is not None and still["metadata"]["uid"] == meta["uid"] and not self.store.closed:
                    self.store.delete("pods", meta["namespace"], meta["name"])

        timer = threading.Timer(max(0.0, deadline - time.time()), remove)
        timer.daemon = True
        self._timers[(meta["namespace"], meta["name"])] = timer
        timer.start()

    def stop_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()

    def _identify(self, t: Target, body: object, name_from_url: bool) -> dict:
        """The body as an object of this resource, its kind, namespace and name checked against the URL."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON or YAML object")
        obj = decoded(t.resource.kind, t.resource.group_version.rpartition("/")[2], copy.deepcopy(body))
        obj["kind"], obj["apiVersion"] = t.resource.kind, t.resource.group_version
        meta = obj.setdefault("metadata", {})
        if t.resource.namespaced:
            if meta.get("namespace") not in (None, "", t.namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = t.namespace
        else:
            meta.pop("namespace", None)
        if name_from_url:
            if meta.get("name") not in (None, "", t.name):
                raise bad_request("the name of the object does not match the name on the URL")
            meta["name"] = t.name
        return obj

    def _require_namespace(self, namespace: str | None) -> None:
        if namespace is None:
            raise bad_request("a namespaced object is created under /namespaces/{namespace}/")
        if self.store.find("namespaces", "", namespace) is None:
            raise not_found("namespaces", namespace)

    def _admit(self, resource: Resource, obj: dict, old: dict | None) -> None:
        if resource.name == "services":
            obj.setdefault("spec", {})
            validate_service(obj)
            self.allocator.admit(obj, old)
        elif resource.name == "endpointslices":
            validate_endpoint_slice(obj)
        elif resource.name == "namespaces":
            obj.setdefault("status", {"phase": "Active"})

    # -- watches

    def watch(self, t: Target, query: dict[str, str], gone: Callable[[], bool]) -> Iterator[dict]:
        """Watch events as dicts ready to send; ends at timeoutSeconds, on server stop or client loss.

        The request is checked here, before the stream starts, so a bad one gets a plain error response."""
        matches = object_filter(query)
        start = query.get("resourceVersion", "")
        if not start.isdigit() and start != "":
            raise bad_request(f"invalid resourceVersion {start!r}")
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError:
            raise bad_request("timeoutSeconds must be a number") from None
        return self._events(
            t,
            matches,
            start,
            time.monotonic() + timeout,
            query.get("allowWatchBookmarks") in ("true", "1"),
            gone,
        )

    def _events(
        self,
        t: Target,
        matches: Callable[[dict], bool],
        start: str,
        deadline: float,
        bookmarks: bool,
        gone: Callable[[], bool],
    ) -> Iterator[dict]:
        next_bookmark = time.monotonic() + self.bookmark_interval
        with self.store.lock:
            if start in ("", "0"):  # "current state, then changes": synthetic ADDED for what exists
                items, cursor = self.store.list(t.resource.name, t.namespace)
                initial = [{"type": "ADDED", "object": o} for o in items if matches(o)]
            else:
                cursor, initial = int(start), []
        yield from initial
        while True:
            with self.store.lock:
                try:
                    events, cursor = self.store.events_since(cursor)
                except ApiError as e:
                    yield {"type": "ERROR", "object": status_object(e.code, e.reason, e.message)}
                    return
                if not events:
                    now = time.monotonic()
                    wake = min(deadline, next_bookmark if bookmarks else deadline, now + 2.0)
                    self.store.changed.wait(max(0.0, wake - now))
                if self.store.closed:
                    return
            for event in events:
                sent = self._as_seen_by(t, matches, event)
                if sent:
                    yield sent
            now = time.monotonic()
            if now >= deadline or gone():
                return
            if bookmarks and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": t.resource.kind,
                        "apiVersion": t.resource.group_version,
                        "metadata": {"resourceVersion": str(cursor)},
                    },
                }

    @staticmethod
    def _as_seen_by(t: Target, matches: Callable[[dict], bool], event: Event) -> dict | None:
        """The event as this watch sees it: objects entering or leaving its selector are ADDED/DELETED."""
        if event.resource != t.resource.name:
            return None
        if t.namespace is not None and event.obj["metadata"].get("namespace") != t.namespace:
            return None
        if event.type == "DELETED":
            now, before = False, matches(event.obj)
        else:
            now, before = matches(event.obj), event.old is not None and matches(event.old)
        if now and before:
            return {"type": "MODIFIED", "object": event.obj}
        if now:
            return {"type": "ADDED", "object": event.obj}
        if before:
            return {"type": "DELETED", "object": event.obj}
        return None
