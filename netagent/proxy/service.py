"""The value types of the desired services of ONE node: Endpoint, ServicePort (one port of one Service
in one IP family, its endpoints already chosen for this node) and the immutable Snapshot every backend
renders from. Built by netagent.proxy.service_parser through the SnapshotBuilder; what the data plane
does with each port is its `policy` (netagent.proxy.policy)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

from netagent.proxy.policy import PortPolicy, port_policy


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

    @functools.cached_property
    def policy(self) -> PortPolicy:
        """What the data plane does with this port: decided here once, translated by every backend."""
        return port_policy(self)

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
