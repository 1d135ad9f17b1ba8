"""Lab pods: a netns wired by the node's CNI plugin, a responder inside, and a Pod object.

A lab pod is what a kubelet + runtime make of a pod spec, minus the container: the network namespace
is created, the node's installed plugin chain is executed as a runtime executes it, the responder
(the pod's "workload") is started inside, and only once it answers is the Pod registered as Ready —
the same promise a readiness probe makes.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence

from netns_lab import cni_exec, probe, processes
from netns_lab.cni_exec import Attachment
from netns_lab.responder import DEFAULT_PORT as RESPONDER_PORT
from netns_lab.state import Lab, LabError, LabState, PodInfo, check_pod_name, private_dir

from nodekit import netns

READY_TIMEOUT = 20.0


def parse_labels(text: str) -> dict[str, str]:
    """'app=web,tier=front' -> {'app': 'web', 'tier': 'front'}."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LabError(f"invalid label {item!r}: expected key=value")
        labels[key] = value
    return labels


def create(lab: Lab, name: str, node_name: str, labels: Mapping[str, str]) -> PodInfo:
    """Create pod `name` on `node_name`; on failure nothing of it is left."""
    check_pod_name(name)
    with lab.update() as state:
        node = state.nodes.get(node_name)
        if node is None:
            raise LabError(f"no node {node_name!r} in lab {lab.name!r} (nodes: {', '.join(state.nodes)})")
        if name in state.pods or netns.exists(lab.pod_netns(name)):
            raise LabError(f"pod {name!r} already exists")
        pod = PodInfo(name=name, node=node_name, netns=lab.pod_netns(name),
                      container_id=secrets.token_hex(32), ips=[], labels=dict(labels), cni_result={})
        try:
            _start(lab, state, pod)
        except BaseException:
            _teardown(lab, state, pod)
            raise
        state.pods[name] = pod
    return pod


def _start(lab: Lab, state: LabState, pod: PodInfo) -> None:
    from netns_lab import kube

    node = state.nodes[pod.node]
    attachment = Attachment(pod.container_id, netns.create(pod.netns))
    pod.cni_result = cni_exec.add(node, attachment)
    pod.ips = [ip["address"].split("/")[0] for ip in pod.cni_result.get("ips", [])]
    if not pod.ips:
        raise LabError(f"the CNI plugin gave pod {pod.name} no IP address")
    private_dir(os.path.join(lab.dir, "pods"))
    pod.server = processes.spawn(
        netns.exec_argv(pod.netns, [sys.executable, "-m", "netns_lab.responder", "--name", pod.name]),
        os.path.join(lab.dir, "pods", f"{pod.name}.log"))
    _wait_until_answering(pod)
    kube.register_pod(kube.connect(lab.kubeconfig), pod, node.ip)


def _wait_until_answering(pod: PodInfo) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            probe.tcp_name(pod.netns, "127.0.0.1", RESPONDER_PORT, timeout=1.0)
            return
        except OSError:
            if pod.server is None or not pod.server.alive() or time.monotonic() > deadline:
                raise LabError(f"the responder in pod {pod.name} did not start") from None
            time.sleep(0.05)


def remove(lab: Lab, name: str) -> None:
    """`lab rm`: stop the pod's processes, CNI DEL, delete the netns and the Pod object."""
    from netns_lab import kube

    with lab.update() as state:
        pod = state.pods.get(name)
        if pod is None:
            raise LabError(f"no pod {name!r} in lab {lab.name!r}")
        _teardown(lab, state, pod)
        kube.delete_pod(kube.connect(lab.kubeconfig), name)
        del state.pods[name]


def _teardown(lab: Lab, state: LabState, pod: PodInfo) -> None:
    """Undo whatever of a pod exists: processes in its netns, its attachment, the netns."""
    pod_netns = netns.path(pod.netns)
    if netns.exists(pod.netns):
        st = os.stat(pod_netns)
        inside = processes.find(lambda pid: processes.netns_inode(pid) == (st.st_dev, st.st_ino))
        processes.stop([*inside, *([pod.server] if pod.server else [])])
    cni_exec.delete(state.nodes[pod.node], Attachment(pod.container_id, pod_netns), pod.cni_result or None)
    netns.delete(pod.netns)


def exec_argv(lab: Lab, name: str, command: Sequence[str]) -> list[str]:
    """argv running `command` inside pod `name`'s netns (for `lab exec`)."""
    state = lab.load()
    if name not in state.pods:
        raise LabError(f"no pod {name!r} in lab {lab.name!r}")
    if not command:
        raise LabError("nothing to run: lab exec POD -- CMD [ARGS...]")
    return netns.exec_argv(state.pods[name].netns, command)
