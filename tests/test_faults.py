"""Crash resilience with real processes killed by SIGKILL, in real netns with real traffic:

- the CNI plugin killed at random points of ADD and of DEL, many times: one GC pass afterwards
  leaves nothing leaked, and live pods keep their IPs and their established TCP connections;
- the agent killed in the middle of syncs: the restarted agent converges (a further restart changes
  nothing) and established TCP connections survive, pod to pod across nodes and through a ClusterIP
  of the iptables proxy;
- the API server process killed for a while: nodes keep forwarding with their last state (pod to
  pod and through a ClusterIP, established and new connections), then apply changes made once it
  is back (a node removed, a new Service);
- two agents on one node: the second refuses, naming the lock, and the first is undisturbed.

`plugin_kill_rounds` and `agent_kill_rounds` are also what benchmarks/faults.py runs for its figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import test_agent
import test_gc
from kubernetes import client
from test_agent import (
    API_ADDRESS,
    NODE_IPS,
    AgentProcess,
    Cluster,
    LongLivedConnection,
    all_pairs_reachable,
    reachable,
    start_all,
)
from test_gc import ECHO_PORT, Node, Pod, wait_for
from test_node_network import NetlinkMonitor, build_cluster, kernel_dump, ns_run

from netagent.kube import load_api_client
from nodekit import netns

apiserver = pytest.importorskip("netns_lab.apiserver.server")

agents, cluster, node = test_agent.agents, test_agent.cluster, test_gc.node  # fixtures, shared as they are
ITERATIONS = 30  # per verb; benchmarks/faults.py runs more
ECHO_POD_PORT = 5006


# ------------------------------------------------------------------------ the plugin killed mid-call


@dataclass
class FaultFigures:
    iterations: int = 0  # plugin runs started, ADD and DEL together
    faults_injected: int = 0  # runs killed while still working
    leftovers_before_gc: int = 0  # allocations + veths no live pod explains, left by the kills
    leaks_after_gc: list[str] = field(default_factory=list)  # what GC left of the leftovers
    connections_dropped: int = 0
    gc_seconds: float = 0.0  # the whole `netagent gc` process, interpreter start included


class NodeConnection:
    """An established TCP connection from the node to a pod's echo server, kept for the whole run."""

    def __init__(self, node: Node, pod: Pod) -> None:
        with netns.entered(netns.path(node.ns)):
            self.sock = socket.create_connection((pod.ip, ECHO_PORT), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def alive(self) -> bool:
        try:
            self.sock.sendall(b"still there?")
            return self.sock.recv(64) == b"still there?"
        except OSError:
            return False


def kill_at_random_point(node: Node, command: str, pod: Pod, window: float, rng: random.Random) -> bool:
    """Run the plugin as a runtime does and SIGKILL it after a random delay in [0, window).

    True when the kill hit a plugin still at work (a fault injected), False when it had finished.
    """
    proc = subprocess.Popen(node.plugin_argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=node.plugin_env(command, pod))
    proc.stdin.write(json.dumps(node.conf).encode())
    proc.stdin.close()
    time.sleep(rng.uniform(0, window))
    hit = proc.poll() is None
    proc.kill()
    proc.wait()
    return hit


def timed_cni(node: Node, command: str, pod: Pod) -> float:
    started = time.monotonic()
    node.cni(command, pod)
    return time.monotonic() - started


def abandon(pod: Pod, index: int) -> None:
    """The runtime lost the pod; every other one also loses its netns (which takes the veth with it)."""
    if index % 2:
        netns.delete(pod.netns)


def plugin_kill_rounds(node: Node, iterations: int, rng: random.Random) -> FaultFigures:
    """Two live pods with established connections; then `iterations` ADDs and `iterations` DELs each
    SIGKILLed at a random point; then one `netagent gc` pass. Returns what happened.

    The connections are checked after every iteration and after GC; a fresh connection to each live
    pod at the end proves it still has its IP. A connection that fails once counts as dropped."""
    figures = FaultFigures()
    live = [node.run_pod("live1"), node.run_pod("live2")]
    connections = [NodeConnection(node, pod) for pod in live]
    dropped: set[int] = set()

    def check_connections() -> None:
        for i, connection in enumerate(connections):
            if i not in dropped and not connection.alive():
                dropped.add(i)

    try:
        probe = node.new_pod("probe")  # one undisturbed ADD and DEL: how long a whole call takes here
        add_window, del_window = timed_cni(node, "ADD", probe), timed_cni(node, "DEL", probe)
        for i in range(iterations):
            pod = node.new_pod(f"a{i}")
            figures.faults_injected += kill_at_random_point(node, "ADD", pod, add_window, rng)
            abandon(pod, i)
            check_connections()
        for i in range(iterations):
            pod = node.new_pod(f"d{i}")
            node.cni("ADD", pod)
            figures.faults_injected += kill_at_random_point(node, "DEL", pod, del_window, rng)
            abandon(pod, i)
            check_connections()
        figures.iterations = 2 * iterations

        figures.leftovers_before_gc = len(node.leftovers(live))
        started = time.monotonic()
        done = node.gc("--grace", "0")
        figures.gc_seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        figures.leaks_after_gc = node.leftovers(live)
        check_connections()
        figures.connections_dropped = len(dropped) + sum(not node.answers(pod) for pod in live)
    finally:
        for connection in connections:
            connection.close()
    return figures


def test_plugin_killed_at_random_points_of_add_and_del_leaves_nothing_after_gc(node):
    figures = plugin_kill_rounds(node, ITERATIONS, random.Random(5))

    assert figures.faults_injected >= ITERATIONS // 2  # most kills hit a plugin at work
    assert figures.leftovers_before_gc > 0  # the kills did leave state behind ...
    assert figures.leaks_after_gc == []  # ... and one GC pass released all of it
    assert figures.connections_dropped == 0


# ------------------------------------------------------------------------ the agent killed mid-sync


@dataclass
class AgentFaultFigures:
    kills: int = 0  # agents SIGKILLed with a sync due or running
    connections_dropped: int = 0  # the long-lived cross-node connection, counted once
    changes_on_a_further_restart: list[str] = field(default_factory=list)  # netlink, once converged


def kill_agent(agent: AgentProcess) -> None:
    """SIGKILL an agent and remove the ready marker it leaves behind, which would otherwise pass for
    its successor's before that one has synced anything."""
    agent.stop(signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(agent.ready_path)


def survives(connection: LongLivedConnection, payload: bytes) -> bool:
    try:
        return connection.round_trip(payload)
    except OSError:
        return False


def agent_kill_rounds(cluster: Cluster, kills: int, rng: random.Random) -> AgentFaultFigures:
    """Three nodes, a long-lived TCP connection from a pod on node1 to one on node2; then node3 leaves
    and comes back `kills` times, node1's agent SIGKILLed at a random instant after each change and
    restarted. Converged means every pod reaches every other and a further restart changes nothing."""
    figures = AgentFaultFigures()
    agent = start_all(cluster, "vxlan")[0]
    first, second, third = cluster.nodes
    wait_for(lambda: all_pairs_reachable(cluster), 60, "pod<->pod across all nodes")
    connection = LongLivedConnection(first, second)
    try:
        for kill in range(kills):
            if kill % 2:
                cluster.register(third)
            else:
                cluster.core.delete_node(third.name)
            time.sleep(rng.uniform(0, 0.3))
            kill_agent(agent)
            figures.kills += 1
            if not figures.connections_dropped and not survives(connection, b"agent dead"):
                figures.connections_dropped = 1
            agent = cluster.agent(first, "vxlan")
            agent.wait_ready()
        if kills % 2:
            cluster.register(third)

        wait_for(lambda: all_pairs_reachable(cluster), 60, "convergence after the last restart")
        with NetlinkMonitor(first.ns) as monitor:
            kill_agent(agent)
            cluster.agent(first, "vxlan").wait_ready()
        figures.changes_on_a_further_restart = monitor.lines
        if not figures.connections_dropped and not survives(connection, b"after"):
            figures.connections_dropped = 1
    finally:
        connection.close()
    return figures


def test_agent_killed_in_the_middle_of_syncs_converges_on_restart_and_a_connection_survives(cluster):
    figures = agent_kill_rounds(cluster, 6, random.Random(7))

    assert figures.kills == 6
    assert figures.connections_dropped == 0
    assert figures.changes_on_a_further_restart == []


class ServiceConnection:
    """One TCP connection from a pod on one node through a ClusterIP to a pod on another."""

    def __init__(self, client_node, server_node, cluster_ip: str, service_port: int, pod_port: int) -> None:
        with netns.entered(netns.path(server_node.pod_ns)):
            self.listener = socket.create_server((server_node.pod_ip, pod_port))
        self.listener.settimeout(30)
        with netns.entered(netns.path(client_node.pod_ns)):
            self.client = socket.create_connection((cluster_ip, service_port), timeout=30)
        self.server, _ = self.listener.accept()
        self.server.settimeout(30)

    def survives(self, payload: bytes) -> bool:
        try:
            self.client.sendall(payload)
            self.server.sendall(self.server.recv(100))
            return self.client.recv(100) == payload
        except OSError:
            return False

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


def proxy_agent(cluster: Cluster, node) -> AgentProcess:
    """The node's agent with the iptables service proxy, as test_agent's Cluster.agent starts it otherwise."""
    agent = AgentProcess(node.ns, str(cluster.tmp_path / node.name), "--node-name", node.name,
                         "--kubeconfig", cluster.node_kubeconfig, "--network", "vxlan", "--proxy", "iptables",
                         "--min-sync-period", "0.2", "--healthz-bind", "", "--metrics-bind", "")
    cluster.agents.append(agent)
    return agent.start()


def proxy_in_sync(node, agent: AgentProcess) -> bool:
    shown = netns.run(node.ns, [sys.executable, "-m", "netagent.cli", "proxy", "show", "--state-dir",
                                agent.state_dir], check=False, timeout=60)
    return shown.returncode == 0


def nat_rules(node) -> str:
    """The node's iptables nat table without counters: what a restart must leave exactly as it was."""
    saved = ns_run(node.ns, "iptables-save", "-t", "nat").splitlines()
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in saved if not line.startswith("#"))


def start_all_with_proxy(cluster: Cluster) -> list[AgentProcess]:
    for node in cluster.nodes:
        cluster.register(node)
    started = [proxy_agent(cluster, node) for node in cluster.nodes]
    for agent in started:
        agent.wait_ready()
    return started


def echo_pod(core: client.CoreV1Api, node) -> None:
    """The Pod object of the node's test pod, ready, labelled app=echo, serving on ECHO_POD_PORT."""
    core.create_namespaced_pod("default", {
        "metadata": {"name": "echo", "labels": {"app": "echo"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "echo", "image": "none",
                                                        "ports": [{"containerPort": ECHO_POD_PORT}]}]},
        "status": {"phase": "Running", "podIP": node.pod_ip, "podIPs": [{"ip": node.pod_ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })


def echo_service(core: client.CoreV1Api, name: str, port: int) -> str:
    """A Service in front of the echo pod; returns its ClusterIP."""
    body = {"metadata": {"name": name},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": port, "targetPort": ECHO_POD_PORT}]}}
    return core.create_namespaced_service("default", body).spec.cluster_ip


def test_agent_killed_mid_sync_with_the_service_proxy_keeps_a_connection_through_a_cluster_ip(cluster):
    agent = start_all_with_proxy(cluster)[0]
    first, second, _ = cluster.nodes
    echo_pod(cluster.core, second)
    cluster_ip = echo_service(cluster.core, "echo", 80)
    wait_for(lambda: proxy_in_sync(first, agent) and cluster_ip in nat_rules(first), 60, "the service rules")
    connection = ServiceConnection(first, second, cluster_ip, 80, ECHO_POD_PORT)
    rng = random.Random(11)
    try:
        for kill in range(4):  # another service comes and goes: a sync is due when the kill lands
            if kill % 2:
                cluster.core.delete_namespaced_service("other", "default")
            else:
                echo_service(cluster.core, "other", 81)
            time.sleep(rng.uniform(0, 0.3))
            kill_agent(agent)
            assert connection.survives(b"agent dead")
            agent = proxy_agent(cluster, first)
            agent.wait_ready()
            assert connection.survives(b"agent back")

        wait_for(lambda: proxy_in_sync(first, agent), 60, "the rules to converge")
        converged = nat_rules(first)
        kill_agent(agent)
        proxy_agent(cluster, first).wait_ready()
        assert nat_rules(first) == converged  # a further restart rewrites nothing
        assert connection.survives(b"after")
    finally:
        connection.close()


# ------------------------------------------------------------------------ the API server away


class ApiServerProcess:
    """The lab API server as its own process (listening inside every node netns), so that stopping it
    is what an outage is: the process dies and every connection to it breaks."""

    def __init__(self, data_path: str, nodes: list, work_dir) -> None:
        self.argv = [sys.executable, "-m", "netns_lab.apiserver", "--data", data_path,
                     "--listen", "127.0.0.1:0"]
        for each in nodes:
            self.argv += ["--listen-netns", f"{each.ns}={API_ADDRESS}"]
        self.ready_file = str(work_dir / "apiserver.ready")
        self.log_path = str(work_dir / "apiserver.log")
        self.token_file = str(work_dir / "apiserver.token")  # the same token after a restart
        with open(self.token_file, "w") as f:
            f.write(apiserver.new_token())
        self.argv += ["--token-file", self.token_file]
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.credentials: apiserver.Credentials | None = None

    def start(self) -> ApiServerProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ready_file)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([*self.argv, "--ready-file", self.ready_file], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.ready_file) or self.proc.poll() is not None, 60, "API server")
        with open(self.ready_file) as f:
            ready = json.load(f)
        self.url, self.credentials = ready["url"], apiserver.Credentials.read(self.token_file, ready["ca"])
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def cluster_with_api_process(make_netns, prefix, tmp_path,
                             agents) -> Iterator[tuple[Cluster, ApiServerProcess]]:
    nodes = build_cluster(make_netns, prefix, NODE_IPS)
    server = ApiServerProcess(str(tmp_path / "api.json"), nodes, tmp_path).start()
    try:
        yield Cluster(nodes, server, tmp_path, agents), server
    finally:
        for agent in agents:
            agent.stop(signal.SIGKILL)
        server.kill()


def test_nodes_keep_forwarding_while_the_api_server_is_down_and_catch_up_when_it_returns(
        cluster_with_api_process):
    cluster, server = cluster_with_api_process
    agents_started = start_all_with_proxy(cluster)
    first, second, third = cluster.nodes
    echo_pod(cluster.core, second)
    cluster_ip = echo_service(cluster.core, "echo", 80)
    wait_for(lambda: all_pairs_reachable(cluster) and cluster_ip in nat_rules(first), 60, "pods and service")
    connection = LongLivedConnection(first, second)
    through_service = ServiceConnection(first, second, cluster_ip, 80, ECHO_POD_PORT)
    try:
        server.kill()
        deadline = time.monotonic() + 8  # long enough for every agent to notice and back off
        while time.monotonic() < deadline:
            assert all_pairs_reachable(cluster)
            assert connection.round_trip(b"api server down")
            assert through_service.survives(b"api server down")
            time.sleep(0.5)
        assert all(agent.proc.poll() is None for agent in agents_started)

        server.start()
        kubeconfig = str(cluster.tmp_path / "returned-kubeconfig")
        apiserver.write_kubeconfig(kubeconfig, server.url, server.credentials)
        core = client.CoreV1Api(load_api_client(kubeconfig))
        core.delete_node(third.name)  # changes made once it is back
        late_ip = echo_service(core, "late", 82)

        routes = lambda: ns_run(first.ns, "ip", "route", "show", "proto", "211")  # noqa: E731
        wait_for(lambda: third.pod_cidr not in routes(), 90, "node1 to apply node3's removal")
        wait_for(lambda: late_ip in nat_rules(first), 90, "node1 to program the new service")
        with netns.entered(netns.path(first.pod_ns)):
            socket.create_connection((late_ip, 82), timeout=10).close()
        assert reachable(first, second)
        assert connection.round_trip(b"api server back")
        assert through_service.survives(b"api server back")
    finally:
        connection.close()
        through_service.close()


# ------------------------------------------------------------------------ two agents, one node


def test_a_second_agent_on_a_node_refuses_naming_the_lock_and_the_first_keeps_forwarding(cluster):
    agents_started = start_all(cluster, "vxlan")
    first, second, _ = cluster.nodes
    wait_for(lambda: all_pairs_reachable(cluster), 60, "pod<->pod across all nodes")
    before = kernel_dump(first.ns)
    state_dir = agents_started[0].state_dir

    intruder = netns.run(first.ns, [sys.executable, "-m", "netagent.cli", "run", "--node-name", first.name,
                                    "--kubeconfig", cluster.node_kubeconfig, "--state-dir", state_dir,
                                    "--healthz-bind", "", "--metrics-bind", ""], check=False, timeout=60)

    assert intruder.returncode == 1
    lock = os.path.join(state_dir, "agent.lock")
    assert f"another netagent is already running on this node: {lock} is locked by pid" in intruder.stderr
    assert "Traceback" not in intruder.stderr
    assert agents_started[0].proc.poll() is None
    assert kernel_dump(first.ns) == before
    assert reachable(first, second)
