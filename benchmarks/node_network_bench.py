"""Node networking throughput and sync cost, as ratios against references measured in the same run.

    .venv/bin/python benchmarks/node_network_bench.py [--seconds 3] [--rounds 5] [--peers 1000]

Builds two node netns on an underlay bridge netns, a pod netns behind each node's bridge, and programs
them with netagent's own reconcilers (the code `netagent run` runs). Then:

1. iperf3 TCP pod->pod across nodes in vxlan mode and in routes mode, each round paired with a
   node->node run over the bare underlay (the baseline): ratio = pod throughput / underlay throughput.
   Targets from issue 3: vxlan >= 0.85, routes >= 0.95.
2. Control plane: cold sync of --peers synthetic nodes (3 entries each in vxlan mode), then a no-op
   resync and a one-node change, each as a ratio to the cold sync.

Everything lives in netns named nb<hex>-*, removed at the end (also on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from pyroute2 import IPRoute

from netagent.node_network import PeerNode, RoutedNetwork, VxlanNetwork, find_underlay, vtep_mac_for
from nodekit import netns

UNDERLAY_MTU = 1500
VXLAN_POD_MTU = UNDERLAY_MTU - 50


def sh(ns: str, *argv: str) -> str:
    return netns.run(ns, list(argv)).stdout


class Testbed:
    """Two nodes (192.168.90.1/.2) with one pod each (10.244.1.10, 10.244.2.10)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.created: list[str] = []
        self.underlay = self._ns("ul")
        sh(self.underlay, "ip", "link", "add", "br0", "type", "bridge")
        sh(self.underlay, "ip", "link", "set", "br0", "up")
        self.nodes = [self._node(i) for i in (1, 2)]

    def _ns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        netns.create(name)
        self.created.append(name)
        return name

    def _node(self, i: int) -> dict[str, str]:
        node, pod = self._ns(f"n{i}"), self._ns(f"p{i}")
        uplink = f"{self.prefix}u{i}"
        sh(self.underlay, "ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", node)
        sh(self.underlay, "ip", "link", "set", uplink, "master", "br0", "up")
        sh(node, "ip", "addr", "add", f"192.168.90.{i}/24", "dev", "eth0")
        sh(node, "ip", "link", "set", "eth0", "up")
        sh(node, "ip", "link", "add", "cni0", "type", "bridge")
        sh(node, "ip", "addr", "add", f"10.244.{i}.1/24", "dev", "cni0")
        sh(node, "ip", "link", "set", "cni0", "up")
        sh(node, "ip", "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", pod)
        sh(node, "ip", "link", "set", "vpod", "master", "cni0", "up")
        sh(pod, "ip", "addr", "add", f"10.244.{i}.10/24", "dev", "eth0")
        sh(pod, "ip", "link", "set", "eth0", "up")
        sh(pod, "ip", "route", "add", "default", "via", f"10.244.{i}.1")
        return {"ns": node, "pod": pod, "ip": f"192.168.90.{i}", "cidr": f"10.244.{i}.0/24",
                "pod_ip": f"10.244.{i}.10", "name": f"node{i}"}

    def set_pod_mtu(self, mtu: int) -> None:
        for node in self.nodes:
            sh(node["ns"], "ip", "link", "set", "vpod", "mtu", str(mtu))
            sh(node["pod"], "ip", "link", "set", "eth0", "mtu", str(mtu))

    def close(self) -> None:
        for name in reversed(self.created):
            netns.delete(name)


@contextlib.contextmanager
def node_socket(ns: str) -> Iterator[IPRoute]:
    with netns.entered(netns.path(ns)):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def program(bed: Testbed, mode: str) -> None:
    """Program both nodes for `mode` with the agent's reconcilers (VTEP MACs derive from node IPs)."""
    for node in bed.nodes:
        peers = [PeerNode(o["name"], o["ip"], (o["cidr"],), vtep_mac_for(o["ip"]))
                 for o in bed.nodes if o is not node]
        with node_socket(node["ns"]) as ipr, netns.entered(netns.path(node["ns"])):
            underlay = find_underlay(ipr, "eth0")
            if mode == "vxlan":
                network = VxlanNetwork(ipr, underlay)
                network.setup([node["cidr"]])
            else:
                network = RoutedNetwork(ipr, underlay)
                network.setup()
            report = network.program_peers(peers)
        if report.errors:
            raise RuntimeError(f"{mode}: {report.errors}")
    bed.set_pod_mtu(VXLAN_POD_MTU if mode == "vxlan" else UNDERLAY_MTU)


def iperf3(server_ns: str, client_ns: str, address: str, seconds: float) -> float:
    """TCP throughput in Gbit/s from client_ns to address (served in server_ns)."""
    server = subprocess.Popen(netns.exec_argv(server_ns, ["iperf3", "-s", "-1", "-B", address]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while ":5201" not in sh(server_ns, "ss", "-ltn"):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        out = sh(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J")
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.wait(30)


def throughput(bed: Testbed, mode: str, seconds: float, rounds: int) -> dict[str, float]:
    program(bed, mode)
    (one, two) = bed.nodes
    ratios, pods, bases = [], [], []
    for _ in range(rounds):
        base = iperf3(two["ns"], one["ns"], two["ip"], seconds)
        pod = iperf3(two["pod"], one["pod"], two["pod_ip"], seconds)
        bases.append(base)
        pods.append(pod)
        ratios.append(pod / base)
    return {"underlay_gbps": statistics.median(bases), "pod_gbps": statistics.median(pods),
            "ratio": statistics.median(ratios)}


def synthetic_peers(count: int) -> list[PeerNode]:
    base = ipaddress.ip_address("172.20.0.10")
    return [
        PeerNode(f"peer{i}", str(base + i), (f"10.{100 + i // 256}.{i % 256}.0/24",),
                 f"0e:6f:00:00:{i // 256:02x}:{i % 256:02x}")
        for i in range(count)
    ]


def control_plane(bed: Testbed, peers: int) -> dict[str, float]:
    node = bed.nodes[0]
    everyone = synthetic_peers(peers)
    with node_socket(node["ns"]) as ipr, netns.entered(netns.path(node["ns"])):
        sh(node["ns"], "ip", "addr", "add", "172.20.0.1/16", "dev", "eth0")
        network = VxlanNetwork(ipr, find_underlay(ipr, "eth0"))
        network.setup([node["cidr"]])
        started = time.perf_counter()
        cold = network.program_peers(everyone)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        noop = network.program_peers(everyone)
        noop_s = time.perf_counter() - started
        moved = [*everyone[:-1], PeerNode(everyone[-1].name, "172.20.255.1", everyone[-1].pod_cidrs,
                                          everyone[-1].vtep_mac)]
        started = time.perf_counter()
        change = network.program_peers(moved)
        change_s = time.perf_counter() - started
    assert cold.added == 3 * peers and not noop.added + noop.changed + noop.removed and change.changed == 1
    return {"peers": peers, "cold_s": cold_s, "noop_resync_s": noop_s, "one_change_s": change_s,
            "noop_over_cold": noop_s / cold_s, "one_change_over_cold": change_s / cold_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="iperf3 duration per run")
    parser.add_argument("--rounds", type=int, default=5, help="paired baseline/pod runs per mode")
    parser.add_argument("--peers", type=int, default=1000, help="synthetic nodes for the sync cost")
    args = parser.parse_args()
    bed = Testbed(f"nb{secrets.token_hex(3)}")
    try:
        results = {mode: throughput(bed, mode, args.seconds, args.rounds) for mode in ("vxlan", "routes")}
        results["control_plane"] = control_plane(bed, args.peers)
    finally:
        bed.close()
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs); medians of {args.rounds} paired rounds")
    print(f"{'mode':8} {'underlay Gbit/s':>16} {'pod->pod Gbit/s':>16} {'ratio':>7} target")
    for mode, target in (("vxlan", 0.85), ("routes", 0.95)):
        r = results[mode]
        print(f"{mode:8} {r['underlay_gbps']:16.2f} {r['pod_gbps']:16.2f} {r['ratio']:7.3f} >= {target}")
    cp = results["control_plane"]
    print(f"vxlan sync, {cp['peers']} nodes: cold {cp['cold_s'] * 1000:.0f} ms; no-op resync "
          f"{cp['noop_resync_s'] * 1000:.0f} ms ({cp['noop_over_cold']:.3f} of cold); one node changed "
          f"{cp['one_change_s'] * 1000:.0f} ms ({cp['one_change_over_cold']:.3f} of cold)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
