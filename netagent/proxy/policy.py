"""kube-proxy's traffic decisions for one ServicePort, made once, so that every backend only
translates them into its own syntax (iptables rules, nftables maps, BPF map entries, `proxy show`).

Two steps, as kube-proxy's CategorizeEndpoints and its rule writers:
- categorize_endpoints (used while ServicePorts are built, where this node's name is known): which
  endpoints take cluster traffic (internalTrafficPolicy) and which external traffic
  (externalTrafficPolicy), ready ones first, serving+terminating ones only when none is ready;
- port_policy (ServicePort.policy): for the cluster IP and for the external destinations (NodePort,
  externalIPs, LoadBalancer IPs), who is DNATed where, what is masqueraded, what is rejected, and
  the ClientIP affinity, hairpin and health-check facts that go with them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from netagent.proxy.service import Endpoint, ServicePort


def usable_endpoints(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; only when there are none, the serving ones that are terminating (kube-proxy)."""
    endpoints = list(endpoints)
    ready = [e for e in endpoints if e.ready]
    return tuple(sorted(ready or [e for e in endpoints if e.serving and e.terminating]))


def categorize_endpoints(
    endpoints: list[Endpoint], node_name: str, internal_local: bool, external_local: bool
) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]:
    """(cluster endpoints, external endpoints) of one service port on `node_name`: a traffic policy
    of Local keeps only this node's endpoints for that traffic."""
    usable_all = usable_endpoints(endpoints)
    usable_local = (
        usable_endpoints(e for e in endpoints if e.node_name == node_name)
        if internal_local or external_local
        else ()
    )
    return (usable_local if internal_local else usable_all, usable_local if external_local else usable_all)


class Masquerade(enum.Enum):
    """Whether the source of a DNATed connection is rewritten to the node's address on the way out:
    needed wherever the reply would otherwise not come back through this node to be un-DNATed."""

    NEVER = "never"  # the endpoint sees the client's address (externalTrafficPolicy Local)
    OFF_CLUSTER = "off-cluster"  # only sources outside the cluster CIDRs (pods route back through us)
    ALWAYS = "always"  # the endpoint may be on another node, which would answer the client directly


class RejectWith(enum.Enum):
    """How a connection to a destination without endpoints is refused (never black-holed)."""

    TCP_RESET = "tcp-reset"  # not ICMP: ICMP errors are rate limited per host
    ICMP_PORT_UNREACHABLE = "icmp-port-unreachable"


class Destination(NamedTuple):
    """Where clients connect: an address and port, or a NodePort (the port on every local address)."""

    protocol: str  # TCP, UDP or SCTP
    port: int
    ip: str = ""  # "" = a NodePort

    def __str__(self) -> str:
        """The form `netagent proxy show` prints and KernelView entries are keyed by."""
        if not self.ip:
            return f"{self.protocol} nodeport {self.port}"
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.protocol} {host}:{self.port}"


class Traffic(NamedTuple):
    """The connections to some destinations of a service port, and what happens to them.

    Connections that are not DNATed (no `endpoints`, or under externalTrafficPolicy Local none for
    outside clients) are rejected: a backend rejects these destinations for whatever it did not DNAT.
    """

    kind: Literal["cluster", "external"]
    destinations: tuple[Destination, ...]
    endpoints: tuple[Endpoint, ...]  # where connections are balanced to (uniformly, or by affinity)
    masquerade: Masquerade
    # externalTrafficPolicy Local only: pods (sources in the cluster CIDRs) and the node itself are
    # not the load balancer's clients, so they take the cluster path (the cluster traffic's chain)
    # instead of being limited to this node's endpoints or refused; the node's own connections are
    # masqueraded on the way, as their source may be an address only this node has (the LB IP itself).
    inside_takes_cluster_path: bool = False

    @property
    def dnat(self) -> bool:
        """Some source is DNATed: the backend needs this traffic's chain and its entry points."""
        return bool(self.endpoints) or self.inside_takes_cluster_path

    @property
    def rejected(self) -> bool:
        """No endpoint serves clients outside the node (for cluster traffic: any client), so the
        destinations get a reject rule; it catches only what no rule DNATed."""
        return not self.endpoints


class HealthCheck(NamedTuple):
    """externalTrafficPolicy Local's healthCheckNodePort: load balancers send traffic only to nodes
    answering 200, i.e. with a READY local endpoint; local endpoints that are all terminating still
    get what arrives (they drain) but the node answers 503, as kube-proxy's does."""

    node_port: int
    local_ready: int  # ready endpoints on this node


class PortPolicy(NamedTuple):
    """Everything the data plane does with one ServicePort. (This and Traffic are NamedTuples for
    the speed of their creation: a cold start makes 10,000 of each.)"""

    cluster: Traffic  # to the cluster IP
    external: Traffic | None  # to the NodePort, externalIPs and LoadBalancer IPs; None: it has none
    endpoints: tuple[Endpoint, ...]  # every endpoint some traffic reaches; one reaching itself
    # through the service (hairpin) is masqueraded, or the reply would bypass the un-DNAT
    affinity_timeout: int  # seconds a client stays with its endpoint (ClientIP affinity); 0 = none
    reject_with: RejectWith
    health_check: HealthCheck | None

    @property
    def traffic(self) -> tuple[Traffic, ...]:
        """The cluster traffic, then the external traffic if the port has any."""
        return (self.cluster,) if self.external is None else (self.cluster, self.external)

    def reachable(self, traffic: Traffic) -> tuple[Endpoint, ...]:
        """Every endpoint a connection to `traffic`'s destinations can end up at, whatever its source."""
        if not traffic.inside_takes_cluster_path:
            return traffic.endpoints
        return _union(traffic.endpoints, self.cluster.endpoints)


def _union(a: tuple[Endpoint, ...], b: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """Sorted endpoints of both; usually they are the same tuple (no Local traffic policy)."""
    return a if a == b else tuple(sorted({*a, *b}))


def port_policy(p: ServicePort) -> PortPolicy:
    """The policy of `p`; read it as p.policy, which computes it once per ServicePort."""
    cluster = Traffic(
        kind="cluster",
        destinations=(Destination(p.protocol, p.port, p.cluster_ip),),
        endpoints=p.cluster_endpoints,
        masquerade=Masquerade.OFF_CLUSTER,
    )
    external = None
    if p.node_port or p.external_ips:
        external = Traffic(
            kind="external",
            destinations=(
                *(Destination(p.protocol, p.port, ip) for ip in p.external_ips),
                *((Destination(p.protocol, p.node_port),) if p.node_port else ()),
            ),
            endpoints=p.external_endpoints,
            masquerade=Masquerade.NEVER if p.external_local else Masquerade.ALWAYS,
            inside_takes_cluster_path=p.external_local and bool(p.cluster_endpoints),
        )
    health = None
    if p.health_check_node_port:
        # only under externalTrafficPolicy Local, so the external endpoints are this node's
        health = HealthCheck(p.health_check_node_port, sum(e.ready for e in p.external_endpoints))
    return PortPolicy(
        cluster=cluster,
        external=external,
        endpoints=_union(p.cluster_endpoints, p.external_endpoints),
        affinity_timeout=p.affinity_timeout,
        reject_with=RejectWith.TCP_RESET if p.protocol == "TCP" else RejectWith.ICMP_PORT_UNREACHABLE,
        health_check=health,
    )
