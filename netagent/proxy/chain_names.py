"""How the rule backends name a service port's chains: one scheme, spelled per backend (the
spellings are what kernels already hold, so they stay)."""

from __future__ import annotations

from dataclasses import dataclass

from netagent.proxy.policy import Masquerade, Traffic
from netagent.proxy.service import Endpoint, ServicePort


@dataclass(frozen=True)
class ChainNames:
    cluster: str  # prefix of a port's chain for its cluster traffic (+ the port's uid)
    external: str  # prefix of its chain for external traffic
    endpoint: str  # prefix of one endpoint's chain (+ the endpoint's uid within the port)
    mark_masquerade: str  # the chain that marks a connection for masquerading
    masquerade_off_cluster: str  # the chain that marks it unless its source is in the cluster CIDRs

    def for_traffic(self, p: ServicePort, traffic: Traffic) -> str:
        return f"{self.cluster if traffic.kind == 'cluster' else self.external}{p.uid}"

    def cluster_chain(self, p: ServicePort) -> str:
        return self.for_traffic(p, p.policy.cluster)

    def endpoint_chain(self, p: ServicePort, e: Endpoint) -> str:
        return f"{self.endpoint}{p.endpoint_uid(e)}"

    def masquerade_chain(self, masquerade: Masquerade) -> str | None:
        """The chain a connection jumps to for this masquerade decision; None: no jump."""
        if masquerade is Masquerade.NEVER:
            return None
        return self.masquerade_off_cluster if masquerade is Masquerade.OFF_CLUSTER else self.mark_masquerade
