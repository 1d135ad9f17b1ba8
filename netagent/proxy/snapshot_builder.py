"""The SnapshotBuilder: this node's desired services, kept up to date from Service and EndpointSlice
events (the official client's model objects or plain JSON dicts) and handed out as immutable
Snapshots. A malformed Service is logged and skipped, a malformed EndpointSlice too (its Service keeps
its other slices); the rest of the snapshot is still built."""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import threading
from collections.abc import Iterable
from typing import Any

from netagent.proxy.fields import json_field
from netagent.proxy.gc_pause import gc_paused
from netagent.proxy.service import ServicePort, Snapshot
from netagent.proxy.service_parser import InvalidService, InvalidSlice, parse_slice, service_ports

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NamespacedName = tuple[str, str]  # (namespace, name) of a Service or an EndpointSlice


def build_snapshot(services: Iterable[Any], endpoint_slices: Iterable[Any], node_name: str) -> Snapshot:
    """The desired state for `node_name`. Malformed Services are logged, listed in `skipped`, left out."""
    return SnapshotBuilder(node_name).build(services, endpoint_slices)


class SnapshotBuilder:
    """Keeps this node's ServicePorts per Service and rebuilds only the Services whose object or
    EndpointSlices changed since the last snapshot: one changed EndpointSlice costs one service's
    work, not 10,000.

    Fed either event by event (the controller's informer handlers call service_changed and
    slice_changed from their threads; the sync thread calls snapshot()) or with whole lists (build(),
    for tests and benchmarks). Objects are treated as immutable, as informer caches hand them out, so
    a change always arrives as a new object and "unchanged" is an identity check."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._lock = threading.Lock()  # guards the inputs and _dirty, which informer threads change
        self._services: dict[NamespacedName, Any] = {}
        self._slices: dict[NamespacedName, dict[NamespacedName, Any]] = {}  # owner -> slice key -> slice
        self._slice_owners: dict[NamespacedName, NamespacedName] = {}  # slice key -> owning service
        self._dirty: set[NamespacedName] = set()
        # Only the thread calling snapshot() touches these:
        self._built: dict[NamespacedName, tuple[ServicePort, ...]] = {}
        self._order: list[NamespacedName] = []  # the keys of _built, sorted
        self._problems: dict[NamespacedName, dict[str, str]] = {}  # see _rebuild

    def service_changed(self, svc: Any, deleted: bool = False) -> None:
        key = _namespaced_name(svc)
        with self._lock:
            if deleted:
                self._services.pop(key, None)
            else:
                self._services[key] = svc
            self._dirty.add(key)

    def slice_changed(self, es: Any, deleted: bool = False) -> None:
        key, owner = _namespaced_name(es), None if deleted else _slice_owner(es)
        with self._lock:
            old_owner = self._slice_owners.pop(key, None)
            if old_owner:
                siblings = self._slices[old_owner]
                del siblings[key]
                if not siblings:
                    del self._slices[old_owner]
                self._dirty.add(old_owner)
            if owner:
                self._slice_owners[key] = owner
                self._slices.setdefault(owner, {})[key] = es
                self._dirty.add(owner)

    def build(self, services: Iterable[Any], endpoint_slices: Iterable[Any]) -> Snapshot:
        """The snapshot for exactly these objects: fed as the events that turn what the builder holds
        into them (a service or slice that is the very same object as before is no event)."""
        services_now = {_namespaced_name(svc): svc for svc in services}
        slices_now = {_namespaced_name(es): es for es in endpoint_slices}
        for key, svc in list(self._services.items()):
            if key not in services_now:
                self.service_changed(svc, deleted=True)
        for key, svc in services_now.items():
            if self._services.get(key) is not svc:
                self.service_changed(svc)
        for key, owner in list(self._slice_owners.items()):
            if key not in slices_now:
                self.slice_changed(self._slices[owner][key], deleted=True)
        for key, es in slices_now.items():
            owner = self._slice_owners.get(key)
            if owner is None or self._slices[owner][key] is not es:
                self.slice_changed(es)
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        """The desired state now. Malformed Services are logged (once per change), listed in
        `skipped` and left out."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            inputs = [(key, self._services.get(key), [*self._slices.get(key, {}).values()]) for key in dirty]
        with gc_paused():
            for key, svc, slices in inputs:
                self._rebuild(key, svc, slices)
            ports = tuple(itertools.chain.from_iterable(map(self._built.__getitem__, self._order)))
        skipped = tuple(reason for key in sorted(self._problems)
                        for _, reason in sorted(self._problems[key].items()))
        return Snapshot(ports=ports, skipped=skipped)

    def _rebuild(self, key: NamespacedName, svc: Any, slices: list[Any]) -> None:
        problems: dict[str, str] = {}  # "" (the Service itself) or a slice's name -> why it is left out
        built = None
        if svc is not None:
            usable = []
            for es in slices:
                try:
                    usable.append(parse_slice(es))
                except InvalidSlice as err:  # only this slice is left out: the Service keeps the rest
                    namespace, slice_name = _namespaced_name(es)
                    problems[slice_name] = f"{namespace}/{slice_name} (EndpointSlice of {key[1]}): {err}"
            try:
                built = tuple(sorted(service_ports(svc, usable, self.node_name), key=_PORT_ORDER))
            except InvalidService as err:
                problems[""] = f"{key[0]}/{key[1]}: {err}"
        self._record_problems(key, problems)
        if built is None:
            if self._built.pop(key, None) is not None:
                del self._order[bisect.bisect_left(self._order, key)]
        else:
            if key not in self._built:
                bisect.insort(self._order, key)
            self._built[key] = built

    def _record_problems(self, key: NamespacedName, problems: dict[str, str]) -> None:
        """Keep what is left out of one Service and why; log each reason once (every change to the
        Service or one of its slices rebuilds it, and would repeat the same warning)."""
        logged = self._problems.get(key, {})
        for part, reason in problems.items():
            if logged.get(part) != reason:
                log.warning("skipping malformed %s %s", "EndpointSlice" if part else "Service", reason)
        if problems:
            self._problems[key] = problems
        else:
            self._problems.pop(key, None)


_PORT_ORDER = operator.attrgetter("namespace", "name", "port_name", "family")


def _namespaced_name(obj: Any) -> NamespacedName:
    meta = json_field(obj, "metadata")
    return json_field(meta, "namespace") or "default", json_field(meta, "name") or ""


def _slice_owner(es: Any) -> NamespacedName | None:
    """The Service a slice belongs to; None for a service-name label that is not a string (no
    Service can have such a name, and it must not become a key of the builder's tables)."""
    meta = json_field(es, "metadata")
    owner = json_field(json_field(meta, "labels"), SERVICE_NAME_LABEL)
    return (json_field(meta, "namespace") or "default", owner) if owner and isinstance(owner, str) else None
