"""Stale UDP conntrack entries: the kernel keeps sending a UDP "connection" to the endpoint it was
DNATed to for as long as packets keep flowing, even after that endpoint left the service. kube-proxy
deletes those entries when an endpoint goes away; so do we, right after the rules changed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netagent.proxy.service import ServicePort
from nodekit import conntrack


@dataclass(frozen=True, order=True)
class StaleEndpoint:
    family: int
    ip: str
    port: int


def removed_udp_endpoints(old: Iterable[ServicePort], new: Iterable[ServicePort]) -> list[StaleEndpoint]:
    """UDP endpoints some service port used before and no longer uses."""

    def used(ports: Iterable[ServicePort]) -> dict[tuple, set[tuple[str, int]]]:
        result: dict[tuple, set[tuple[str, int]]] = {}
        for p in ports:
            if p.protocol == "UDP":
                key = (p.namespace, p.name, p.port_name, p.family)
                result[key] = {(e.ip, e.port) for e in p.policy.endpoints}
        return result

    before, after = used(old), used(new)
    stale = {
        StaleEndpoint(key[3], ip, port)
        for key, endpoints in before.items()
        for ip, port in endpoints - after.get(key, set())
    }
    return sorted(stale)


def delete_udp_flows(endpoints: Sequence[StaleEndpoint], netns: str | None = None) -> None:
    """Delete DNATed UDP flows towards each endpoint (best effort: the rules are already right)."""
    for ep in endpoints:
        conntrack.delete_dnat_udp_flows_to(ep.family, ep.ip, ep.port, netns)
