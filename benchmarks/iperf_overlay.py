"""iperf3 pod -> pod across two lab nodes vs node -> node on the underlay, in the same run.

The underlay baseline is the same two node namespaces talking over the same bridge without the pod
network in between, so the ratio is the cost of the pod path alone (veth + bridge in each node, plus
VXLAN encapsulation or a plain route). Runs are interleaved (baseline, pod, baseline, pod, ...) so a
noisy neighbour on this shared machine hits both sides alike.

    .venv/bin/python benchmarks/iperf_overlay.py [--modes vxlan,routes] [--seconds 5] [--rounds 3]
        [--fast-path] [--cpus CLIENT,SERVER]

Targets (issue 3): vxlan >= 0.85 of the baseline, routes >= 0.95. The verdict uses the ratio of the
medians; the ratio of the best runs is printed too, as the shared machine's load moves both a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from netns_lab import cluster, pods, processes
from netns_lab.state import Lab, NodeInfo, PodInfo

from nodekit import netns

TARGETS = {"vxlan": 0.85, "routes": 0.95}
IPERF_PORT = 5201


def iperf(client_netns: str, server_netns: str, server_ip: str, seconds: int, log: str,
          cpus: tuple[int, int] | None = None) -> float:
    """One TCP stream for `seconds` (after 1 s of slow start, omitted); the receiver's bits per second.
    cpus: (client's, server's) to pin them to; None leaves placement to the scheduler."""
    client_pin, server_pin = (["taskset", "-c", str(cpu)] for cpu in cpus) if cpus else ([], [])
    server_argv = [*server_pin, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)]
    server = processes.spawn(netns.exec_argv(server_netns, server_argv), log)
    try:
        for _ in range(50):  # until the server listens
            argv = [*client_pin, "iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds),
                    "-O", "1", "-J"]
            report = json.loads(netns.run(client_netns, argv, check=False).stdout or "{}")
            if "sum_received" in report.get("end", {}):
                return report["end"]["sum_received"]["bits_per_second"]
            if "refused" not in report.get("error", ""):
                raise RuntimeError(f"iperf3 failed: {report.get('error', report)}")
            time.sleep(0.1)
        raise RuntimeError("iperf3 server never listened")
    finally:
        processes.stop([server])


@dataclass(frozen=True)
class PodPair:
    """A 2-node lab with pod `src` on n1 and `dst` on n2."""
    n1: NodeInfo
    n2: NodeInfo
    src: PodInfo
    dst: PodInfo
    log: str  # where the iperf3 servers write

    def rounds(self, count: int, seconds: int,
               cpus: tuple[int, int] | None = None) -> tuple[list[float], list[float]]:
        """Interleaved node->node and pod->pod runs: their bits per second."""
        underlay, pod_path = [], []
        for _ in range(count):
            underlay.append(iperf(self.n1.netns, self.n2.netns, self.n2.ip, seconds, self.log, cpus))
            pod_path.append(iperf(self.src.netns, self.dst.netns, self.dst.ips[0], seconds, self.log, cpus))
        return underlay, pod_path


@contextmanager
def pod_pair_lab(name: str, mode: str, fast_path: bool) -> Iterator[PodPair]:
    """Up for the block, then down (also when it fails)."""
    lab = Lab(name)
    cluster.down(name, progress=lambda _m: None)
    cluster.up(name, nodes=2, network=mode, proxy="none", progress=lambda _m: None, fast_path=fast_path)
    try:
        pods.create(lab, "src", "n1", {})
        pods.create(lab, "dst", "n2", {})
        state = lab.load()
        if fast_path:  # attached within the agents' poll interval of the pods' creation
            time.sleep(3)
        yield PodPair(state.nodes["n1"], state.nodes["n2"], state.pods["src"], state.pods["dst"],
                      os.path.join(lab.dir, "iperf.log"))
    finally:
        cluster.down(name, progress=lambda _m: None)


def measure(mode: str, seconds: int, rounds: int, fast_path: bool,
            cpus: tuple[int, int] | None = None) -> tuple[list[float], list[float]]:
    with pod_pair_lab(f"bip{mode[:2]}", mode, fast_path) as pair:
        return pair.rounds(rounds, seconds, cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="vxlan,routes")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast-path", action="store_true", help="agents run with --fast-path (tc BPF)")
    parser.add_argument("--cpus", help="CLIENT,SERVER: pin iperf3's client and server to these CPUs "
                        "(both paths alike); the default leaves placement to the scheduler")
    args = parser.parse_args()
    print(f"{'mode':<8} {'underlay Gbit/s':>16} {'pod->pod Gbit/s':>16} {'ratio':>7} {'best/best':>10} "
          f"{'target':>7}")
    for mode in args.modes.split(","):
        cpus = tuple(int(cpu) for cpu in args.cpus.split(",")) if args.cpus else None
        underlay, pod_path = measure(mode, args.seconds, args.rounds, args.fast_path, cpus)
        base, pod = statistics.median(underlay), statistics.median(pod_path)
        ratio = pod / base
        best_ratio = max(pod_path) / max(underlay)  # less sensitive to neighbours stealing CPU
        verdict = "ok" if ratio >= TARGETS[mode] else "BELOW"
        print(f"{mode:<8} {base / 1e9:>16.2f} {pod / 1e9:>16.2f} {ratio:>7.2f} {best_ratio:>10.2f} "
              f"{TARGETS[mode]:>7.2f} {verdict}   (medians of {args.rounds} x {args.seconds}s"
              f"{', fast path' if args.fast_path else ''}{f', cpus {args.cpus}' if args.cpus else ''})")

if __name__ == "__main__":
    main()
