"""`netagent run` as a real process: the node lock, standalone mode, and the node controller against
the lab API server (reached through a kubeconfig and the official client), plus the informer and the
coalescing sync loop it is built on. Agents run inside node netns; traffic proves the result."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client
from test_node_network import (
    NetlinkMonitor,
    Node,
    build_cluster,
    kernel_dump,
    ns_run,
    reachable,
    udp_exchange,
)

from netagent.health import HealthServer, MetricsServer, SyncTracker
from netagent.kube import Informer, SyncLoop, load_api_client
from nodekit import netns, nodestate

apiserver = pytest.importorskip("netns_lab.apiserver.server")

NODE_IPS = ["192.168.77.1/24", "192.168.77.2/24", "192.168.77.3/24"]
API_ADDRESS = "127.0.0.1:6443"  # each node netns gets its own API listener on its own loopback
METRICS_URL = "http://127.0.0.1:10249/metrics"  # the agent's default --metrics-bind, inside its node netns


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll until condition() is truthy (generous timeout: the machine is shared and slow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class AgentProcess:
    """One `netagent run` inside a node netns, its output kept in a log file for failure reports."""

    def __init__(self, ns: str, state_dir: str, *args: str) -> None:
        self.ns = ns
        self.state_dir = state_dir
        self.log_path = os.path.join(state_dir + ".log")
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        argv = [sys.executable, "-m", "netagent.cli", "run", "--state-dir", self.state_dir, *self.args]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(netns.exec_argv(self.ns, argv), stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def ready_path(self) -> str:
        return os.path.join(self.state_dir, "ready")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Ready means THIS process wrote the marker: a SIGKILLed predecessor's marker names its pid."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                with open(self.ready_path) as f:
                    return f.read().strip() == str(self.proc.pid)
            except FileNotFoundError:
                return False

        try:
            wait_for(ready, timeout, f"agent in {self.ns} to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(signal.SIGKILL)


# ---------------------------------------------------------------- the node lock and standalone mode


def test_standalone_agent_writes_node_state_and_ready_and_removes_only_ready_on_sigterm(
        make_netns, tmp_path, agents):
    node = make_netns("node")
    state_dir = str(tmp_path / "state")
    agent = AgentProcess(node, state_dir, "--standalone", "--pod-cidr", "10.250.0.0/24",
                         "--pod-cidr", "fd00:250::/64", "--node-name", "solo").start()
    agents.append(agent)
    agent.wait_ready()

    state = nodestate.read(os.path.join(state_dir, "node.json"))
    assert state.node_name == "solo"
    assert state.pod_cidrs == ("10.250.0.0/24", "fd00:250::/64")
    assert agent.stop() == 0
    assert not os.path.exists(agent.ready_path)
    assert os.path.exists(os.path.join(state_dir, "node.json"))


def test_second_agent_on_the_same_node_refuses_naming_the_lock_file_and_the_holder(
        make_netns, tmp_path, agents):
    node = make_netns("node")
    state_dir = str(tmp_path / "state")
    first = AgentProcess(node, state_dir, "--standalone", "--pod-cidr", "10.250.0.0/24").start()
    agents.append(first)
    first.wait_ready()

    second = netns.run(node, [sys.executable, "-m", "netagent.cli", "run", "--standalone", "--pod-cidr",
                              "10.250.0.0/24", "--state-dir", state_dir, "--healthz-bind", "",
                              "--metrics-bind", ""], check=False, timeout=60)

    assert second.returncode != 0
    lock_path = os.path.join(state_dir, "agent.lock")
    assert f"{lock_path} is locked by pid {first.proc.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.proc.poll() is None  # the first agent keeps running


def test_agent_lock_is_free_again_after_the_holder_is_killed(make_netns, tmp_path, agents):
    node = make_netns("node")
    state_dir = str(tmp_path / "state")
    first = AgentProcess(node, state_dir, "--standalone", "--pod-cidr", "10.250.0.0/24").start()
    agents.append(first)
    first.wait_ready()
    first.stop(signal.SIGKILL)

    successor = AgentProcess(node, state_dir, "--standalone", "--pod-cidr", "10.250.0.0/24").start()
    agents.append(successor)
    successor.wait_ready()


def test_bad_flags_give_a_clear_error_without_traceback(make_netns, tmp_path):
    node = make_netns("node")
    result = netns.run(node, [sys.executable, "-m", "netagent.cli", "run", "--standalone", "--pod-cidr",
                              "10.250.0.1/24", "--state-dir", str(tmp_path)], check=False, timeout=60)
    assert result.returncode == 2
    assert "is not a network CIDR" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_kubeconfig_is_a_clear_error_and_leaves_no_ready_marker(make_netns, tmp_path):
    node = make_netns("node")
    result = netns.run(node, [sys.executable, "-m", "netagent.cli", "run", "--kubeconfig",
                              str(tmp_path / "nope"), "--state-dir", str(tmp_path / "state")],
                       check=False, timeout=60)
    assert result.returncode == 1
    assert f"cannot load API server config from {tmp_path / 'nope'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "ready").exists()


# ---------------------------------------------------------------- health and metrics endpoints


def http_get(ns: str, url: str) -> tuple[int, bytes]:
    with netns.entered(netns.path(ns)):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


def test_healthz_is_503_until_the_first_sync_then_200_until_a_change_waits_too_long(make_netns):
    from prometheus_client import CollectorRegistry

    node = make_netns("node")
    tracker = SyncTracker(CollectorRegistry(), timeout=0.5)
    tracker.expect("node")
    with netns.entered(netns.path(node)):
        server = HealthServer("127.0.0.1:0", tracker)
    server.start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        status, body = http_get(node, url)
        assert status == 503 and json.loads(body)["lastUpdated"] == ""

        tracker.synced("node", 0.01)
        status, body = http_get(node, url)
        assert status == 200 and set(json.loads(body)) >= {"lastUpdated", "currentTime"}

        tracker.changes_pending("node")
        wait_for(lambda: http_get(node, url)[0] == 503, 10, "a stuck change to turn healthz 503")
    finally:
        server.stop()


def test_metrics_count_syncs_per_controller(make_netns):
    from prometheus_client import CollectorRegistry

    node = make_netns("node")
    registry = CollectorRegistry()
    tracker = SyncTracker(registry)
    tracker.synced("node", 0.02)
    tracker.failed("node")
    with netns.entered(netns.path(node)):
        metrics = MetricsServer("127.0.0.1:0", registry)
        metrics.start()
    try:
        status, body = http_get(node, f"http://127.0.0.1:{metrics.port}/metrics")
        text = body.decode()
        assert status == 200
        assert 'netagent_sync_total{controller="node",result="ok"} 1.0' in text
        assert 'netagent_sync_total{controller="node",result="error"} 1.0' in text
        assert 'netagent_sync_duration_seconds_count{controller="node"} 1.0' in text
    finally:
        metrics.stop()


# ---------------------------------------------------------------- informer and sync loop


def node_body(name: str, pod_cidr: str | None = None, internal_ip: str | None = None) -> dict:
    body: dict = {"metadata": {"name": name}, "spec": {}}
    if pod_cidr:
        body["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    if internal_ip:
        body["status"] = {"addresses": [{"type": "InternalIP", "address": internal_ip}]}
    return body


def test_informer_lists_then_delivers_watch_events_in_order(core):
    core.create_node(node_body("a"))
    events: list[tuple[str, str]] = []
    informer = Informer("nodes", core.list_node)
    informer.add_handler(lambda kind, obj, old: events.append((kind, obj.metadata.name)))
    informer.start()
    try:
        assert informer.wait_for_sync(30)
        core.create_node(node_body("b"))
        core.patch_node("a", {"metadata": {"labels": {"x": "y"}}})
        core.delete_node("b")
        wait_for(lambda: len(events) >= 4, 30, "4 events")
        assert events == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        assert informer.store.keys() == ["a"]
        assert informer.store.get("a").metadata.labels == {"x": "y"}
    finally:
        informer.stop()


def test_an_informer_is_synced_only_once_its_handlers_have_seen_the_whole_list(core):
    """Consumers fed by events (the proxy's SnapshotBuilder) sync as soon as the informer says it is
    synced: a partly delivered list would look like deleted services and remove working rules."""
    for name in ("a", "b", "c"):
        core.create_node(node_body(name))
    seen: list[str] = []

    def slow_handler(kind: str, obj, old) -> None:
        time.sleep(0.2)
        seen.append(obj.metadata.name)

    informer = Informer("nodes", core.list_node)
    informer.add_handler(slow_handler)
    informer.start()
    try:
        assert informer.wait_for_sync(30)
        assert sorted(seen) == ["a", "b", "c"]
    finally:
        informer.stop()


def test_informer_relists_after_410_gone_and_synthesizes_the_missed_changes(core):
    """The watch is held back until more changes than the server's history window happened, so
    resuming from the old resourceVersion gets 410; the relist must deliver what was missed."""
    core.create_node(node_body("old"))
    watch_calls = 0
    second_watch_waiting, release = threading.Event(), threading.Event()

    @functools.wraps(core.list_node)
    def gated_list_node(**kwargs):
        nonlocal watch_calls
        if kwargs.get("watch"):
            watch_calls += 1
            if watch_calls == 2:
                second_watch_waiting.set()
                release.wait(30)
        return core.list_node(**kwargs)

    events: list[tuple[str, str]] = []
    informer = Informer("nodes", gated_list_node, watch_timeout=1)
    informer.add_handler(lambda kind, obj, old: events.append((kind, obj.metadata.name)))
    informer.start()
    try:
        assert second_watch_waiting.wait(30)
        core.delete_node("old")
        for i in range(8):  # history_size=5: the first watch's resourceVersion is now expired
            core.create_node(node_body(f"new{i}"))
        release.set()
        wait_for(lambda: informer.relists >= 2, 30, "a relist after 410")
        wait_for(lambda: len(informer.store.keys()) == 8, 30, "the store to catch up")
        assert ("DELETED", "old") in events
        assert sorted(informer.store.keys()) == [f"new{i}" for i in range(8)]
    finally:
        release.set()
        informer.stop()


def test_informer_periodic_resync_repairs_changes_its_watch_missed(core):
    """A watch that never delivers anything (it selects nothing) must still converge via resync."""
    core.create_node(node_body("listed"))

    @functools.wraps(core.list_node)
    def blind_watch(**kwargs):
        if kwargs.get("watch"):
            kwargs["label_selector"] = "matches=nothing"
        return core.list_node(**kwargs)

    events: list[tuple[str, str]] = []
    informer = Informer("nodes", blind_watch, resync_period=1.0)
    informer.add_handler(lambda kind, obj, old: events.append((kind, obj.metadata.name)))
    informer.start()
    try:
        assert informer.wait_for_sync(30)
        core.create_node(node_body("missed"))
        core.patch_node("listed", {"metadata": {"labels": {"changed": "yes"}}})
        wait_for(lambda: len(events) >= 3, 30, "resync to synthesize the missed events")
        assert events[0] == ("ADDED", "listed")
        assert sorted(events[1:]) == [("ADDED", "missed"), ("MODIFIED", "listed")]
    finally:
        informer.stop()


class ApiServerProcess:
    """The lab API server as its own process, so killing it drops every connection as a crash does."""

    def __init__(self, tmp_path, port: int = 0) -> None:
        self.tmp_path = tmp_path
        ready = tmp_path / "api-ready.json"
        ready.unlink(missing_ok=True)
        token_file = tmp_path / "api-token"  # kept across restarts, as clients keep their kubeconfig
        if not token_file.exists():
            token_file.write_text(apiserver.new_token())
        self.proc = subprocess.Popen([sys.executable, "-m", "netns_lab.apiserver", "--data",
                                      str(tmp_path / "api.json"), "--listen", f"127.0.0.1:{port}",
                                      "--ready-file", str(ready), "--token-file", str(token_file)],
                                     stderr=subprocess.DEVNULL)
        wait_for(ready.exists, 60, "the API server process to listen")
        info = json.loads(ready.read_text())
        self.url, self.credentials = info["url"], apiserver.Credentials.read(str(token_file), info["ca"])

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_informer_recovers_after_the_api_server_crashes_and_returns(tmp_path):
    server = ApiServerProcess(tmp_path)
    kubeconfig = str(tmp_path / "kubeconfig")
    apiserver.write_kubeconfig(kubeconfig, server.url, server.credentials)
    core = client.CoreV1Api(load_api_client(kubeconfig))
    core.create_node(node_body("before"))
    informer = Informer("nodes", core.list_node)
    informer.start()
    try:
        assert informer.wait_for_sync(30)
        server.kill()
        server = ApiServerProcess(tmp_path, server.port)
        core.create_node(node_body("after-restart"))
        wait_for(lambda: informer.store.get("after-restart"), 60, "the informer to see the new node")
        assert informer.store.get("before") is not None
    finally:
        informer.stop()
        server.kill()


def test_sync_loop_coalesces_a_burst_of_requests_into_few_runs():
    runs: list[float] = []
    loop = SyncLoop("test", lambda: runs.append(time.monotonic()), min_interval=0.5).start()
    try:
        for _ in range(1000):
            loop.request()
        wait_for(lambda: runs, 10, "a first run")
        loop.request()
        wait_for(lambda: len(runs) >= 2, 10, "a second run")
        assert len(runs) == 2  # 1001 requests, two runs
        assert runs[1] - runs[0] >= 0.5
    finally:
        loop.stop()


def test_sync_loop_retries_a_failed_sync():
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("kernel said no")

    loop = SyncLoop("test", flaky, min_interval=0.0)
    loop._backoff.initial = loop._backoff._next = 0.05
    loop.start()
    try:
        loop.request()
        wait_for(lambda: len(attempts) >= 3, 10, "three attempts")
    finally:
        loop.stop()


# ---------------------------------------------------------------- node controller decisions


def v1_node(pod_cidr: str = "10.244.1.0/24", labels: dict | None = None, ready: str = "True",
            annotations: dict | None = None) -> client.V1Node:
    return client.V1Node(
        metadata=client.V1ObjectMeta(name="n", labels=labels, annotations=annotations),
        spec=client.V1NodeSpec(pod_cidr=pod_cidr, pod_cidrs=[pod_cidr]),
        status=client.V1NodeStatus(addresses=[client.V1NodeAddress(type="InternalIP", address="192.0.2.1")],
                                   conditions=[client.V1NodeCondition(type="Ready", status=ready)]),
    )


def test_node_changes_that_do_not_affect_networking_do_not_trigger_a_sync():
    from netagent.node_controller import networking_view

    base = networking_view(v1_node())
    assert networking_view(v1_node(labels={"zone": "b"}, ready="False")) == base
    assert networking_view(v1_node(pod_cidr="10.244.9.0/24")) != base
    assert networking_view(v1_node(annotations={"netagent.io/vtep-mac": "0e:6e:00:00:00:01"})) != base


# ---------------------------------------------------------------- agents in a netns cluster


class Cluster:
    """Node netns on an underlay, the lab API server listening inside each, one agent per node."""

    def __init__(self, nodes: list[Node], server: apiserver.LabApiServer, tmp_path, agents: list) -> None:
        self.nodes = nodes
        self.server = server
        self.tmp_path = tmp_path
        self.agents = agents
        kubeconfig = str(tmp_path / "host-kubeconfig")
        apiserver.write_kubeconfig(kubeconfig, server.url, server.credentials)
        self.core = client.CoreV1Api(load_api_client(kubeconfig))
        self.node_kubeconfig = str(tmp_path / "node-kubeconfig")
        apiserver.write_kubeconfig(self.node_kubeconfig, f"https://{API_ADDRESS}", server.credentials)

    def register(self, node: Node) -> None:
        self.core.create_node(node_body(node.name, node.pod_cidr, node.node_ip))

    def agent(self, node: Node, network: str) -> AgentProcess:
        agent = AgentProcess(node.ns, str(self.tmp_path / node.name), "--node-name", node.name,
                             "--kubeconfig", self.node_kubeconfig, "--network", network,
                             "--min-sync-period", "0.2", "--healthz-bind", "127.0.0.1:10256",
                             "--gc-interval", "0")
        self.agents.append(agent)
        return agent.start()


@pytest.fixture
def cluster(make_netns, prefix, tmp_path, agents) -> Iterator[Cluster]:
    nodes = build_cluster(make_netns, prefix, NODE_IPS)
    server = apiserver.LabApiServer(str(tmp_path / "api.json"),
                                    netns_listen={n.ns: API_ADDRESS for n in nodes}).start()
    try:
        yield Cluster(nodes, server, tmp_path, agents)
    finally:
        for agent in agents:
            agent.stop(signal.SIGKILL)
        server.stop()


def start_all(cluster: Cluster, network: str) -> list[AgentProcess]:
    for node in cluster.nodes:
        cluster.register(node)
    started = [cluster.agent(node, network) for node in cluster.nodes]
    for agent in started:
        agent.wait_ready()
    return started


def all_pairs_reachable(cluster: Cluster) -> bool:
    return all(reachable(a, b) for a in cluster.nodes for b in cluster.nodes if a is not b)


@pytest.mark.parametrize("network", ["vxlan", "routes"])
def test_agents_connect_pods_across_nodes_over_tcp_and_udp(cluster, network):
    start_all(cluster, network)

    wait_for(lambda: all_pairs_reachable(cluster), 60, "pod<->pod across all nodes")
    first, second = cluster.nodes[0], cluster.nodes[2]
    assert udp_exchange(first.pod_ns, second.pod_ns, second.pod_ip) == b"HELLO OVER UDP"
    state = nodestate.read(str(cluster.tmp_path / first.name / "node.json"))
    assert state.pod_cidrs == (first.pod_cidr,)
    assert state.mtu == (1450 if network == "vxlan" else 1500)
    annotations = cluster.core.read_node(first.name).metadata.annotations
    assert annotations["netagent.io/node-ip"] == first.node_ip
    assert ("netagent.io/vtep-mac" in annotations) == (network == "vxlan")


def test_healthz_and_metrics_report_the_synced_node_controller(cluster):
    start_all(cluster, "vxlan")
    node = cluster.nodes[0]

    status, body = http_get(node.ns, "http://127.0.0.1:10256/healthz")
    assert status == 200
    assert json.loads(body)["lastUpdated"]
    # 2 other nodes x (fdb + neighbour + route), once both have published their VTEP MAC
    wait_for(lambda: "netagent_node_network_entries 6.0" in http_get(node.ns, METRICS_URL)[1].decode(), 60,
             "6 entries in /metrics")
    assert 'netagent_sync_total{controller="node",result="ok"}' in http_get(node.ns, METRICS_URL)[1].decode()


def test_deleting_a_node_removes_exactly_its_entries_on_the_others(cluster):
    start_all(cluster, "vxlan")
    wait_for(lambda: all_pairs_reachable(cluster), 60, "pod<->pod across all nodes")
    first, gone = cluster.nodes[0], cluster.nodes[2]
    routes = lambda: ns_run(first.ns, "ip", "route", "show", "proto", "211")  # noqa: E731

    cluster.core.delete_node(gone.name)

    wait_for(lambda: gone.pod_cidr not in routes(), 60, "node3's route to disappear on node1")
    assert cluster.nodes[1].pod_cidr in routes()
    assert "10.244.3.0" not in ns_run(first.ns, "ip", "neigh", "show", "dev", "netagent.1")
    assert reachable(first, cluster.nodes[1])


@pytest.mark.parametrize(("network", "stop_signal"), [("vxlan", signal.SIGKILL), ("routes", signal.SIGTERM)])
def test_a_long_lived_tcp_connection_survives_an_agent_restart_with_no_kernel_change(cluster, network,
                                                                                     stop_signal):
    agents = start_all(cluster, network)
    client_node, server_node = cluster.nodes[0], cluster.nodes[1]
    # every peer programmed first: a slow third agent publishing its VTEP late is not a restart's doing
    wait_for(lambda: all_pairs_reachable(cluster), 60, "pod<->pod between all nodes")
    connection = LongLivedConnection(client_node, server_node)
    try:
        assert connection.round_trip(b"before")
        before = kernel_dump(client_node.ns)

        with NetlinkMonitor(client_node.ns) as monitor:
            agents[0].stop(stop_signal)
            restarted = cluster.agent(client_node, network)
            restarted.wait_ready()
            assert connection.round_trip(b"during")

        assert monitor.lines == [], "\n".join(monitor.lines)
        assert kernel_dump(client_node.ns) == before
        assert connection.round_trip(b"after")
    finally:
        connection.close()


class LongLivedConnection:
    """One TCP connection from a pod on one node to an echo server in a pod on another."""

    def __init__(self, client_node: Node, server_node: Node, port: int = 5005) -> None:
        import socket

        with netns.entered(netns.path(server_node.pod_ns)):
            self.listener = socket.create_server((server_node.pod_ip, port))
        self.listener.settimeout(30)
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(self.listener.accept()[0]), daemon=True)
        thread.start()
        with netns.entered(netns.path(client_node.pod_ns)):
            self.client = socket.create_connection((server_node.pod_ip, port), timeout=30)
        thread.join(30)
        self.server = accepted[0]
        self.server.settimeout(30)

    def round_trip(self, payload: bytes) -> bool:
        self.client.sendall(payload)
        received = self.server.recv(100)
        self.server.sendall(received)
        return self.client.recv(100) == payload

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()


def test_routes_mode_agent_reports_a_node_on_another_segment_and_programs_the_rest(make_netns, prefix,
                                                                                  tmp_path, agents):
    nodes = build_cluster(make_netns, prefix, ["192.168.77.1/24", "192.168.77.2/24", "192.168.88.3/24"])
    server = apiserver.LabApiServer(str(tmp_path / "api.json"),
                                    netns_listen={n.ns: API_ADDRESS for n in nodes}).start()
    try:
        cluster = Cluster(nodes, server, tmp_path, agents)
        for node in nodes:
            cluster.register(node)
        first, second = cluster.agent(nodes[0], "routes"), cluster.agent(nodes[1], "routes")
        first.wait_ready()
        second.wait_ready()

        wait_for(lambda: reachable(nodes[0], nodes[1]) or None, 60, "node1 pod -> node2 pod")
        wait_for(lambda: "cannot program node node3" in first.log(), 30, "the per-node error")
        assert "192.168.88.3" in first.log()
        assert "10.244.3.0/24" not in ns_run(nodes[0].ns, "ip", "route", "show")
    finally:
        for agent in agents:
            agent.stop(signal.SIGKILL)
        server.stop()

