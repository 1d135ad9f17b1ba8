"""First-packet latency through the service proxy: TCP connect time from a pod to a ClusterIP with
0, 1,000 and 10,000 other services programmed, per backend, as a ratio to the same connect on an
identical node without any proxy rules (the reference), measured interleaved in the same run.

    .venv/bin/python benchmarks/proxy_latency.py [--counts 0,1000,10000] [--connects 300]
        [--backends nftables,iptables-legacy,iptables]

Each node is a netns with a bridge and two pod netns: "client" and "server" (accepts and closes).
Every connect is a new connection, so its SYN walks the NAT rules (conntrack only remembers
established flows). With br_netfilter on, even pod-to-pod traffic on the proxied node walks them,
so that is reported too ("pod IP" column). The measured service sorts last, the worst place for
iptables' linear NA-SERVICES scan; the other services have one endpoint each (their count, not their
endpoints, is what a lookup walks).
Medians of --connects connects; everything lives in netns nb<hex>-*, removed at the end.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import subprocess
import sys
import time

from netagent.proxy.backend import NodeContext
from netagent.proxy.proxier import Proxier
from netagent.proxy.snapshot_builder import SnapshotBuilder
from nodekit import netns

NODE = "node-a"
GATEWAY, CLIENT_IP, SERVER_IP = "10.244.0.1", "10.244.0.10", "10.244.0.20"
TARGET_VIP, PORT = "10.97.255.254", 8080
ACCEPT_AND_CLOSE = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 8080)); s.listen(4096)
while True:
    conn, _ = s.accept(); conn.close()
"""


def service(name: str, ip: str) -> dict:
    return {
        "metadata": {"namespace": "bench", "name": name, "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
    }


def endpoint_slice(name: str, ip: str) -> dict:
    return {
        "metadata": {
            "namespace": "bench",
            "name": name,
            "resourceVersion": "1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT}],
        "endpoints": [{"addresses": [ip], "nodeName": NODE}],
    }


def objects(count: int) -> tuple[list[dict], list[dict]]:
    """`count` filler services (sorting before the target) plus the measured one, "zz-target"."""
    services = [service(f"filler-{i}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(count)]
    slices = [endpoint_slice(f"filler-{i}", f"10.250.{i // 250}.{i % 250 + 1}") for i in range(count)]
    return services + [service("zz-target", TARGET_VIP)], slices + [endpoint_slice("zz-target", SERVER_IP)]


def connect_times(client_ns: str, ip: str, port: int, count: int) -> list[float]:
    times = []
    with netns.entered(netns.path(client_ns)):
        sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            start = time.perf_counter()
            sock.connect((ip, port))
            times.append(time.perf_counter() - start)
    return times


NODE_PARTS = ("node", "cli", "srv")


def build_node(prefix: str) -> tuple[str, str, subprocess.Popen]:
    """(node netns, client netns, server process); netns named <prefix>-{node,cli,srv}."""
    node, client, server = (f"{prefix}-{part}" for part in NODE_PARTS)
    for name in (node, client, server):
        netns.create(name)
    netns.run(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    netns.run(node, ["ip", "link", "add", "br0", "type", "bridge"])
    netns.run(node, ["ip", "addr", "add", f"{GATEWAY}/24", "dev", "br0"])
    netns.run(node, ["ip", "link", "set", "br0", "up"])
    for pod, ip in ((client, CLIENT_IP), (server, SERVER_IP)):
        veth = f"v{pod[-3:]}"
        netns.run(node, ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod])
        netns.run(node, ["ip", "link", "set", veth, "master", "br0", "up"])
        netns.run(pod, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        netns.run(pod, ["ip", "link", "set", "eth0", "up"])
        netns.run(pod, ["ip", "route", "add", "default", "via", GATEWAY])
    acceptor = subprocess.Popen(netns.exec_argv(server, [sys.executable, "-c", ACCEPT_AND_CLOSE]))
    deadline = time.monotonic() + 30
    while True:
        try:
            connect_times(client, SERVER_IP, PORT, 1)
            return node, client, acceptor
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,1000,10000")
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--backends", default="nftables,iptables-legacy,iptables")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(
        f"proxy_latency: median TCP connect, {args.connects} connects each, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"  {'backend':16} {'services':>8} {'reference':>10} {'pod IP':>9} {'ClusterIP':>10} {'ratio':>6}")
    prefixes = [f"nb{secrets.token_hex(3)}"]
    processes = []
    try:
        _, ref_client, acceptor = build_node(prefixes[0])
        processes.append(acceptor)
        for kind in args.backends.split(","):
            prefixes.append(f"nb{secrets.token_hex(3)}")
            node, client, acceptor = build_node(prefixes[-1])
            processes.append(acceptor)
            proxier = Proxier(kind, NodeContext(NODE, ("10.244.0.0/16",)), families=(4,), netns=node)
            builder = SnapshotBuilder(NODE)
            for count in counts:
                proxier.apply(builder.build(*objects(count)))
                connect_times(client, TARGET_VIP, 80, 20)  # warm up (ARP, caches)
                reference, direct, via_vip = [], [], []
                for _ in range(args.connects // 10):  # interleaved, so machine noise hits all alike
                    reference += connect_times(ref_client, SERVER_IP, PORT, 10)
                    direct += connect_times(client, SERVER_IP, PORT, 10)
                    via_vip += connect_times(client, TARGET_VIP, 80, 10)
                ref_us, pod_us, vip_us = (statistics.median(t) * 1e6 for t in (reference, direct, via_vip))
                print(
                    f"  {kind:16} {count:8d} {ref_us:8.0f}us {pod_us:7.0f}us {vip_us:8.0f}us "
                    f"{vip_us / ref_us:6.2f}"
                )
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for prefix in prefixes:
            for part in NODE_PARTS:
                netns.delete(f"{prefix}-{part}")


if __name__ == "__main__":
    main()
