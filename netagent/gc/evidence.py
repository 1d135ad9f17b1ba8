"""What says an attachment is in use, gathered before each pass: the IPs of the pods the API server
places on this node, the sandboxes the container runtime still has, and this node's pod CIDRs.

Whatever cannot be gathered stops the pass before it touches anything (EvidenceUnavailable)."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni.config import IPNetwork
from nodekit import nodestate

FINISHED_PHASES = ("Succeeded", "Failed")  # such a pod's sandbox is gone: its IP is no longer in use


class EvidenceUnavailable(RuntimeError):
    """The pods (or the runtime's sandboxes) could not be listed: the pass stops before touching anything."""


@dataclass(frozen=True)
class Evidence:
    """What says an attachment is in use, gathered before each pass."""

    pod_ips: frozenset[str]  # of the pods the API server says run on this node
    sandboxes: frozenset[str] | None = None  # container ids the runtime still has; None: no runtime known


GatherEvidence = Callable[[], Evidence]


def pod_ips(pods: list[Any]) -> frozenset[str]:
    """IPs that CNI gave to pods still holding their sandbox: host-network pods hold the node's IP,
    not one of ours, and finished pods' IPs are free to collect."""
    ips = set()
    for pod in pods:
        status = pod.status
        if status is None or status.phase in FINISHED_PHASES or (pod.spec and pod.spec.host_network):
            continue
        ips.update(ip.ip for ip in status.pod_ips or [] if ip.ip)
        if status.pod_ip:
            ips.add(status.pod_ip)
    return frozenset(ips)


def node_selector(node_name: str) -> str:
    return f"spec.nodeName={node_name}"


def node_pod_cidrs(state_dir: str) -> tuple[IPNetwork, ...] | None:
    """This node's pod CIDRs from the agent's node state; None when it has not been written."""
    try:
        state = nodestate.read(nodestate.path_in(state_dir))
    except FileNotFoundError:
        return None
    return tuple(ipaddress.ip_network(cidr) for cidr in state.pod_cidrs)


def containerd_sandboxes(socket_path: str) -> frozenset[str]:
    """Every container id containerd still has, in the forms a CNI call names a pod by: CRI uses the
    sandbox's id, `ctr run --cni` uses "<namespace>-<id>". Raises RuntimeError when ctr cannot answer."""
    namespaces = _ctr(socket_path, "namespaces", "list", "-q")
    ids: set[str] = set()
    for namespace in namespaces:
        for container_id in _ctr(socket_path, "--namespace", namespace, "containers", "list", "-q"):
            ids.update((container_id, f"{namespace}-{container_id}"))
    return frozenset(ids)


def _ctr(socket_path: str, *args: str) -> list[str]:
    try:
        done = subprocess.run(["ctr", "--address", socket_path, *args], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot ask containerd at {socket_path} for its sandboxes: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"cannot ask containerd at {socket_path} for its sandboxes: "
                           f"{(done.stderr or done.stdout).strip()}")
    return done.stdout.split()


def sandboxes_or_none(containerd_socket: str | None) -> frozenset[str] | None:
    return None if containerd_socket is None else containerd_sandboxes(containerd_socket)


def listed_evidence(kubeconfig: str | None, node_name: str, containerd_socket: str | None) -> GatherEvidence:
    """For one pass by hand: list this node's pods now (and the runtime's sandboxes, if one is given)."""
    def gather() -> Evidence:
        from kubernetes import client

        from netagent.kube import load_api_client

        core = client.CoreV1Api(load_api_client(kubeconfig))
        pods = core.list_pod_for_all_namespaces(field_selector=node_selector(node_name), _request_timeout=30)
        return Evidence(pod_ips(pods.items), sandboxes_or_none(containerd_socket))
    return gather
