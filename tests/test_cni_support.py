"""Helpers for the CNI tests (no tests here): run the plugin inside a "node" netns the way a runtime
would, either exec'd (the Python fallback) or through the compiled shim to a CniService that runs
inside the node netns, and move real traffic between pod namespaces."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cni.install import build_shim
from nodekit import netns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK_PLUGIN = os.path.join(os.path.dirname(sys.executable), "netagent-cni")
REFERENCE_PLUGINS = "/usr/lib/cni"
SERVICE_HARNESS = (
    "import json, sys, threading\n"
    "from prometheus_client import CollectorRegistry\n"
    "from netagent.cni_service import CniService\n"
    "from netagent.health import HealthServer, MetricsServer, SyncTracker\n"
    "service = CniService(sys.argv[1], **json.loads(sys.argv[2]))\n"
    "service.start()\n"
    "registry = CollectorRegistry()\n"
    "tracker = SyncTracker(registry)\n"
    "tracker.watch_cni_service(service)\n"
    "health, metrics = HealthServer('127.0.0.1:0', tracker), MetricsServer('127.0.0.1:0', registry)\n"
    "health.start()\n"
    "metrics.start()\n"
    "print('ready', health.port, metrics.port, flush=True)\n"
    "threading.Event().wait()\n"
)


@dataclass
class Outcome:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def result(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@dataclass
class CniNode:
    """A node netns with an IPAM data dir and a way to invoke the plugin in it."""

    name: str
    data_dir: str
    plugin: list[str]

    def conf(self, subnets: list[str] | None = None, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
        ipam: dict[str, Any] = {"dataDir": self.data_dir}
        if subnets is not None:
            ipam["subnets"] = subnets
        ipam.update(extra.pop("ipam", {}))
        return {"cniVersion": version, "name": "testnet", "type": "netagent", "ipam": ipam, **extra}

    def call(
        self,
        command: str,
        conf: dict[str, Any] | bytes,
        container_id: str = "",
        pod: str = "",
        ifname: str = "eth0",
        plugin: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> Outcome:
        full_env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": REFERENCE_PLUGINS}
        if container_id:
            full_env.update(CNI_CONTAINERID=container_id, CNI_IFNAME=ifname)
        if pod:
            full_env["CNI_NETNS"] = netns.path(pod)
        full_env.update(env or {})
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        done = subprocess.run(
            netns.exec_argv(self.name, plugin or self.plugin),
            input=stdin,
            env=full_env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return Outcome(done.returncode, done.stdout, done.stderr)

    def add(self, conf: dict[str, Any], container_id: str, pod: str, ifname: str = "eth0") -> dict[str, Any]:
        outcome = self.call("ADD", conf, container_id, pod, ifname)
        assert outcome.code == 0, outcome
        return outcome.result

    def links(self) -> list[str]:
        done = netns.run(self.name, ["ip", "-o", "link", "show"], check=False)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def allocations(self, network: str = "testnet") -> dict[str, str]:
        """address -> file content, for every allocation file of `network`."""
        directory = os.path.join(self.data_dir, network)
        if not os.path.isdir(directory):
            return {}
        found = {}
        for name in os.listdir(directory):
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(name)  # allocation files are named by their address
                with open(os.path.join(directory, name)) as f:
                    found[name] = f.read()
        return found


def make_node(make_netns, tmp_path, plugin: list[str] | None = None) -> CniNode:
    data_dir = os.path.join(str(tmp_path), "ipam")
    return CniNode(make_netns("node"), data_dir, plugin or [FALLBACK_PLUGIN])


@dataclass
class RunningService:
    """A CniService process in a node netns, with the agent's /healthz and /metrics watching it."""

    process: subprocess.Popen
    node: str
    healthz_port: int
    metrics_port: int

    def healthz(self) -> tuple[int, dict[str, Any]]:
        status, body = self._get(self.healthz_port, "/healthz")
        return status, json.loads(body)

    def metrics(self) -> str:
        return self._get(self.metrics_port, "/metrics")[1].decode()

    def _get(self, port: int, path: str) -> tuple[int, bytes]:
        with netns.entered(netns.path(self.node)):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()


@contextlib.contextmanager
def running_service(
    node: str, socket_path: str, cwd: str = REPO, **options: float
) -> Iterator[RunningService]:
    """A CniService(socket_path, **options) in its own process inside the node netns (as the agent
    would run it), with `cwd` as its working directory."""
    proc = subprocess.Popen(
        netns.exec_argv(node, [sys.executable, "-c", SERVICE_HARNESS, socket_path, json.dumps(options)]),
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, healthz_port, metrics_port = proc.stdout.readline().split()
        assert ready == "ready"
        yield RunningService(proc, node, int(healthz_port), int(metrics_port))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def node_on_path(path: str, make_netns, tmp_path) -> Iterator[CniNode]:
    """A CNI node whose plugin is called as `path` says: "exec" (the Python plugin, as with no agent)
    or "shim" (the compiled shim handing calls to a running CNI service, as with the agent)."""
    cni_node = make_node(make_netns, tmp_path)
    if path == "exec":
        yield cni_node
        return
    socket_path = os.path.join(str(tmp_path), "state", "cni.sock")
    cni_node.plugin = [compile_shim(str(tmp_path), socket_path)]
    with running_service(cni_node.name, socket_path):
        yield cni_node


def compile_shim(directory: str, socket_path: str) -> str:
    shim = os.path.join(directory, "netagent")
    assert build_shim(shim, socket_path, FALLBACK_PLUGIN), "no C compiler"
    return shim


def ping(from_ns: str, address: str) -> bool:
    argv = ["ping", "-c", "1", "-W", "3", address]
    # a few tries: the first packet may wait on neighbour resolution on a loaded machine
    return any(netns.run(from_ns, argv, check=False).returncode == 0 for _ in range(3))


def tcp_reaches(
    client_ns: str, server_ns: str, address: str, port: int = 8080, listen: tuple[str, int] | None = None
) -> bool:
    """A TCP connection from client_ns to address:port carries data both ways.

    The server runs in server_ns on `listen` (default: the same address and port; differs when the
    path is DNAT'ed, as with hostPort).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.entered(netns.path(server_ns)):
        server = socket.socket(family, socket.SOCK_STREAM)
    with netns.entered(netns.path(client_ns)):
        client = socket.socket(family, socket.SOCK_STREAM)
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(listen or (address, port))
        server.listen(1)
        server.settimeout(10)
        client.settimeout(10)
        echo = threading.Thread(target=_echo_once, args=(server,), daemon=True)
        echo.start()
        try:
            client.connect((address, port))
            client.sendall(b"hello")
            return client.recv(16) == b"hello"
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the echo thread if nobody connected
            echo.join(timeout=10)


def _echo_once(server: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(conn.recv(16))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
