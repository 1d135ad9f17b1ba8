"""The kube-proxy replacement moving real packets, per backend.

A node is built by hand in network namespaces: a "node" netns with a bridge (10.244.0.1/24) and three
pod netns on veths running a tiny server that answers with its pod name, the peer address it saw and
its own port; a "client" netns on an underlay veth (192.168.50.10 -> node 192.168.50.2) plays the
world outside the cluster. Services and EndpointSlices are plain API-shaped dicts fed through the
real model, the backend programs the node netns, and every assertion is about traffic.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from netagent.proxy.backend import NodeContext, SyncError
from netagent.proxy.healthcheck import HealthCheckServers
from netagent.proxy.inspection import compare
from netagent.proxy.proxier import Proxier
from netagent.proxy.service import Snapshot
from netagent.proxy.snapshot_builder import build_snapshot
from nodekit import netns

NODE = "node-a"
CLUSTER_CIDR = "10.244.0.0/16"
GATEWAY, NODE_IP, CLIENT_IP = "10.244.0.1", "192.168.50.2", "192.168.50.10"
PODS = {"p0": "10.244.0.10", "p1": "10.244.0.11", "p2": "10.244.0.12"}
VIP, EXTERNAL_IP, LB_IP = "10.96.0.10", "192.168.60.5", "192.168.70.5"
# the IPv6 half of the same node, for dual-stack services
CLUSTER_CIDR6, GATEWAY6, NODE_IP6, CLIENT_IP6 = "fd00:244::/48", "fd00:244::1", "fd00:50::2", "fd00:50::10"
PODS6 = {"p0": "fd00:244::10", "p1": "fd00:244::11", "p2": "fd00:244::12"}
VIP6 = "fd00:96::10"
TCP_PORTS, UDP_PORT = (8080, 8081), 5353

# Each pod runs this: TCP greets "<pod> <peer ip> <local port>" then echoes lines; UDP answers likewise.
SERVER = r"""
import socket, socketserver, sys, threading
name = sys.argv[1]
def peer(address):  # dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d
    return address[0].removeprefix("::ffff:")
class TCP(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(f"{name} {peer(self.client_address)} {self.server.server_address[1]}\n".encode())
        for line in self.rfile:
            self.wfile.write(line)
class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
for port in (8080, 8081):
    threading.Thread(target=Server(("::", port), TCP).serve_forever, daemon=True).start()
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.bind(("::", 5353))
while True:
    data, address = udp.recvfrom(2048)
    udp.sendto(f"{name} {peer(address)} 5353".encode(), address)
"""


@dataclass
class Answer:
    pod: str
    peer: str
    port: int


def tcp_ask(ns: str, ip: str, port: int, timeout: float = 5.0) -> Answer:
    """Connect from inside netns `ns`; raises ConnectionRefusedError when the service rejects."""
    with netns.entered(netns.path(ns)):
        sock = socket.create_connection((ip, port), timeout=timeout)
    with sock, sock.makefile() as f:
        pod, peer, local_port = f.readline().split()
    return Answer(pod, peer, int(local_port))


def udp_ask(ns: str, ip: str, port: int, source_port: int, timeout: float = 2.0) -> Answer:
    with netns.entered(netns.path(ns)):
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", source_port))
        sock.settimeout(timeout)
        sock.sendto(b"?", (ip, port))
        pod, peer, local_port = sock.recv(2048).decode().split()
    return Answer(pod, peer, int(local_port))


def eventually(check: Callable[[], object], timeout: float = 20.0) -> object:
    """Poll until check() returns truthy without raising (slow shared machine: be generous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.1)


# -- API-shaped objects -------------------------------------------------------------------------
def service(
    name: str = "web",
    cluster_ip: str = VIP,
    ports: tuple = (("http", 80, "TCP", 0),),
    svc_type: str = "ClusterIP",
    **spec: object,
) -> dict:
    port_list = [
        {"name": n, "port": p, "protocol": proto, "targetPort": n, **({"nodePort": np} if np else {})}
        for n, p, proto, np in ports
    ]
    body = {
        "metadata": {"namespace": "default", "name": name},
        "spec": {"type": svc_type, "clusterIP": cluster_ip, "ports": port_list, **spec},
    }
    if "lb_ip" in spec:
        body["spec"].pop("lb_ip")
        body["status"] = {"loadBalancer": {"ingress": [{"ip": spec["lb_ip"]}]}}
    return body


def endpoint(
    pod: str, node: str = NODE, ready: bool = True, terminating: bool = False, family: int = 4
) -> dict:
    return {
        "addresses": [(PODS if family == 4 else PODS6)[pod]],
        "nodeName": node,
        "conditions": {"ready": ready, "serving": True, "terminating": terminating},
    }


def endpoint_slice(
    svc: str,
    endpoints: list[dict],
    port: int = 8080,
    port_name: str = "http",
    protocol: str = "TCP",
    name: str = "",
    family: int = 4,
) -> dict:
    return {
        "metadata": {
            "namespace": "default",
            "name": name or f"{svc}-{port}",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": f"IPv{family}",
        "ports": [{"name": port_name, "port": port, "protocol": protocol}],
        "endpoints": endpoints,
    }


# -- the node -----------------------------------------------------------------------------------
@dataclass
class Node:
    ns: str
    client: str
    pods: dict[str, str]  # pod name -> netns
    proxier: Proxier

    def program(self, services: list[dict], slices: list[dict]) -> None:
        snapshot = build_snapshot(services, slices, NODE)
        self.proxier.apply(snapshot)
        self.snapshot = snapshot

    def pods_reached(self, ns: str, ip: str, port: int, tries: int = 60) -> set[str]:
        return {tcp_ask(ns, ip, port).pod for _ in range(tries)}


def _ip(ns: str, *args: str) -> None:
    netns.run(ns, ["ip", *args])


@pytest.fixture(params=["iptables", "iptables-legacy", "nftables"], name="node")
def node_fixture(request: pytest.FixtureRequest, make_netns: Callable[[str], str]) -> Iterator[Node]:
    node_ns, client_ns = make_netns("node"), make_netns("client")
    netns.run(node_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    _ip(node_ns, "link", "add", "br0", "type", "bridge")
    _ip(node_ns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
    _ip(node_ns, "addr", "add", f"{GATEWAY6}/64", "dev", "br0", "nodad")
    _ip(node_ns, "link", "set", "br0", "up")
    _ip(node_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client_ns)
    _ip(node_ns, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    _ip(node_ns, "addr", "add", f"{NODE_IP6}/64", "dev", "eth0", "nodad")
    _ip(node_ns, "link", "set", "eth0", "up")
    _ip(node_ns, "route", "add", "default", "via", CLIENT_IP)  # a real node has a way out
    _ip(node_ns, "-6", "route", "add", "default", "via", CLIENT_IP6)
    _ip(client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    _ip(client_ns, "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
    _ip(client_ns, "link", "set", "eth0", "up")
    for net in ("10.96.0.0/16", "192.168.60.0/24", "192.168.70.0/24", "10.244.0.0/16"):
        _ip(client_ns, "route", "add", net, "via", NODE_IP)
    for net in ("fd00:96::/64", "fd00:244::/64"):
        _ip(client_ns, "-6", "route", "add", net, "via", NODE_IP6)
    pods, servers = {}, []
    for pod, ip in PODS.items():
        pod_ns = make_netns(pod)
        _ip(node_ns, "link", "add", f"v{pod}", "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        _ip(node_ns, "link", "set", f"v{pod}", "master", "br0", "up")
        netns.run(node_ns, ["bridge", "link", "set", "dev", f"v{pod}", "hairpin", "on"])  # as our CNI does
        _ip(pod_ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip(pod_ns, "addr", "add", f"{PODS6[pod]}/64", "dev", "eth0", "nodad")
        _ip(pod_ns, "link", "set", "eth0", "up")
        _ip(pod_ns, "route", "add", "default", "via", GATEWAY)
        _ip(pod_ns, "-6", "route", "add", "default", "via", GATEWAY6)
        servers.append(subprocess.Popen(netns.exec_argv(pod_ns, [sys.executable, "-c", SERVER, pod])))
        pods[pod] = pod_ns
    health = HealthCheckServers(netns_path=netns.path(node_ns))
    proxier = Proxier(
        request.param, NodeContext(NODE, (CLUSTER_CIDR, CLUSTER_CIDR6)), netns=node_ns, health=health
    )
    try:
        for ip in PODS.values():
            eventually(lambda ip=ip: tcp_ask(node_ns, ip, 8080, timeout=1))
        yield Node(node_ns, client_ns, pods, proxier)
    finally:
        health.stop()
        for server in servers:
            server.kill()
            server.wait()


# -- behaviour ----------------------------------------------------------------------------------
def test_cluster_ip_balances_over_every_endpoint(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint(p) for p in PODS])])
    assert node.pods_reached(node.client, VIP, 80) == set(PODS)


def test_only_traffic_from_outside_the_cluster_cidr_is_masqueraded(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint("p0")])])
    assert tcp_ask(node.client, VIP, 80).peer == GATEWAY  # SNATed to the node's address towards the pod
    assert tcp_ask(node.pods["p1"], VIP, 80).peer == PODS["p1"]  # pod source kept


def test_nodeport_answers_from_the_underlay(node: Node) -> None:
    node.program(
        [service(svc_type="NodePort", ports=(("http", 80, "TCP", 30080),))],
        [endpoint_slice("web", [endpoint("p0"), endpoint("p1")])],
    )
    assert node.pods_reached(node.client, NODE_IP, 30080, tries=40) == {"p0", "p1"}


def test_external_ip_and_load_balancer_ip_reach_the_endpoints(node: Node) -> None:
    node.program(
        [
            service(
                svc_type="LoadBalancer",
                ports=(("http", 80, "TCP", 30080),),
                externalIPs=[EXTERNAL_IP],
                lb_ip=LB_IP,
            )
        ],
        [endpoint_slice("web", [endpoint("p2")])],
    )
    assert tcp_ask(node.client, EXTERNAL_IP, 80).pod == "p2"
    assert tcp_ask(node.client, LB_IP, 80).pod == "p2"


def test_client_ip_affinity_pins_a_client_to_one_endpoint(node: Node) -> None:
    node.program(
        [service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}})],
        [endpoint_slice("web", [endpoint(p) for p in PODS])],
    )
    assert len(node.pods_reached(node.client, VIP, 80, tries=20)) == 1


def test_external_traffic_policy_local_keeps_client_ip_and_refuses_without_local_endpoints(
    node: Node,
) -> None:
    svc = service(
        svc_type="NodePort",
        ports=(("http", 80, "TCP", 30080),),
        externalTrafficPolicy="Local",
        healthCheckNodePort=32000,
    )
    node.program([svc], [endpoint_slice("web", [endpoint("p0"), endpoint("p1", node="node-b")])])
    answers = [tcp_ask(node.client, NODE_IP, 30080) for _ in range(20)]
    assert {(a.pod, a.peer) for a in answers} == {("p0", CLIENT_IP)}
    status, body = _http_get(node.client, f"http://{NODE_IP}:32000/")
    assert (status, body["localEndpoints"]) == (200, 1)
    assert node.pods_reached(node.pods["p2"], NODE_IP, 30080, tries=20) == {"p0", "p1"}  # pods: cluster path

    node.program([svc], [endpoint_slice("web", [endpoint("p1", node="node-b")])])
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(node.client, NODE_IP, 30080)
    status, body = _http_get(node.client, f"http://{NODE_IP}:32000/")
    assert (status, body["localEndpoints"]) == (503, 0)


def test_health_check_counts_only_ready_local_endpoints_as_kube_proxy_does(node: Node) -> None:
    """Local endpoints that are all terminating still get the traffic that arrives (the fallback lets
    them drain), but the load balancer is told to stop sending it: 503, as kube-proxy answers."""
    svc = service(
        svc_type="NodePort",
        ports=(("http", 80, "TCP", 30080),),
        externalTrafficPolicy="Local",
        healthCheckNodePort=32000,
    )
    leaving = endpoint("p0", ready=False, terminating=True)
    node.program([svc], [endpoint_slice("web", [leaving, endpoint("p1", node="node-b")])])
    assert tcp_ask(node.client, NODE_IP, 30080).pod == "p0"
    status, body = _http_get(node.client, f"http://{NODE_IP}:32000/")
    assert (status, body["localEndpoints"]) == (503, 0)


def test_internal_traffic_policy_local_uses_only_this_nodes_endpoints(node: Node) -> None:
    svc = service(internalTrafficPolicy="Local")
    node.program([svc], [endpoint_slice("web", [endpoint("p0"), endpoint("p1", node="node-b")])])
    assert node.pods_reached(node.pods["p2"], VIP, 80, tries=20) == {"p0"}
    node.program([svc], [endpoint_slice("web", [endpoint("p1", node="node-b")])])
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(node.pods["p2"], VIP, 80)


def test_terminating_endpoints_are_used_only_when_none_is_ready(node: Node) -> None:
    leaving = endpoint("p0", ready=False, terminating=True)
    node.program([service()], [endpoint_slice("web", [leaving, endpoint("p1")])])
    assert node.pods_reached(node.client, VIP, 80, tries=20) == {"p1"}
    node.program([service()], [endpoint_slice("web", [leaving])])
    assert node.pods_reached(node.client, VIP, 80, tries=5) == {"p0"}


def test_service_without_endpoints_refuses_connections_instead_of_blackholing(node: Node) -> None:
    node.program([service(svc_type="NodePort", ports=(("http", 80, "TCP", 30080),))], [])
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(node.client, VIP, 80, timeout=10)
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(node.client, NODE_IP, 30080, timeout=10)
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(node.pods["p0"], VIP, 80, timeout=10)
    assert time.monotonic() - started < 10  # refused, not timed out


def test_a_pod_reaches_itself_through_its_service_hairpin(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint("p0")])])
    answer = tcp_ask(node.pods["p0"], VIP, 80)
    assert (answer.pod, answer.peer) == ("p0", GATEWAY)  # masqueraded, or the reply would bypass NAT


def test_named_target_port_is_resolved_per_endpoint(node: Node) -> None:
    node.program(
        [service()],
        [
            endpoint_slice("web", [endpoint("p0")], port=8080, name="a"),
            endpoint_slice("web", [endpoint("p1")], port=8081, name="b"),
        ],
    )
    answers = {(a.pod, a.port) for a in (tcp_ask(node.client, VIP, 80) for _ in range(30))}
    assert answers == {("p0", 8080), ("p1", 8081)}


def test_removing_an_endpoint_converges(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint(p) for p in PODS])])
    node.program([service()], [endpoint_slice("web", [endpoint("p0"), endpoint("p1")])])
    assert node.pods_reached(node.client, VIP, 80, tries=30) == {"p0", "p1"}
    assert all(row.in_sync for row in compare(node.proxier.backends, node.snapshot))


def test_removed_udp_endpoint_loses_its_conntrack_entries(node: Node) -> None:
    udp = service(ports=(("dns", 53, "UDP", 0),))
    node.program(
        [udp], [endpoint_slice("web", [endpoint("p0")], port=UDP_PORT, port_name="dns", protocol="UDP")]
    )
    assert udp_ask(node.client, VIP, 53, source_port=40000).pod == "p0"
    node.program(
        [udp], [endpoint_slice("web", [endpoint("p1")], port=UDP_PORT, port_name="dns", protocol="UDP")]
    )
    assert udp_ask(node.client, VIP, 53, source_port=40000).pod == "p1"  # same 5-tuple, new endpoint


def test_restart_resyncs_without_flushing_and_keeps_open_connections(node: Node, request) -> None:
    services, slices = [service()], [endpoint_slice("web", [endpoint("p0"), endpoint("p1")])]
    node.program(services, slices)
    with netns.entered(netns.path(node.client)):
        conn = socket.create_connection((VIP, 80), timeout=5)
    failures: list[Exception] = []
    stop = threading.Event()

    def keep_connecting() -> None:
        while not stop.is_set():
            try:
                tcp_ask(node.client, VIP, 80, timeout=3)
            except OSError as err:
                failures.append(err)

    prober = threading.Thread(target=keep_connecting)
    prober.start()
    try:
        for _ in range(3):  # a fresh agent each time: no memory of what it applied before
            fresh = Proxier(
                node.proxier.backends[0].kind,
                NodeContext(NODE, (CLUSTER_CIDR,)),
                families=(4,),
                netns=node.ns,
            )
            fresh.apply(build_snapshot(services, slices, NODE))
    finally:
        stop.set()
        prober.join()
    with conn, conn.makefile("rw") as f:
        f.readline()
        f.write("still here\n")
        f.flush()
        assert f.readline() == "still here\n"
    assert failures == []


def test_dual_stack_service_answers_on_both_families(node: Node) -> None:
    dual = service(clusterIPs=[VIP, VIP6], ipFamilies=["IPv4", "IPv6"])
    node.program(
        [dual],
        [
            endpoint_slice("web", [endpoint("p0")]),
            endpoint_slice("web", [endpoint("p1", family=6)], family=6, name="web-v6"),
        ],
    )
    assert tcp_ask(node.client, VIP, 80).pod == "p0"
    from_outside = tcp_ask(node.client, VIP6, 80)
    assert (from_outside.pod, from_outside.peer) == ("p1", GATEWAY6)  # masqueraded like IPv4
    from_pod = tcp_ask(node.pods["p2"], VIP6, 80)
    assert (from_pod.pod, from_pod.peer) == ("p1", PODS6["p2"])
    assert all(row.in_sync for row in compare(node.proxier.backends, node.snapshot))


def test_a_refused_transaction_changes_nothing_and_the_next_sync_retries_it(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint("p0")])])
    backend = node.proxier.backends[0]
    real_transaction = backend.transaction

    def refused(current, desired, changes) -> str:  # the kernel must reject the whole transaction
        text = real_transaction(current, desired, changes)
        if backend.kind == "nftables":
            return text + "add rule ip netagent no-such-chain accept\n"
        return text.replace("COMMIT", "-A NA-NO-SUCH-CHAIN -j ACCEPT\nCOMMIT", 1)

    backend.transaction = refused
    with pytest.raises(SyncError):
        node.program([service()], [endpoint_slice("web", [endpoint("p1")])])
    assert node.pods_reached(node.client, VIP, 80, tries=10) == {"p0"}  # old rules intact
    backend.transaction = real_transaction
    node.program([service()], [endpoint_slice("web", [endpoint("p1")])])
    assert node.pods_reached(node.client, VIP, 80, tries=10) == {"p1"}


def test_sctp_service_is_programmed(node: Node) -> None:
    """This kernel has no SCTP sockets, so no traffic: the kernel must accept and hold the rules."""
    sctp = service(ports=(("assoc", 80, "SCTP", 0),))
    node.program([sctp], [endpoint_slice("web", [endpoint("p0")], port_name="assoc", protocol="SCTP")])
    rows = compare(node.proxier.backends, node.snapshot)
    assert [(row.destination, row.in_sync) for row in rows] == [(f"SCTP {VIP}:80", True)]


def test_switching_backend_removes_the_previous_backends_rules(node: Node) -> None:
    node.program([service()], [endpoint_slice("web", [endpoint("p0")])])
    other = "nftables" if node.proxier.kind != "nftables" else "iptables"
    switched = Proxier(other, NodeContext(NODE, (CLUSTER_CIDR,)), families=(4,), netns=node.ns)
    switched.remove_other_backends()
    assert node.proxier.backends[0].kernel_view().entries == {}  # nothing of the old backend left
    switched.apply(build_snapshot([service()], [endpoint_slice("web", [endpoint("p1")])], NODE))
    assert node.pods_reached(node.client, VIP, 80, tries=10) == {"p1"}


def test_malformed_service_is_skipped_while_others_keep_working(node: Node) -> None:
    broken = service(name="broken", cluster_ip="10.96.0.99", ports=(("http", 99999, "TCP", 0),))
    node.program([broken, service()], [endpoint_slice("web", [endpoint("p0")])])
    assert [s.split(":")[0] for s in node.snapshot.skipped] == ["default/broken"]
    assert tcp_ask(node.client, VIP, 80).pod == "p0"


def _http_get(ns: str, url: str) -> tuple[int, dict]:
    with netns.entered(netns.path(ns)):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def test_a_port_listed_twice_leaves_nothing_behind_once_its_service_is_gone(node: Node) -> None:
    """Two identical entries for one port (a Service whose spec.ports repeats an entry, which an API
    server stand-in accepted) must not keep rules alive after the Service is deleted."""
    other = service("other", cluster_ip="10.96.0.30")
    node.program([other], [endpoint_slice("other", [endpoint("p1")])])  # the node already has rules
    before = node.snapshot
    (web,) = build_snapshot([service()], [endpoint_slice("web", [endpoint("p0")])], NODE).ports
    node.proxier.apply(Snapshot(ports=(web, web, *before.ports)))
    assert node.pods_reached(node.client, VIP, 80, tries=3) == {"p0"}
    node.proxier.apply(before)  # the Service is deleted
    assert all(row.in_sync for row in compare(node.proxier.backends, before))
    with pytest.raises(OSError):  # refused or unanswered: nothing forwards it any more
        tcp_ask(node.client, VIP, 80, timeout=2)
