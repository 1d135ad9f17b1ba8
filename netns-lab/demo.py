"""`netagent lab demo`, the README's main job: a cluster, pods, a Service, and proof they all talk.

Three nodes with two pods each (the lab's responders, labelled app=web), the Service from
manifests/demo.yaml in front of them, then the connectivity matrix. Re-running it starts from scratch:
an existing lab of the same name is torn down first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import yaml
from kubernetes.client import ApiClient
from netns_lab import check, cluster, kube, pods, probe
from netns_lab.kube import ServiceTarget
from netns_lab.state import Lab, LabError, PodInfo

NODES = 3
PODS_PER_NODE = 2
DEFAULT_PROXY = "iptables"
MANIFEST = os.path.join(os.path.dirname(__file__), "manifests", "demo.yaml")
SERVICE_READY_TIMEOUT = 60.0


def run(name: str, network: str, proxy: str | None, progress: Callable[[str], None],
        out: Callable[[str], None]) -> bool:
    """The whole demo; True when every connectivity check passed."""
    proxy = proxy or DEFAULT_PROXY
    lab = Lab(name)
    if cluster.exists(lab):
        progress(f"a lab named {name!r} exists: removing it first")
        cluster.down(name, progress=progress)
    cluster.up(name, nodes=NODES, network=network, proxy=proxy, progress=progress)

    for index in range(NODES * PODS_PER_NODE):
        node = f"n{index // PODS_PER_NODE + 1}"
        pod = pods.create(lab, f"web-{index + 1}", node, {"app": "web"})
        progress(f"pod {pod.name} on {pod.node}: {' '.join(pod.ips)}")

    api = kube.connect(lab.kubeconfig)
    with open(MANIFEST) as f:
        for line in kube.apply(api, yaml.safe_load_all(f)):
            progress(line)
    if proxy != "none":
        _wait_for_service(lab, api, progress)

    out("")
    passed = check.main(lab, out)
    out(_what_next(lab, api, passed))
    return passed


def _wait_for_service(lab: Lab, api: ApiClient, progress: Callable[[str], None]) -> None:
    """Until a pod on every node reaches the Service's ClusterIP: endpoints published and every
    node's proxy programmed (each agent syncs on its own schedule)."""
    state = lab.load()
    waiting = list({pod.node: pod for pod in state.pods.values()}.values())  # one pod per node
    deadline = time.monotonic() + SERVICE_READY_TIMEOUT
    while True:
        targets = [t for t in kube.service_targets(api).targets if t.protocol == "TCP" and t.backends]
        if targets:
            waiting = [pod for pod in waiting if not _answers(pod, targets[0])]
            if not waiting:
                progress(f"service reachable at {targets[0].cluster_ip}:{targets[0].port} from every node")
                return
        if time.monotonic() > deadline:
            raise LabError(f"the demo service was not reachable from {', '.join(p.node for p in waiting)} "
                           f"within {SERVICE_READY_TIMEOUT:.0f}s")
        time.sleep(0.5)


def _answers(pod: PodInfo, target: ServiceTarget) -> bool:
    try:
        probe.tcp_name(pod.netns, target.cluster_ip, target.port, timeout=1.0)
        return True
    except OSError:
        return False


def _netagent_command() -> str:
    """This environment's `netagent` as the user can type it from here (e.g. .venv/bin/netagent)."""
    script = os.path.join(os.path.dirname(sys.executable), "netagent")
    relative = os.path.relpath(script)
    return script if relative.startswith("..") else relative


def _what_next(lab: Lab, api: ApiClient, passed: bool) -> str:
    """Ready-to-paste commands using this lab's real names and addresses."""
    state = lab.load()
    lab_cmd = f"{_netagent_command()} lab"
    flag = "" if lab.name == "netagent" else f" --name {lab.name}"
    first, last = state.pods["web-1"], state.pods[f"web-{NODES * PODS_PER_NODE}"]
    service = next((t for t in kube.service_targets(api).targets if t.protocol == "TCP"), None)
    verdict = "Every path works." if passed else "Some checks FAILED (details above)."
    lines = [
        "", f"{verdict} What next:",
        f"  {lab_cmd} status{flag}",
        f"  {lab_cmd} exec{flag} {first.name} -- curl -s http://{last.ips[0]}:8080/    "
        f"# {first.node} -> {last.node}",
    ]
    if service is not None and state.proxy != "none":
        lines.append(f"  {lab_cmd} exec{flag} {first.name} -- curl -s http://{service.cluster_ip}:{service.port}/"
                     "    # the Service, balanced")
    lines += [
        f"  {lab_cmd} pod{flag} extra --node n2 --labels app=web && {lab_cmd} check{flag}",
        f"  {lab_cmd} kubeconfig{flag}    # for kubectl or the kubernetes client",
        f"  {lab_cmd} down{flag}",
    ]
    return "\n".join(lines)
