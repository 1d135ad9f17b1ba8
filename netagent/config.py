"""The agent's configuration: one immutable object built once from the command line and handed to
every part of the agent, so no constructor takes a dozen loose parameters and a new option is added
in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cni.config import DEFAULT_DATA_DIR
from netagent.gc.controller import DEFAULT_INTERVAL as DEFAULT_GC_INTERVAL
from netagent.gc.rules import DEFAULT_GRACE as DEFAULT_GC_GRACE
from nodekit import nodestate

NETWORK_MODES = ("vxlan", "routes", "none")
PROXY_BACKENDS = ("none", "iptables", "iptables-legacy", "nftables", "ipvs", "ebpf")
# accepted on the command line (the lab and manifests name them) but refused with the reason
UNAVAILABLE_PROXIES = {
    "ipvs": "the IPVS backend is not implemented (and this kind of kernel has no IPVS: see "
            "`netagent doctor`); use --proxy nftables",
}


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: str = nodestate.DEFAULT_STATE_DIR
    kubeconfig: str | None = None
    standalone: bool = False
    pod_cidrs: tuple[str, ...] = ()
    network: str = "vxlan"
    underlay_iface: str | None = None
    vxlan_vni: int = 1
    vxlan_port: int = 4789
    cluster_cidrs: tuple[str, ...] = ("10.244.0.0/16",)
    proxy: str = "none"
    fast_path: bool = False
    healthz_bind: str = "0.0.0.0:10256"
    metrics_bind: str = "127.0.0.1:10249"
    min_sync_period: float = 1.0
    gc_interval: float = DEFAULT_GC_INTERVAL
    gc_grace: float = DEFAULT_GC_GRACE
    cni_data_dir: str = DEFAULT_DATA_DIR
    containerd_socket: str | None = None

    @property
    def lock_path(self) -> str:
        return os.path.join(self.state_dir, "agent.lock")

    @property
    def node_state_path(self) -> str:
        return nodestate.path_in(self.state_dir)

    @property
    def cni_socket_path(self) -> str:
        return os.path.join(self.state_dir, "cni.sock")

    @property
    def ready_path(self) -> str:
        return os.path.join(self.state_dir, "ready")
