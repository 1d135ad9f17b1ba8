"""Garbage collection of leaked CNI state, in a real node netns: the plugin exec'd as a runtime execs
it, the lab API server saying which pods run on the node, `netagent gc` and the agent's collector
comparing the two. Live pods are proven alive by TCP after every collection."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import test_containerd
import test_lab
from kubernetes import client
from netns_lab import probe
from netns_lab.containerd.networks import install_netagent
from netns_lab.containerd.node import ContainerdNode
from netns_lab.responder import DEFAULT_PORT as RESPONDER_PORT
from netns_lab.state import Lab
from test_agent import wait_for

from cni.links import host_veth_name
from netagent.kube import load_api_client
from nodekit import netns, nodestate

apiserver = pytest.importorskip("netns_lab.apiserver.server")

NODE_NAME = "n1"
NETWORK = "netagent"
SUBNET = "10.244.1.0/24"
API_ADDRESS = "127.0.0.1:6443"  # the node netns' own loopback
ECHO_PORT = 7007
PLUGIN = os.path.join(os.path.dirname(sys.executable), "netagent-cni")
needs_containerd = test_containerd.pytestmark


@dataclass
class Pod:
    name: str
    netns: str
    container_id: str
    ip: str = ""


class EchoServer:
    """A TCP echo service inside a pod netns: the pod's workload, proof that it still has its network."""

    def __init__(self, pod: Pod) -> None:
        with netns.entered(netns.path(pod.netns)):
            self.listener = socket.create_server(("0.0.0.0", ECHO_PORT))
        self.listener.settimeout(0.5)
        self.stopping = threading.Event()
        self.connections: list[socket.socket] = []  # no idle timeout: long-lived ones must stay up
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class Node:
    """A node netns with the plugin config, an IPAM dir, a state dir and the API server listening inside."""

    def __init__(self, ns: str, tmp_path, server: apiserver.LabApiServer) -> None:
        self.ns = ns
        self.server = server
        self.data_dir = str(tmp_path / "ipam")
        self.state_dir = str(tmp_path / "state")
        self.kubeconfig = str(tmp_path / "node-kubeconfig")
        apiserver.write_kubeconfig(self.kubeconfig, f"https://{API_ADDRESS}", server.credentials)
        host_kubeconfig = str(tmp_path / "host-kubeconfig")
        apiserver.write_kubeconfig(host_kubeconfig, server.url, server.credentials)
        self.core = client.CoreV1Api(load_api_client(host_kubeconfig))
        self.conf = {"cniVersion": "1.1.0", "name": NETWORK, "type": "netagent", "bridge": "na0",
                     "ipam": {"subnet": SUBNET, "dataDir": self.data_dir}}
        self.pods: list[Pod] = []
        self.echoes: list[EchoServer] = []

    # ---- the runtime's side: exec the plugin

    def plugin_argv(self) -> list[str]:
        return netns.exec_argv(self.ns, [PLUGIN])

    def plugin_env(self, command: str, pod: Pod) -> dict[str, str]:
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": pod.container_id,
                "CNI_NETNS": netns.path(pod.netns), "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
                "PATH": os.environ["PATH"]}

    def cni(self, command: str, pod: Pod) -> dict:
        done = subprocess.run(self.plugin_argv(), input=json.dumps(self.conf).encode(),
                              env=self.plugin_env(command, pod), capture_output=True, timeout=120)
        assert done.returncode == 0, f"CNI {command} failed: {done.stdout!r} {done.stderr!r}"
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def new_pod(self, name: str) -> Pod:
        """A pod netns, not yet attached (what the runtime has right before ADD)."""
        pod = Pod(name, f"{self.ns}-{name}", f"{name}-{os.urandom(8).hex()}")
        netns.create(pod.netns)
        self.pods.append(pod)
        return pod

    def run_pod(self, name: str, phase: str = "Running") -> Pod:
        """ADD, an echo server inside, and the Pod object with its IP: a running pod of this node."""
        pod = self.new_pod(name)
        pod.ip = self.cni("ADD", pod)["ips"][0]["address"].split("/")[0]
        self.echoes.append(EchoServer(pod))
        self.core.create_namespaced_pod("default", {
            "metadata": {"name": name},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "echo", "image": "none"}]},
            "status": {"phase": phase, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
        })
        return pod

    def vanish(self, pod: Pod) -> None:
        """The runtime crashed and lost the pod: its Pod object goes, no DEL ever runs, and its netns
        is leaked with its attachment (removed only at the end of the test)."""
        self.core.delete_namespaced_pod(pod.name, "default")

    # ---- what the node holds

    def allocations(self) -> dict[str, str]:
        """address -> container id, read straight from the IPAM directory."""
        directory = os.path.join(self.data_dir, NETWORK)
        found = {}
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name[0].isdigit():
                with open(os.path.join(directory, name)) as f:
                    found[name] = f.read().split("\n")[0]
        return found

    def leftovers(self, live: list[Pod]) -> list[str]:
        """Allocations and host veths that none of the `live` pods explains."""
        ips, veths = {pod.ip for pod in live}, {veth_of(pod) for pod in live}
        return ([f"allocation {ip}" for ip in self.allocations() if ip not in ips]
                + [f"veth {name}" for name in self.veths() if name not in veths])

    def veths(self) -> set[str]:
        out = netns.run(self.ns, ["ip", "-o", "link", "show", "type", "veth"]).stdout
        return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}

    def answers(self, pod: Pod) -> bool:
        """A fresh TCP connection from the node to the pod's echo server gets its bytes back."""
        try:
            with netns.entered(netns.path(self.ns)):
                conn = socket.create_connection((pod.ip, ECHO_PORT), timeout=10)
            with conn:
                conn.sendall(b"ping")
                return conn.recv(16) == b"ping"
        except OSError:
            return False

    # ---- `netagent gc` by hand, inside the node netns

    def gc(self, *args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "netagent.cli", "gc", "--state-dir", self.state_dir, "--kubeconfig",
                self.kubeconfig, "--node-name", NODE_NAME, "--data-dir", self.data_dir, *args]
        return netns.run(self.ns, argv, check=False, timeout=120)

    def close(self) -> None:
        for echo in self.echoes:
            echo.close()
        for pod in self.pods:
            netns.delete(pod.netns)


@pytest.fixture
def node(make_netns, tmp_path) -> Iterator[Node]:
    ns = make_netns("node")
    server = apiserver.LabApiServer(str(tmp_path / "api.json"), netns_listen={ns: API_ADDRESS}).start()
    node = Node(ns, tmp_path, server)
    try:
        yield node
    finally:
        node.close()
        server.stop()


def veth_of(pod: Pod) -> str:
    return host_veth_name(pod.container_id, "eth0")


# ------------------------------------------------------------------------------ netagent gc by hand


def test_gc_releases_the_ip_and_veth_of_a_vanished_pod_and_live_pods_keep_theirs(node):
    live = node.run_pod("live")
    gone = node.run_pod("gone")
    node.vanish(gone)

    done = node.gc("--grace", "0")

    assert done.returncode == 0, done.stderr
    assert f"released allocation {gone.ip} (container {gone.container_id} eth0): no live pod" in done.stdout
    assert f"released veth {veth_of(gone)}" in done.stdout
    assert node.allocations() == {live.ip: live.container_id}
    assert node.veths() == {veth_of(live)}
    assert node.answers(live)
    assert "released 1 allocations and 1 veths" in done.stdout  # the totals line


def test_conntrack_entries_of_a_released_address_are_forgotten_and_those_of_a_live_pod_kept(node):
    live = node.run_pod("live")
    gone = node.run_pod("gone")
    node.vanish(gone)
    for pod in (live, gone):
        netns.run(node.ns, ["conntrack", "-I", "-p", "udp", "-s", pod.ip, "-d", "10.244.1.1",
                            "--sport", "5353", "--dport", "53", "--timeout", "300"])

    node.gc("--grace", "0")

    flows = netns.run(node.ns, ["conntrack", "-L", "-p", "udp"]).stdout
    assert f"src={live.ip} " in flows
    assert f"src={gone.ip} " not in flows


def test_a_finished_pods_ip_is_collected_though_its_pod_object_remains(node):
    node.run_pod("live")
    finished = node.run_pod("job", phase="Succeeded")  # a Job's pod: its sandbox is gone, the object stays

    done = node.gc("--grace", "0")

    assert f"released allocation {finished.ip}" in done.stdout
    assert finished.ip not in node.allocations()


def test_dry_run_prints_what_would_go_and_changes_nothing(node):
    live = node.run_pod("live")
    gone = node.run_pod("gone")
    node.vanish(gone)

    done = node.gc("--grace", "0", "--dry-run")

    assert done.returncode == 0, done.stderr
    assert f"would release allocation {gone.ip}" in done.stdout
    assert f"would release veth {veth_of(gone)}" in done.stdout
    assert set(node.allocations()) == {live.ip, gone.ip}
    assert "no GC pass yet" in done.stdout  # a dry run counts nothing


def test_an_attachment_younger_than_the_grace_period_is_kept(node):
    creating = node.new_pod("creating")  # ADD done, the API server does not know its IP yet
    node.cni("ADD", creating)

    done = node.gc("--grace", "300")

    assert done.returncode == 0, done.stderr
    assert "released 0; kept 1 inside the 300s grace period" in done.stdout
    assert len(node.allocations()) == 1 and veth_of(creating) in node.veths()


def test_a_veth_without_allocation_goes_only_after_being_seen_orphaned_for_the_grace_period(node):
    pod = node.new_pod("leftover")
    ip = node.cni("ADD", pod)["ips"][0]["address"].split("/")[0]
    os.unlink(os.path.join(node.data_dir, NETWORK, ip))  # only the veth is left of it

    first = node.gc("--grace", "1")
    assert "kept 1 inside" in first.stdout and veth_of(pod) in node.veths()
    time.sleep(1.2)
    second = node.gc("--grace", "1")

    assert f"released veth {veth_of(pod)} (no allocation): veth without an allocation" in second.stdout
    assert node.veths() == set()


def test_a_veth_left_without_its_network_label_by_a_killed_add_still_goes_with_its_allocation(node):
    pod = node.new_pod("killed")
    node.cni("ADD", pod)
    netns.run(node.ns, ["ip", "link", "set", veth_of(pod), "alias", ""])  # as if killed before labelling

    done = node.gc("--grace", "0")

    assert f"released veth {veth_of(pod)} (container {pod.container_id} eth0)" in done.stdout
    assert node.veths() == set()


def test_veths_are_kept_while_a_live_pod_has_no_allocation_as_after_a_wiped_ipam_dir(node):
    live = node.run_pod("live")
    os.unlink(os.path.join(node.data_dir, NETWORK, live.ip))  # IPAM dir wiped under a live pod

    node.gc("--grace", "0")
    done = node.gc("--grace", "0")  # seen orphaned long enough, yet still not collected

    assert "1 veths while live pods lack an allocation" in done.stdout
    assert node.veths() == {veth_of(live)}
    assert node.answers(live)


def test_addresses_outside_the_pod_cidrs_of_the_node_are_not_its_to_collect(node):
    gone = node.run_pod("gone")
    node.vanish(gone)
    nodestate.write(nodestate.NodeState(NODE_NAME, ("10.244.9.0/24",), 1500),
                    os.path.join(node.state_dir, "node.json"))

    done = node.gc("--grace", "0")

    assert "released 0; kept 0 inside the 0s grace period, 0 live in the runtime, 1 outside" in done.stdout
    assert gone.ip in node.allocations()


def test_an_unreachable_api_server_means_nothing_is_released_and_a_clear_error(node):
    gone = node.run_pod("gone")
    node.vanish(gone)
    node.server.stop()

    done = node.gc("--grace", "0")

    assert done.returncode == 1
    assert f"GC pass on node {NODE_NAME} failed, nothing released" in done.stderr
    assert "Traceback" not in done.stderr
    assert gone.ip in node.allocations()


def test_the_cni_gc_verb_runs_the_same_sweep_and_keeps_the_valid_attachments(node):
    keep = node.run_pod("keep")
    drop = node.new_pod("drop")
    node.cni("ADD", drop)
    conf = {**node.conf, "cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]}

    done = subprocess.run(node.plugin_argv(), input=json.dumps(conf).encode(), capture_output=True,
                          env={"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni", "PATH": os.environ["PATH"]})

    assert done.returncode == 0, done.stdout
    assert node.allocations() == {keep.ip: keep.container_id}
    assert node.veths() == {veth_of(keep)}
    assert node.answers(keep)


# ------------------------------------------------------------------------------ a runtime's sandboxes

busybox_image = test_containerd.busybox_image  # a fixture, shared as it is


@pytest.fixture
def containerd(node, busybox_image) -> Iterator[ContainerdNode]:
    """containerd confined to the node, its CNI being netagent's installed conflist (same IPAM dir)."""
    with ContainerdNode(node.ns) as runtime:
        runtime.import_image(busybox_image.path)
        install_netagent(runtime.bin_dir, runtime.conf_dir, node.state_dir, node.data_dir, SUBNET)
        node_state = nodestate.NodeState(NODE_NAME, (SUBNET,), 1500)
        nodestate.write(node_state, os.path.join(node.state_dir, "node.json"))
        yield runtime


@needs_containerd
def test_an_attachment_whose_sandbox_the_runtime_still_has_is_kept_even_without_a_pod_object(
        node, containerd, busybox_image):
    sandbox = containerd.run_pod(busybox_image.ref, "web", ["sleep", "600"])
    [sandbox_ip] = [address.split("/")[0] for address in sandbox.ipv4_addresses()]
    ghost = node.new_pod("ghost")  # a leaked attachment containerd knows nothing about
    ghost_ip = node.cni("ADD", ghost)["ips"][0]["address"].split("/")[0]

    without_runtime = node.gc("--grace", "0", "--dry-run")
    with_runtime = node.gc("--grace", "0", "--containerd-socket", containerd.socket)

    assert f"would release allocation {sandbox_ip}" in without_runtime.stdout  # no Pod object says it lives
    assert with_runtime.returncode == 0, with_runtime.stderr
    assert f"released allocation {ghost_ip}" in with_runtime.stdout
    assert "1 live in the runtime" in with_runtime.stdout
    assert set(node.allocations()) == {sandbox_ip}
    assert sandbox.ipv4_addresses() == [f"{sandbox_ip}/24"]
    containerd.remove_pod(sandbox)  # its CNI DEL releases the rest
    assert node.allocations() == {}


def test_an_unreachable_runtime_means_nothing_is_released(node):
    gone = node.run_pod("gone")
    node.vanish(gone)

    done = node.gc("--grace", "0", "--containerd-socket", "/nonexistent/containerd.sock")

    assert done.returncode == 1
    assert "cannot ask containerd at /nonexistent/containerd.sock for its sandboxes" in done.stderr
    assert gone.ip in node.allocations()


# ------------------------------------------------------------------------------ the agent's collector


class Agent:
    """`netagent run` in the node netns with a fast GC cadence; SIGKILLed at the end of the test."""

    def __init__(self, node: Node, *args: str) -> None:
        self.log_path = node.state_dir + ".log"
        argv = [sys.executable, "-m", "netagent.cli", "run", "--node-name", NODE_NAME,
                "--kubeconfig", node.kubeconfig, "--state-dir", node.state_dir,
                "--cni-data-dir", node.data_dir, "--network", "none", "--underlay-iface", "lo",
                "--healthz-bind", "", "--metrics-bind", "", *args]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(netns.exec_argv(node.ns, argv), stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def agent_on(node) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(*args: str) -> Agent:
        started.append(Agent(node, *args))
        return started[-1]

    yield start
    for agent in started:
        agent.kill()


def released(node: Node, kind: str) -> int:
    """How many allocations or veths the agent's collector has counted in gc.json."""
    try:
        with open(os.path.join(node.state_dir, "gc.json")) as f:
            return sum(json.load(f)["released"].get(kind, {}).values())
    except (OSError, ValueError, KeyError):
        return 0


def test_agent_collects_at_start_and_every_interval_logs_why_and_keeps_totals(node, agent_on):
    node.core.create_node({"metadata": {"name": NODE_NAME}, "spec": {"podCIDR": SUBNET}})
    live = node.run_pod("live")
    leaked_before = node.run_pod("before")
    node.vanish(leaked_before)

    agent = agent_on("--gc-interval", "1", "--gc-grace", "0.5")
    wait_for(lambda: released(node, "allocation") == 1, 60, "the pass at start")
    leaked_later = node.run_pod("later")
    node.vanish(leaked_later)
    wait_for(lambda: released(node, "veth") == 2, 60, "a later periodic pass")

    assert set(node.allocations()) == {live.ip}
    assert node.veths() == {veth_of(live)}
    assert node.answers(live)
    why = f"released allocation {leaked_later.ip} (attachment {leaked_later.container_id}/eth0): no live pod"
    assert why in agent.log()
    shown = node.gc("--dry-run")
    assert "released 2 allocations and 2 veths (4 no live pod on this node has its IP)" in shown.stdout


# ------------------------------------------------------------------------------ in the lab

lab_name = test_lab.lab_name  # a fixture, shared as it is


def test_in_the_lab_a_pod_lost_by_its_runtime_is_collected_and_lab_status_shows_it(lab_name):
    test_lab.lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    test_lab.lab_cmd(lab_name, "pod", "keep", "--node", "n1")
    test_lab.lab_cmd(lab_name, "pod", "lost", "--node", "n1")
    lab = Lab(lab_name)
    state = lab.load()
    n1, keep, lost = state.nodes["n1"], state.pods["keep"], state.pods["lost"]
    client.CoreV1Api(load_api_client(lab.kubeconfig)).delete_namespaced_pod("lost", "default")  # no DEL

    done = netns.run(n1.netns, [sys.executable, "-m", "netagent.cli", "gc", "--grace", "0", "--state-dir",
                                n1.state_dir, "--kubeconfig", n1.kubeconfig, "--data-dir", n1.ipam_dir],
                     check=False, timeout=120)

    assert done.returncode == 0, done.stderr
    assert f"released allocation {lost.ips[0]}" in done.stdout
    assert probe.tcp_name(n1.netns, keep.ips[0], RESPONDER_PORT) == "keep"
    status = test_lab.lab_cmd(lab_name, "status").stdout
    assert "released 1 allocations and 1 veths (2 no live pod on this node has its IP)" in status
