"""The ebpf proxy (socket-LB for ClusterIPs) moving real traffic.

A "node" netns with a bridge (10.244.0.1/24) holds three pod netns running the shared pod server
(answers with its pod name) and a "client" pod netns. The programs attach to a cgroup v2 made for the
test under /sys/fs/cgroup/unified; client processes are started inside it (a shell writes its pid to
cgroup.procs, then execs the client in the client pod's netns). The node netns itself also answers on
the ClusterIP (the address is on its loopback, server name "node"): a socket the programs did NOT
rewrite ends up there, which makes "not load balanced" visible instead of a mere timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_proxy_dataplane import PODS, SERVER, endpoint, endpoint_slice, eventually, service, tcp_ask

from netagent.proxy.backend import NodeContext, SyncError
from netagent.proxy.ebpf import MAPS, EbpfBackend, cgroup_id, program_version
from netagent.proxy.inspection import compare
from netagent.proxy.service import Snapshot
from netagent.proxy.snapshot_builder import build_snapshot
from nodekit import netns
from nodekit.bpf import link_info

VIP, GATEWAY, CLIENT_IP = "10.96.0.10", "10.244.0.1", "10.244.0.20"
TCP_PORT, UDP_PORT = 8080, 5353  # service port == the pods' port, so the node's own server answers too
CGROUP_ROOT = "/sys/fs/cgroup/unified"

# Runs in the client pod. tcp N: N fresh connections, one "<pod> <getpeername ip>:<port>" (or
# "refused <errno>") per line.
# udp N: N requests from one unconnected socket, "<pod> <reply source ip> <reply source port>" each.
# hold: one connection, prints its greeting, then echoes each stdin line through it.
CLIENT = r"""
import socket, sys
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "tcp":
    for _ in range(int(sys.argv[4])):
        try:
            with socket.create_connection((ip, port), timeout=5) as s:
                print(s.makefile().readline().split()[0], "%s:%d" % s.getpeername(), flush=True)
        except OSError as err:
            print("refused", err.errno, flush=True)
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    for _ in range(int(sys.argv[4])):
        s.sendto(b"?", (ip, port))
        data, source = s.recvfrom(2048)
        print(data.decode().split()[0], source[0], source[1], flush=True)
else:
    s = socket.create_connection((ip, port), timeout=5)
    f = s.makefile("rw")
    print(f.readline().split()[0], flush=True)
    for line in sys.stdin:
        f.write(line)
        f.flush()
        print(f.readline().strip(), flush=True)
"""


@dataclass
class Node:
    name: str
    cgroup: str
    client_ns: str
    backend: EbpfBackend

    def program(self, slices: list[dict]) -> Snapshot:
        snapshot = build_snapshot([web()], slices, self.name)
        self.backend.sync(snapshot.ports)
        return snapshot

    def client_argv(self, *args: object, in_cgroup: bool = True) -> list[str]:
        argv = netns.exec_argv(self.client_ns, [sys.executable, "-c", CLIENT, *map(str, args)])
        if not in_cgroup:
            return argv
        enter = 'echo $$ > "$0/cgroup.procs" && exec "$@"'  # move this shell, then become the client
        return ["sh", "-c", enter, self.cgroup, *argv]

    def ask(self, *args: object, in_cgroup: bool = True) -> list[str]:
        out = subprocess.run(self.client_argv(*args, in_cgroup=in_cgroup), capture_output=True, text=True,
                             timeout=120, check=True)
        return out.stdout.splitlines()

    def pods_reached(self, tries: int = 40, in_cgroup: bool = True) -> set[str]:
        return {line.split()[0] for line in self.ask("tcp", VIP, TCP_PORT, tries, in_cgroup=in_cgroup)}


def web() -> dict:
    return service(ports=(("http", TCP_PORT, "TCP", 0), ("dns", UDP_PORT, "UDP", 0)))


def slices_for(*pods: str) -> list[dict]:
    return [
        endpoint_slice("web", [endpoint(p) for p in pods], port=TCP_PORT, port_name="http", name="web-tcp"),
        endpoint_slice("web", [endpoint(p) for p in pods], port=UDP_PORT, port_name="dns", protocol="UDP",
                       name="web-udp"),
    ]


def _ip(ns: str, *args: str) -> None:
    netns.run(ns, ["ip", *args])


@pytest.fixture
def cgroup(prefix: str) -> Iterator[str]:
    """A cgroup v2 for this test only; removed after its processes are gone."""
    path = os.path.join(CGROUP_ROOT, prefix)
    os.mkdir(path)
    yield path
    deadline = time.monotonic() + 10
    while True:  # a killed client leaves the cgroup a moment after it is reaped
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def node(prefix: str, cgroup: str, make_netns: Callable[[str], str]) -> Iterator[Node]:
    node_ns, client_ns = make_netns("node"), make_netns("client")
    _ip(node_ns, "link", "add", "br0", "type", "bridge")
    _ip(node_ns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
    _ip(node_ns, "link", "set", "br0", "up")
    _ip(node_ns, "addr", "add", f"{VIP}/32", "dev", "lo")  # the literal ClusterIP answers as "node"
    servers = [subprocess.Popen(netns.exec_argv(node_ns, [sys.executable, "-c", SERVER, "node"]))]
    for pod, ip in {**PODS, "client": CLIENT_IP}.items():
        pod_ns = client_ns if pod == "client" else make_netns(pod)
        _ip(node_ns, "link", "add", f"v{pod}", "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        _ip(node_ns, "link", "set", f"v{pod}", "master", "br0", "up")
        _ip(pod_ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip(pod_ns, "link", "set", "eth0", "up")
        _ip(pod_ns, "route", "add", "default", "via", GATEWAY)
        if pod != "client":
            servers.append(subprocess.Popen(netns.exec_argv(pod_ns, [sys.executable, "-c", SERVER, pod])))
    backend = EbpfBackend(NodeContext(f"{prefix}-node"), cgroup=cgroup)
    try:
        for ip in (*PODS.values(), VIP):
            eventually(lambda ip=ip: tcp_ask(client_ns, ip, TCP_PORT, timeout=1))
        yield Node(f"{prefix}-node", cgroup, client_ns, backend)
    finally:
        backend.cleanup()
        for server in servers:
            server.kill()
            server.wait()


@contextlib.contextmanager
def held_connection(node: Node) -> Iterator[tuple[str, Callable[[str], str]]]:
    """One TCP connection from the cgroup to the ClusterIP: (the pod that greeted, echo through it)."""
    client = subprocess.Popen(node.client_argv("hold", VIP, TCP_PORT), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdin and client.stdout

    def echo(line: str) -> str:
        client.stdin.write(line + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        yield client.stdout.readline().strip(), echo
    finally:
        client.kill()
        client.wait()


def attached(node: Node) -> dict[str, int]:
    """Hook -> program id of each pinned link that is attached to the test cgroup."""
    links = {hook: link_info(path) for hook, path in node.backend.pinned_links().items()}
    return {hook: info.prog_id for hook, info in links.items() if info.cgroup_id == cgroup_id(node.cgroup)}


# -- behaviour ----------------------------------------------------------------------------------------
def test_connects_to_the_cluster_ip_reach_every_endpoint(node: Node) -> None:
    snapshot = node.program(slices_for(*PODS))
    answers = [line.split() for line in node.ask("tcp", VIP, TCP_PORT, 40)]
    assert {pod for pod, _ in answers} == set(PODS)
    assert {peer for _, peer in answers} == {f"{VIP}:{TCP_PORT}"}  # getpeername() shows the ClusterIP
    assert all(row.in_sync for row in compare([node.backend], snapshot))  # `proxy show` agrees


def test_only_usable_endpoints_are_chosen(node: Node) -> None:
    not_ready = endpoint("p1", ready=False)
    node.program([endpoint_slice("web", [endpoint("p0"), not_ready, endpoint("p2")], name="web-tcp")])
    assert node.pods_reached() == {"p0", "p2"}


def test_udp_replies_appear_to_come_from_the_cluster_ip(node: Node) -> None:
    node.program(slices_for(*PODS))
    replies = [line.split() for line in node.ask("udp", VIP, UDP_PORT, 30)]
    assert {pod for pod, _, _ in replies} == set(PODS)  # each datagram balanced on its own
    assert {(ip, port) for _, ip, port in replies} == {(VIP, str(UDP_PORT))}


def test_a_service_without_endpoints_refuses_instead_of_blackholing(node: Node) -> None:
    node.program([])
    started = time.monotonic()
    assert node.ask("tcp", VIP, TCP_PORT, 3) == ["refused 1"] * 3  # EPERM from connect(), at once
    assert time.monotonic() - started < 5


def test_a_removed_endpoint_gets_no_new_connections_but_an_established_one_keeps_working(
    node: Node,
) -> None:
    node.program(slices_for("p0"))
    with held_connection(node) as (greeting, echo):
        assert greeting == "p0"
        node.program(slices_for("p1", "p2"))
        assert node.pods_reached() == {"p1", "p2"}
        assert echo("still here") == "still here"


def test_an_agent_restart_keeps_programs_maps_and_connections(node: Node) -> None:
    snapshot = node.program(slices_for(*PODS))
    programs, maps = attached(node), node.backend.read_maps()
    assert set(programs) == {"connect4", "sendmsg4", "recvmsg4", "getpeername4"}
    with held_connection(node) as (_, echo):
        node.backend.close()  # the old agent exits
        restarted = subprocess.run(
            [sys.executable, "-c", RESYNC, node.name, node.cgroup, json.dumps(snapshot.to_dict())],
            capture_output=True, text=True, timeout=60,
        )
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip() == "changed: False"
        assert attached(node) == programs  # the same programs, never detached
        assert node.backend.read_maps() == maps  # re-opened from the pins
        assert echo("after restart") == "after restart"
    assert node.pods_reached() == set(PODS)


RESYNC = """
import json, sys
from netagent.proxy.backend import NodeContext, SyncError
from netagent.proxy.ebpf import EbpfBackend
from netagent.proxy.service import Snapshot
backend = EbpfBackend(NodeContext(sys.argv[1]), cgroup=sys.argv[2])
print("changed:", bool(backend.sync(Snapshot.from_dict(json.loads(sys.argv[3])).ports)))
"""


def test_a_sync_writes_only_the_map_entries_that_differ(node: Node) -> None:
    node.program(slices_for(*PODS))
    assert not node.backend.sync(build_snapshot([web()], slices_for(*PODS), node.name).ports)
    changes = node.backend.sync(build_snapshot([web()], slices_for("p0", "p2"), node.name).ports)
    # per service (TCP and UDP): its count, p2 moved into p1's slot, p2's old slot deleted
    written = (changes.set_services, changes.set_endpoints, changes.deleted_endpoints)
    assert tuple(map(len, written)) == (2, 2, 2)
    assert not changes.deleted_services
    assert node.pods_reached() == {"p0", "p2"}


def test_a_new_program_version_replaces_the_attached_one_in_place(node: Node) -> None:
    snapshot = node.program(slices_for(*PODS))
    before = {hook: link_info(path) for hook, path in node.backend.pinned_links().items()}
    for path in node.backend.pinned_links().values():  # as an agent of an older release left them
        os.rename(path, path.rsplit("-", 1)[0] + "-older")
    with held_connection(node) as (_, echo):
        node.backend.close()
        upgraded = EbpfBackend(NodeContext(node.name), cgroup=node.cgroup)
        upgraded.sync(snapshot.ports)
        upgraded.close()
        after = {hook: link_info(path) for hook, path in node.backend.pinned_links().items()}
        assert {hook: info.id for hook, info in after.items()} == {h: i.id for h, i in before.items()}
        assert all(after[hook].prog_id != before[hook].prog_id for hook in before)  # swapped atomically
        assert sorted(os.listdir(node.backend.pin_dir)) == sorted(
            [*MAPS, *(f"{hook}-{program_version()}" for hook in before)]
        )
        assert echo("upgraded") == "upgraded"
    assert node.pods_reached() == set(PODS)


def test_a_client_outside_the_cgroup_is_not_balanced(node: Node) -> None:
    node.program(slices_for(*PODS))
    assert node.pods_reached(10, in_cgroup=False) == {"node"}
    assert tcp_ask(node.client_ns, VIP, TCP_PORT).pod == "node"  # this test process is not in it either


def test_cleanup_detaches_everything_and_removes_the_pins(node: Node) -> None:
    node.program(slices_for(*PODS))
    node.backend.cleanup()
    assert not os.path.exists(node.backend.pin_dir)
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", node.cgroup], capture_output=True, text=True)
    assert json.loads(shown.stdout.strip() or "[]") == []
    assert node.pods_reached(5) == {"node"}  # the cgroup's sockets are left alone


def test_bad_configuration_is_a_clear_error(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot name a bpffs directory"):
        EbpfBackend(NodeContext("../etc"))
    backend = EbpfBackend(NodeContext(f"{prefix}-node"), cgroup=str(tmp_path))
    with pytest.raises(SyncError, match="is not a cgroup v2 directory"):
        backend.sync([])
    assert not os.path.exists(backend.pin_dir)  # nothing was created
    lab_node = EbpfBackend(NodeContext(f"{prefix}-node"), netns=f"{prefix}-node")  # default: root cgroup
    with pytest.raises(SyncError, match="refusing to attach to the root cgroup"):
        lab_node.sync([])
    assert not os.path.exists(lab_node.pin_dir)
