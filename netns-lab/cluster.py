"""A lab cluster's life: `up` builds underlay, nodes, API server and agents; `down` removes it all.

`up` records every step in lab.json before taking it, and on any failure (including Ctrl-C) runs
`down` itself, so a failed `up` leaves nothing behind. `down` does not depend on lab.json being
complete either: it sweeps by name (the lab's netns, processes inside them or naming the lab's
directory), so even an `up` killed with SIGKILL half-way is cleaned up completely.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from netns_lab import processes, supervisor, topology
from netns_lab.processes import ProcRef
from netns_lab.state import LAB_ROOT, Lab, LabError, LabState, NodeInfo, private_dir
from netns_lab.supervisor import AgentStatus, read_status

from nodekit import netns
from nodekit.files import atomic_write

CLUSTER_CIDR = ipaddress.ip_network("10.244.0.0/16")
SERVICE_CIDR = "10.96.0.0/16"
API_PORT = 6443
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
NETWORKS = ("vxlan", "routes")
PROXIES = ("none", "iptables", "iptables-legacy", "nftables", "ipvs", "ebpf")
DEFAULT_TIMEOUT = 90.0
LOG_TAIL_LINES = 25

Progress = Callable[[str], None]


def _python_module(module: str, *args: str) -> list[str]:
    """argv running one of our modules with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", module, *args]


def node_pod_cidr(index: int) -> str:
    return str(list(CLUSTER_CIDR.subnets(new_prefix=24))[index])


def up(name: str, nodes: int = 3, network: str = "vxlan", proxy: str = "none",
       timeout: float = DEFAULT_TIMEOUT, progress: Progress = print, fast_path: bool = False) -> LabState:
    """Build the whole lab and return once every agent reported ready; on failure, leave nothing."""
    lab = Lab(name)
    if not 1 <= nodes <= topology.MAX_NODES:
        raise LabError(f"--nodes must be between 1 and {topology.MAX_NODES}")
    if exists(lab):
        raise LabError(f"lab {name!r} already exists: run `netagent lab down --name {name}` first")
    started = time.monotonic()
    try:
        state = _build(lab, nodes, network, proxy, fast_path, timeout, progress)
    except BaseException:
        progress("lab up failed; removing what it created")
        down(name, progress=lambda _msg: None)
        raise
    fast = ", fast path" if fast_path else ""
    progress(f"lab {name!r} ready: {nodes} nodes, network {network}{fast}, proxy {proxy} "
             f"({time.monotonic() - started:.1f}s)")
    return state


def exists(lab: Lab) -> bool:
    """True if anything of the lab is there, even the remains of a killed `up`."""
    return os.path.isdir(lab.dir) or any(lab.owns_netns(n) for n in netns.names(f"{lab.name}-"))


def _build(lab: Lab, count: int, network: str, proxy: str, fast_path: bool, timeout: float,
           progress: Progress) -> LabState:
    state = _plan(lab, count, network, proxy, fast_path)
    # Slow starters first, so they overlap: install-cni processes and the kubernetes client import.
    installing = _start_cni_install(state)
    kube_import = threading.Thread(target=_preload_kubernetes_client, daemon=True)
    kube_import.start()

    progress(f"underlay: netns {lab.underlay_netns}, bridge {topology.UNDERLAY_BRIDGE} "
             f"{topology.UNDERLAY_GATEWAY}/{topology.UNDERLAY.prefixlen}")
    topology.create_underlay(lab.underlay_netns)
    _spawn_apiserver(lab, state)  # it binds inside the underlay netns; nodes are wired meanwhile
    _wire_nodes(lab, state, progress)
    _wait_for_apiserver(lab, state, timeout)
    lab.save(state)
    progress(f"API server: {state.api_url} (agents: {state.api_internal_url}); kubeconfig {lab.kubeconfig}")

    kube_import.join()
    _register_nodes(lab, state)
    _finish_cni_install(installing)
    progress(f"Nodes registered, CNI plugin installed on {', '.join(state.nodes)}")

    for node in state.nodes.values():
        node.supervisor = _start_agent(state, node)
        lab.save(state)
    progress(f"agents started (network {network}, proxy {proxy}); waiting for them to be ready")
    _wait_for_agents(state, timeout, progress)
    state.phase = "ready"
    lab.save(state)
    return state


def _preload_kubernetes_client() -> None:
    from netns_lab import kube

    kube.preload()


def _plan(lab: Lab, count: int, network: str, proxy: str, fast_path: bool) -> LabState:
    """The lab's state before anything exists: node names, IPs, pod CIDRs, directories."""
    state = LabState(name=lab.name, network=network, proxy=proxy, fast_path=fast_path)
    for path in (LAB_ROOT, lab.dir):
        private_dir(path)
    for index in range(1, count + 1):
        node = f"n{index}"
        state.nodes[node] = NodeInfo(name=node, netns=lab.node_netns(node), ip=topology.node_ip(index),
                                     pod_cidr=node_pod_cidr(index), dir=lab.node_dir(node))
        private_dir(state.nodes[node].dir)
        private_dir(state.nodes[node].state_dir)
    lab.save(state)
    return state


def _wire_nodes(lab: Lab, state: LabState, progress: Progress) -> None:
    """Each node's netns on the underlay, with the responder `lab check` uses for pod->node.

    Nodes are wired concurrently: it is mostly waiting for `ip` processes.
    """
    def wire(node: NodeInfo) -> None:
        topology.attach_node(lab.underlay_netns, node.netns, f"v{node.name}", node.ip, SERVICE_CIDR)
        node.responder = processes.spawn(
            netns.exec_argv(node.netns, _python_module("netns_lab.responder", "--name", node.name)),
            os.path.join(node.dir, "responder.log"))
        progress(f"node {node.name}: netns {node.netns}, eth0 {node.ip}, podCIDR {node.pod_cidr}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        wired = [pool.submit(wire, node) for node in state.nodes.values()]
    lab.save(state)
    for future in wired:
        future.result()  # the first failure, if any


def _register_nodes(lab: Lab, state: LabState) -> None:
    """The lab's node IPAM and kubelet part: a Node per node, with its podCIDR, InternalIP and Ready."""
    from netns_lab import kube

    api = kube.connect(lab.kubeconfig)
    for node in state.nodes.values():
        kube.create_node(api, node.name, node.ip, node.pod_cidr)


def _spawn_apiserver(lab: Lab, state: LabState) -> None:
    """The API server, with a new bearer token that only root can read (the token file, 0600, and
    the kubeconfigs made from it): anonymous clients get 401."""
    from netns_lab.apiserver.server import new_token

    atomic_write(lab.api_token, new_token() + "\n", mode=0o600)
    argv = _python_module(
        "netns_lab.apiserver", "--data", lab.api_data, "--listen", "127.0.0.1:0",
        "--listen-netns", f"{lab.underlay_netns}={topology.UNDERLAY_GATEWAY}:{API_PORT}",
        "--service-cidr", SERVICE_CIDR, "--ready-file", lab.api_ready, "--token-file", lab.api_token,
    )
    state.apiserver = processes.spawn(argv, lab.api_log)
    lab.save(state)


def _wait_for_apiserver(lab: Lab, state: LabState, timeout: float) -> None:
    """Until its ready file appears; then write the kubeconfigs for the host and for each node."""
    from netns_lab.apiserver.server import Credentials, write_kubeconfig

    assert state.apiserver is not None
    deadline = time.monotonic() + timeout
    while not os.path.exists(lab.api_ready):
        if not state.apiserver.alive():
            raise LabError(f"the API server exited:\n{log_tail(lab.api_log)}")
        if time.monotonic() > deadline:
            raise LabError(f"the API server was not ready within {timeout:g}s:\n{log_tail(lab.api_log)}")
        time.sleep(0.05)
    try:
        with open(lab.api_ready) as f:
            ready = json.load(f)  # {"url": ..., "port": ..., "pid": ..., "ca": certificate path}
        state.api_url = ready["url"]
        credentials = Credentials.read(lab.api_token, ready["ca"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LabError(f"unreadable API server ready file {lab.api_ready} or token: {e}") from None
    state.api_internal_url = f"https://{topology.UNDERLAY_GATEWAY}:{API_PORT}"
    write_kubeconfig(lab.kubeconfig, state.api_url, credentials)
    for node in state.nodes.values():
        write_kubeconfig(node.kubeconfig, state.api_internal_url, credentials)


def _start_cni_install(state: LabState) -> list[tuple[NodeInfo, subprocess.Popen]]:
    """`netagent install-cni` into each node's own dirs, all nodes at once (see _finish_cni_install)."""
    running = []
    for node in state.nodes.values():
        argv = _python_module(
            "netagent.cli", "install-cni", "--bin-dir", node.cni_bin_dir, "--conf-dir", node.cni_conf_dir,
            "--state-dir", node.state_dir, "--data-dir", node.ipam_dir, "--cluster-cidr", str(CLUSTER_CIDR),
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        running.append((node, proc))
    return running


def _finish_cni_install(running: list[tuple[NodeInfo, subprocess.Popen]]) -> None:
    failures = []
    for node, proc in running:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"install-cni on {node.name} failed:\n{output.strip()}")
    if failures:
        raise LabError("\n".join(failures))


def restart_agent(name: str, node_name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Stop one node's agent (SIGTERM: it leaves the kernel state in place) and start a new one with
    the lab's current settings, as a DaemonSet rollout does (a new pod: its restart count starts at 0);
    returns once the new agent is ready, never on the old one's readiness."""
    lab = Lab(name)
    with lab.update() as state:
        if node_name not in state.nodes:
            raise LabError(f"lab {name!r} has no node {node_name!r}")
        node = state.nodes[node_name]
        _stop_agent(node)
        node.supervisor = _start_agent(state, node)
    _wait_for_agents(replace(state, nodes={node_name: node}), timeout, lambda _msg: None)


def _stop_agent(node: NodeInfo) -> None:
    """Its supervisor stops it (SIGTERM, SIGKILL after the grace); an agent left by a supervisor that
    is gone gets the same; the old ready marker goes with it."""
    if node.supervisor is not None:
        processes.stop([node.supervisor], grace=supervisor.STOP_GRACE + 5)
    status = read_status(node.agent_status)
    if status is not None and status.agent is not None:
        processes.stop([status.agent], grace=supervisor.STOP_GRACE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node.ready_marker)


def _start_agent(state: LabState, node: NodeInfo) -> ProcRef:
    """The node's agent under its supervisor (which the returned ProcRef names)."""
    argv = _python_module(
        "netagent.cli", "run", "--node-name", node.name, "--kubeconfig", node.kubeconfig,
        "--state-dir", node.state_dir, "--network", state.network, "--underlay-iface", topology.NODE_IFACE,
        "--cluster-cidr", str(CLUSTER_CIDR), "--proxy", state.proxy,
        "--healthz-bind", f"{node.ip}:{HEALTHZ_PORT}", "--metrics-bind", f"{node.ip}:{METRICS_PORT}",
        "--cni-data-dir", node.ipam_dir, *(["--fast-path"] if state.fast_path else []),
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(node.agent_status)  # a new supervisor: no restarts yet
    return processes.spawn(
        _python_module("netns_lab.supervisor", "--status", node.agent_status, "--ready-marker",
                       node.ready_marker, "--log", node.agent_log, "--", *netns.exec_argv(node.netns, argv)),
        node.supervisor_log)


def agent_ready(node: NodeInfo, status: AgentStatus | None) -> bool:
    """The agent running now wrote the ready marker: it holds that process's pid (a marker left by an
    agent that died, or by the one before a restart, does not count)."""
    if status is None or status.state != "running" or status.agent is None or not status.agent.alive():
        return False
    try:
        with open(node.ready_marker) as f:
            return f.read().strip() == str(status.pid)
    except OSError:
        return False


def _wait_for_agents(state: LabState, timeout: float, progress: Progress) -> None:
    """Until every agent is ready; an agent that exits meanwhile (its supervisor counted a restart)
    or a supervisor that is gone fails at once, with the log."""
    deadline = time.monotonic() + timeout
    waiting = dict(state.nodes)
    while waiting:
        for name, node in list(waiting.items()):
            status = read_status(node.agent_status)
            if agent_ready(node, status):
                progress(f"agent on {name} ready")
                del waiting[name]
            elif node.supervisor is None or not node.supervisor.alive():
                raise LabError(f"the agent's supervisor on {name} exited; its log "
                               f"({node.supervisor_log}):\n{log_tail(node.supervisor_log)}")
            elif status is not None and status.restarts > 0:
                raise LabError(f"the agent on {name} exited ({status.last_exit}); its log "
                               f"({node.agent_log}):\n{log_tail(node.agent_log)}")
        if waiting and time.monotonic() > deadline:
            node = next(iter(waiting.values()))
            raise LabError(f"agent(s) on {', '.join(waiting)} not ready within {timeout:g}s; "
                           f"log of {node.name} ({node.agent_log}):\n{log_tail(node.agent_log)}")
        time.sleep(0.1)


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return "  (no log)"
    return "".join("  | " + line for line in tail).rstrip() or "  (empty log)"


def down(name: str, progress: Progress = print) -> None:
    """Remove every process, netns and file of lab `name`; fine to run on a partial or absent lab."""
    lab = Lab(name)
    lab_netns = [n for n in netns.names(f"{name}-") if lab.owns_netns(n)]
    recorded = _recorded_processes(lab)
    # Supervisors first, so that none starts an agent again while the agents are being stopped.
    supervisors = [p for p in set(recorded) | set(_lab_processes(lab, lab_netns)) if _is_supervisor(p)]
    processes.stop(supervisors, grace=0)
    stopped: set[ProcRef] = set(supervisors)
    for _ in range(5):  # processes may spawn children while being stopped: sweep until none is left
        found = (set(recorded) | set(_lab_processes(lab, lab_netns))) - stopped
        recorded = []
        if not found:
            break
        processes.stop(found, grace=0)  # all they own is deleted next: no graceful shutdown needed
        stopped |= found
    else:
        raise LabError(f"processes of lab {name!r} keep reappearing; not removing its namespaces")
    # Pods first: their veth peers live in the nodes, whose links go with them; the underlay last.
    for ns_name in sorted(lab_netns, key=lambda n: (not n.startswith(f"{name}-p-"), n.endswith("-ul"), n)):
        netns.delete(ns_name)
    shutil.rmtree(lab.dir, ignore_errors=True)
    progress(f"lab {name!r} removed ({len(lab_netns)} namespaces, {len(stopped)} processes)")


def _recorded_processes(lab: Lab) -> list[ProcRef]:
    try:
        state = lab.load()
    except (LabError, ValueError, KeyError, TypeError):  # absent, or torn by a killed `up`
        return []
    refs = [state.apiserver] + [p for n in state.nodes.values() for p in (n.supervisor, n.responder)]
    refs += [pod.server for pod in state.pods.values()]
    return [r for r in refs if r is not None]


def _is_supervisor(proc: ProcRef) -> bool:
    try:
        return "netns_lab.supervisor" in processes.cmdline(proc.pid)
    except OSError:
        return False


def _lab_processes(lab: Lab, lab_netns: list[str]) -> list[ProcRef]:
    """Processes living in one of the lab's netns, or naming the lab's directory on their command line."""
    inodes = set()
    for ns_name in lab_netns:
        st = os.stat(netns.path(ns_name))
        inodes.add((st.st_dev, st.st_ino))
    marker = lab.dir + "/"

    def belongs(pid: int) -> bool:
        if processes.netns_inode(pid) in inodes:
            return True
        return any(marker in arg or arg == lab.dir for arg in processes.cmdline(pid))

    return processes.find(belongs)


@dataclass(frozen=True)
class AgentHealth:
    """A node's agent as `lab status` shows it, from its supervisor's status file and the processes."""

    node: str
    state: str  # "ready", "starting", "restarting" (waiting for its back-off), "NOT RUNNING"
    restarts: int
    detail: str  # how it last exited, when it starts again
    healthz: str


def agent_health(state: LabState) -> list[AgentHealth]:
    from netns_lab import probe

    health = []
    for node in state.nodes.values():
        status = read_status(node.agent_status)
        supervised = node.supervisor is not None and node.supervisor.alive()
        restarts, detail = (status.restarts, status.last_exit) if status else (0, "")
        running = status is not None and status.agent is not None and status.agent.alive()
        if agent_ready(node, status):
            agent = "ready"
        elif running:
            agent = "starting"
        elif supervised and status is not None and status.state == "waiting" and status.next_start:
            agent = "restarting"
            detail = "; ".join(filter(None, [detail, f"starts again in "
                                             f"{max(0.0, status.next_start - time.time()):.0f}s"]))
        elif supervised:
            agent = "starting"
        else:
            agent = "NOT RUNNING"
        if not supervised:  # as with a node whose kubelet is down: nothing restarts the agent
            detail = "; ".join(filter(None, [detail, "no supervisor: not restarted if it dies"]))
        try:
            answer = probe.http_get(node.netns, node.ip, HEALTHZ_PORT, "/healthz", timeout=1.0)
        except OSError as e:
            answer = f"unreachable ({e.strerror or type(e).__name__})"
        health.append(AgentHealth(node.name, agent, restarts, detail, answer))
    return health
