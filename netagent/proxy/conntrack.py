"""Stale UDP conntrack entries: the kernel keeps sending a UDP "connection" to the endpoint it was
DNATed to for as long as packets keep flowing, even after that endpoint left the service. kube-proxy
deletes those entries when an endpoint goes away; so do we, right after the rules changed."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netagent import netns as netns_mod
from netagent.proxy.model import ServicePort

log = logging.getLogger(__name__)


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
                result[key] = {(e.ip, e.port) for e in (*p.cluster_endpoints, *p.external_endpoints)}
        return result

    before, after = used(old), used(new)
    stale = {
        StaleEndpoint(key[3], ip, port)
        for key, endpoints in before.items()
        for ip, port in endpoints - after.get(key, set())
    }
    return sorted(stale)


def delete_udp_flows(endpoints: Sequence[StaleEndpoint], netns: str | None = None) -> None:
    """Delete DNATed UDP flows towards each endpoint. Best effort: a failure is logged, not raised,
    because the rules are already right and the entries expire on their own eventually."""
    for ep in endpoints:
        argv = [
            "conntrack",
            "-D",
            "-f",
            f"ipv{ep.family}",
            "-p",
            "udp",
            "--reply-src",
            ep.ip,
            "--reply-port-src",
            str(ep.port),
            "--dst-nat",
        ]
        full = netns_mod.exec_argv(netns, argv) if netns else argv
        proc = subprocess.run(full, capture_output=True, text=True)
        # conntrack exits 1 when nothing matched; only other failures are worth a warning
        if proc.returncode != 0 and "0 flow entries" not in proc.stderr:
            log.warning("conntrack cleanup for %s:%s failed: %s", ep.ip, ep.port, proc.stderr.strip())
