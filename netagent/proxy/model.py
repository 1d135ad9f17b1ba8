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
import dataclasses
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the Kubernetes default for sessionAffinity ClientIP
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class InvalidService(ValueError):
    """A Service (or its EndpointSlices) that cannot be programmed; the message says why."""


@dataclass(frozen=True, order=True)
class Endpoint:
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

    @property
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Snapshot:
        ports = []
        for raw in data["ports"]:
            raw = dict(raw, external_ips=tuple(raw["external_ips"]))
            for key in ("cluster_endpoints", "external_endpoints"):
                raw[key] = tuple(Endpoint(**e) for e in raw[key])
            ports.append(ServicePort(**raw))
        return cls(ports=tuple(ports), skipped=tuple(data.get("skipped", ())))


def short_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest)[:16].decode()


def as_dict(obj: Any) -> dict:
    """Accept a JSON dict or an official-client model object; return the JSON (camelCase) dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def build_snapshot(services: Iterable[Any], endpoint_slices: Iterable[Any], node_name: str) -> Snapshot:
    """The desired state for `node_name`. Malformed Services are logged, listed in `skipped`, left out."""
    slices_by_service: dict[tuple[str, str], list[dict]] = {}
    for raw in endpoint_slices:
        es = as_dict(raw)
        meta = es.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner:
            slices_by_service.setdefault((meta.get("namespace") or "default", owner), []).append(es)

    ports: list[ServicePort] = []
    skipped: list[str] = []
    for raw in services:
        svc = as_dict(raw)
        meta = svc.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        try:
            ports.extend(_service_ports(svc, slices_by_service.get(key, []), node_name))
        except (InvalidService, ValueError, TypeError, KeyError, AttributeError) as err:
            reason = f"{key[0]}/{key[1]}: {err}"
            log.warning("skipping malformed Service %s", reason)
            skipped.append(reason)
    ports.sort(key=lambda p: (p.namespace, p.name, p.port_name, p.family))
    return Snapshot(ports=tuple(ports), skipped=tuple(skipped))


def _service_ports(svc: dict, slices: list[dict], node_name: str) -> list[ServicePort]:
    meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    for label in (namespace, name):
        if not _DNS_LABEL.match(label):
            raise InvalidService(f"invalid name {label!r}")
    if spec.get("type") == "ExternalName":
        return []
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not cluster_ips or cluster_ips[0] == "None":
        return []  # headless (or not allocated yet): nothing for a proxy to do
    families = {_family(ip): ip for ip in cluster_ips}
    external = [*(spec.get("externalIPs") or [])]
    if spec.get("type") == "LoadBalancer":
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        external += [i["ip"] for i in ingress if i.get("ip")]
    for ip in external:
        _family(ip)
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        affinity = _int_in(config.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT, 1, 86400, "timeout")
    external_local = spec.get("externalTrafficPolicy") == "Local"
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    uses_node_ports = spec.get("type") in ("NodePort", "LoadBalancer")
    health_port = spec.get("healthCheckNodePort") or 0
    if health_port:
        _int_in(health_port, 1, 65535, "healthCheckNodePort")

    result = []
    for sp in spec.get("ports") or []:
        port_name = sp.get("name") or ""
        if port_name and not _PORT_NAME.match(port_name):
            raise InvalidService(f"invalid port name {port_name!r}")
        protocol = sp.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise InvalidService(f"unsupported protocol {protocol!r}")
        port = _int_in(sp.get("port"), 1, 65535, "port")
        node_port = (
            _int_in(sp.get("nodePort"), 1, 65535, "nodePort") if uses_node_ports and sp.get("nodePort") else 0
        )
        for family, cluster_ip in sorted(families.items()):
            endpoints = _endpoints(slices, family, port_name, protocol)
            local = [e for e in endpoints if e.node_name == node_name]
            result.append(
                ServicePort(
                    namespace=namespace,
                    name=name,
                    port_name=port_name,
                    family=family,
                    protocol=protocol,
                    port=port,
                    cluster_ip=str(ipaddress.ip_address(cluster_ip)),
                    node_port=node_port,
                    external_ips=tuple(sorted({ip for ip in external if _family(ip) == family})),
                    affinity_timeout=affinity,
                    external_local=external_local,
                    internal_local=internal_local,
                    health_check_node_port=health_port if external_local else 0,
                    cluster_endpoints=usable_endpoints(local if internal_local else endpoints),
                    external_endpoints=usable_endpoints(local if external_local else endpoints),
                )
            )
    return result


def usable_endpoints(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; only when there are none, the serving ones that are terminating (kube-proxy)."""
    endpoints = list(endpoints)
    ready = [e for e in endpoints if e.ready]
    return tuple(sorted(ready or [e for e in endpoints if e.serving and e.terminating]))


def _endpoints(slices: list[dict], family: int, port_name: str, protocol: str) -> list[Endpoint]:
    """Endpoints of one service port: the slice port with the same name gives the (resolved) number."""
    found: dict[tuple[str, int], Endpoint] = {}
    for es in slices:
        if es.get("addressType") != f"IPv{family}":
            continue
        numbers = [
            p.get("port")
            for p in es.get("ports") or []
            if (p.get("name") or "") == port_name and (p.get("protocol") or "TCP") == protocol
        ]
        if not numbers or numbers[0] is None:
            continue
        number = _int_in(numbers[0], 1, 65535, "endpoint port")
        for ep in es.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False
            serving = cond.get("serving") if cond.get("serving") is not None else ready
            for ip in ep.get("addresses") or []:
                if _family(ip) != family:
                    raise InvalidService(f"EndpointSlice address {ip} is not IPv{family}")
                ip = str(ipaddress.ip_address(ip))
                found[(ip, number)] = Endpoint(
                    ip=ip,
                    port=number,
                    node_name=ep.get("nodeName") or "",
                    ready=ready,
                    serving=bool(serving),
                    terminating=bool(cond.get("terminating")),
                )
    return list(found.values())


def _family(ip: str) -> int:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        raise InvalidService(f"invalid IP address {ip!r}") from None


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidService(f"{what} {value!r} is not an integer in {low}..{high}")
    return value
