"""The desired services of ONE node, as an immutable snapshot every backend renders from.

Built from Service and EndpointSlice objects (the official client's model objects or plain JSON
dicts). kube-proxy's endpoint semantics are decided here, once, so backends only translate:
- which endpoints take cluster traffic (internalTrafficPolicy) and which take external traffic
  (externalTrafficPolicy), always preferring ready endpoints and falling back to serving+terminating
  ones only when none is ready;
- one ServicePort per (service, port, IP family), so dual-stack services become two entries.
A malformed Service raises InvalidService inside the builder; it is logged and skipped and the rest of
the snapshot is still built.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import functools
import gc
import hashlib
import ipaddress
import itertools
import logging
import operator
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the Kubernetes default for sessionAffinity ClientIP
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class InvalidService(ValueError):
    """A Service (or its EndpointSlices) that cannot be programmed; the message says why."""


class Endpoint(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: a cold start creates and sorts 100,000 of them,
    and tuples are built and compared in C (same field order, so the same sort order)."""

    ip: str
    port: int
    node_name: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def address(self) -> str:
        """ip:port as DNAT and conntrack want it (IPv6 in brackets)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service in one IP family, with its endpoints already chosen for this node."""

    namespace: str
    name: str
    port_name: str
    family: int  # 4 or 6
    protocol: str  # TCP, UDP or SCTP
    port: int
    cluster_ip: str
    node_port: int = 0  # 0 = none
    external_ips: tuple[str, ...] = ()  # spec.externalIPs plus LoadBalancer ingress IPs
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = no affinity
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0
    cluster_endpoints: tuple[Endpoint, ...] = ()  # where traffic to the cluster IP goes
    external_endpoints: tuple[Endpoint, ...] = ()  # where NodePort / external / LB traffic goes

    @property
    def display_name(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{port}"

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        """Backends memoize rendering per ServicePort: hash the (deep) fields once, not per lookup."""
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @functools.cached_property
    def uid(self) -> str:
        """A short stable id for kernel object names (chains are length-limited)."""
        return short_hash(f"{self.namespace}/{self.name}/{self.port_name}/{self.protocol}/{self.family}")

    @property
    def has_external(self) -> bool:
        return bool(self.node_port or self.external_ips)

    def endpoint_uid(self, endpoint: Endpoint) -> str:
        return short_hash(f"{self.uid}/{endpoint.address}")


@dataclass(frozen=True)
class Snapshot:
    ports: tuple[ServicePort, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)  # "ns/name: why" per malformed Service

    def for_family(self, family: int) -> tuple[ServicePort, ...]:
        return tuple(p for p in self.ports if p.family == family)

    def to_dict(self) -> dict:
        """JSON-ready; endpoints as [ip, port, node, ready, serving, terminating] rows (10,000
        services would otherwise be ~35 MB and seconds of dataclasses.asdict)."""
        return {"ports": [_port_dict(p) for p in self.ports], "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict) -> Snapshot:
        ports = []
        for raw in data["ports"]:
            raw = dict(raw, external_ips=tuple(raw["external_ips"]))
            for key in ("cluster_endpoints", "external_endpoints"):
                raw[key] = tuple(Endpoint(*row) for row in raw[key])
            ports.append(ServicePort(**raw))
        return cls(ports=tuple(ports), skipped=tuple(data.get("skipped", ())))


def _port_dict(p: ServicePort) -> dict:
    data = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    for key in ("cluster_endpoints", "external_endpoints"):
        data[key] = [list(e) for e in data[key]]
    return data


def short_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest)[:16].decode()


def json_field(obj: Any, key: str) -> Any:
    """obj[key] for a JSON dict, the matching attribute for an official-client model object
    (`clusterIPs` is `cluster_i_ps` there), None when absent. Reading in place is ~50x faster
    than converting each object to a dict, which matters at 10,000 services."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    names = _ATTRIBUTES.get(type(obj))
    if names is None:
        attribute_map = getattr(type(obj), "attribute_map", {})
        names = _ATTRIBUTES[type(obj)] = {json_key: attr for attr, json_key in attribute_map.items()}
    attr = names.get(key)
    return getattr(obj, attr, None) if attr else None


_ATTRIBUTES: dict[type, dict[str, str]] = {}


def json_fields(obj: Any, *keys: str) -> tuple[Any, ...]:
    """json_field for several keys of one object, deciding its kind once: the endpoint loop reads
    six fields of each of 100,000 endpoints at 10,000 services, so the per-call dispatch shows."""
    if obj is None:
        return (None,) * len(keys)
    if isinstance(obj, dict):
        return tuple(map(obj.get, keys))
    return tuple(json_field(obj, key) for key in keys)


def _path(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = json_field(obj, key)
    return obj


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building or rendering 10,000 services allocates ~1M
    objects, none in reference cycles, and the collections that allocation triggers halved the speed
    of a cold build (measured: 1.8 s -> 0.7 s). Re-enabled afterwards unless it was off before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_snapshot(services: Iterable[Any], endpoint_slices: Iterable[Any], node_name: str) -> Snapshot:
    """The desired state for `node_name`. Malformed Services are logged, listed in `skipped`, left out."""
    return SnapshotBuilder(node_name).build(services, endpoint_slices)


NamespacedName = tuple[str, str]  # (namespace, name) of a Service or an EndpointSlice


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
        self._skipped: dict[NamespacedName, str] = {}  # malformed Services: why

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
        return Snapshot(ports=ports, skipped=tuple(self._skipped[key] for key in sorted(self._skipped)))

    def _rebuild(self, key: NamespacedName, svc: Any, slices: list[Any]) -> None:
        self._skipped.pop(key, None)
        built = None
        if svc is not None:
            try:
                built = tuple(sorted(_service_ports(svc, slices, self.node_name), key=_PORT_ORDER))
            except (InvalidService, ValueError, TypeError, KeyError, AttributeError) as err:
                self._skipped[key] = reason = f"{key[0]}/{key[1]}: {err}"
                log.warning("skipping malformed Service %s", reason)
        if built is None:
            if self._built.pop(key, None) is not None:
                del self._order[bisect.bisect_left(self._order, key)]
        else:
            if key not in self._built:
                bisect.insort(self._order, key)
            self._built[key] = built


_PORT_ORDER = operator.attrgetter("namespace", "name", "port_name", "family")


def _namespaced_name(obj: Any) -> NamespacedName:
    meta = json_field(obj, "metadata")
    return json_field(meta, "namespace") or "default", json_field(meta, "name") or ""


def _slice_owner(es: Any) -> NamespacedName | None:
    meta = json_field(es, "metadata")
    owner = (json_field(meta, "labels") or {}).get(SERVICE_NAME_LABEL)
    return (json_field(meta, "namespace") or "default", owner) if owner else None


def _service_ports(svc: Any, slices: list[Any], node_name: str) -> list[ServicePort]:
    meta, spec = json_field(svc, "metadata"), json_field(svc, "spec")
    namespace, name = json_field(meta, "namespace") or "default", json_field(meta, "name") or ""
    for label in (namespace, name):
        if not _DNS_LABEL.match(label):
            raise InvalidService(f"invalid name {label!r}")
    svc_type = json_field(spec, "type")
    if svc_type == "ExternalName":
        return []
    cluster_ips = json_field(spec, "clusterIPs") or (
        [json_field(spec, "clusterIP")] if json_field(spec, "clusterIP") else []
    )
    if not cluster_ips or cluster_ips[0] == "None":
        return []  # headless (or not allocated yet): nothing for a proxy to do
    families = {_family(ip): ip for ip in cluster_ips}
    external = [*(json_field(spec, "externalIPs") or [])]
    if svc_type == "LoadBalancer":
        ingress = _path(svc, "status", "loadBalancer", "ingress") or []
        external += [json_field(i, "ip") for i in ingress if json_field(i, "ip")]
    for ip in external:
        _family(ip)
    affinity = 0
    if json_field(spec, "sessionAffinity") == "ClientIP":
        timeout = _path(spec, "sessionAffinityConfig", "clientIP", "timeoutSeconds")
        affinity = _int_in(timeout or DEFAULT_AFFINITY_TIMEOUT, 1, 86400, "timeout")
    external_local = json_field(spec, "externalTrafficPolicy") == "Local"
    internal_local = json_field(spec, "internalTrafficPolicy") == "Local"
    uses_node_ports = svc_type in ("NodePort", "LoadBalancer")
    health_port = json_field(spec, "healthCheckNodePort") or 0
    if health_port:
        _int_in(health_port, 1, 65535, "healthCheckNodePort")

    result = []
    for sp in json_field(spec, "ports") or []:
        port_name = json_field(sp, "name") or ""
        if port_name and not _PORT_NAME.match(port_name):
            raise InvalidService(f"invalid port name {port_name!r}")
        protocol = json_field(sp, "protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise InvalidService(f"unsupported protocol {protocol!r}")
        port = _int_in(json_field(sp, "port"), 1, 65535, "port")
        node_port = json_field(sp, "nodePort") if uses_node_ports else None
        node_port = _int_in(node_port, 1, 65535, "nodePort") if node_port else 0
        for family, cluster_ip in sorted(families.items()):
            endpoints = _endpoints(slices, family, port_name, protocol)
            usable_all = usable_endpoints(endpoints)
            usable_local = (
                usable_endpoints(e for e in endpoints if e.node_name == node_name)
                if internal_local or external_local
                else ()
            )
            result.append(
                ServicePort(
                    namespace=namespace,
                    name=name,
                    port_name=port_name,
                    family=family,
                    protocol=protocol,
                    port=port,
                    cluster_ip=_parse_ip(cluster_ip)[1],
                    node_port=node_port,
                    external_ips=tuple(sorted({ip for ip in external if _family(ip) == family})),
                    affinity_timeout=affinity,
                    external_local=external_local,
                    internal_local=internal_local,
                    health_check_node_port=health_port if external_local else 0,
                    cluster_endpoints=usable_local if internal_local else usable_all,
                    external_endpoints=usable_local if external_local else usable_all,
                )
            )
    return result


def usable_endpoints(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; only when there are none, the serving ones that are terminating (kube-proxy)."""
    endpoints = list(endpoints)
    ready = [e for e in endpoints if e.ready]
    return tuple(sorted(ready or [e for e in endpoints if e.serving and e.terminating]))


def _endpoints(slices: list[Any], family: int, port_name: str, protocol: str) -> list[Endpoint]:
    """Endpoints of one service port: the slice port with the same name gives the (resolved) number."""
    found: dict[tuple[str, int], Endpoint] = {}
    for es in slices:
        if json_field(es, "addressType") != f"IPv{family}":
            continue
        numbers = [
            json_field(p, "port")
            for p in json_field(es, "ports") or []
            if (json_field(p, "name") or "") == port_name and (json_field(p, "protocol") or "TCP") == protocol
        ]
        if not numbers or numbers[0] is None:
            continue
        number = _int_in(numbers[0], 1, 65535, "endpoint port")
        for ep in json_field(es, "endpoints") or []:
            addresses, node_name, cond = json_fields(ep, "addresses", "nodeName", "conditions")
            ready, serving, terminating = json_fields(cond, "ready", "serving", "terminating")
            ready = ready is not False
            serving = ready if serving is None else bool(serving)
            for ip in addresses or []:
                ip_family, ip = _parse_ip(ip)
                if ip_family != family:
                    raise InvalidService(f"EndpointSlice address {ip} is not IPv{family}")
                found[(ip, number)] = Endpoint(ip, number, node_name or "", ready, serving, bool(terminating))
    return list(found.values())


def _family(ip: str) -> int:
    return _parse_ip(ip)[0]


@functools.lru_cache(maxsize=1 << 17)
def _parse_ip(ip: str) -> tuple[int, str]:
    """(family, canonical text); cached: the same endpoint IPs come back on every rebuild. IPv4 goes
    through inet_pton (strict dotted quad, as ipaddress), ~5x faster than ipaddress for the 100,000
    endpoint addresses of a cold start; IPv6 through ipaddress for its canonical (RFC 5952) text."""
    try:
        return 4, socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip))
    except (OSError, TypeError):
        pass
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidService(f"invalid IP address {ip!r}") from None
    return address.version, str(address)


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidService(f"{what} {value!r} is not an integer in {low}..{high}")
    return value
