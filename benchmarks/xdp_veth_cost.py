"""What an XDP program on a lab node's underlay veth costs, before it does anything.

An XDP decapsulator (strip VXLAN per frame before GRO, so the inner packets aggregate as plain TCP and
no tunnel GSO state is left behind) is the usual way around kernels whose bpf_skb_adjust_room() cannot
reset that state (see `netagent doctor`). This measures whether it can work in the lab: a no-op
XDP_PASS program is attached in native mode to n2's eth0, and node->node and pod->pod iperf3 are
measured before and after, in the same lab and run. A veth with an XDP program takes GSO away from its
peer, so every packet reaching it is segmented on the underlay bridge first.

    .venv/bin/python benchmarks/xdp_veth_cost.py [--seconds 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from iperf_overlay import iperf
from netns_lab import cluster, pods
from netns_lab.state import Lab

from netagent import netns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from bcc import BPF  # Debian's python3-bpfcc, exposed to the venv by bootstrap

    name = "bxdp"
    lab = Lab(name)
    cluster.down(name, progress=lambda _m: None)
    cluster.up(name, nodes=2, network="vxlan", proxy="none", progress=lambda _m: None, fast_path=True)
    try:
        pods.create(lab, "src", "n1", {})
        pods.create(lab, "dst", "n2", {})
        state = lab.load()
        n1, n2, src, dst = state.nodes["n1"], state.nodes["n2"], state.pods["src"], state.pods["dst"]
        log = os.path.join(lab.dir, "iperf.log")
        time.sleep(3)  # the fast path attaches within the agents' poll interval

        def medians() -> tuple[float, float]:
            underlay, pod_path = [], []
            for _ in range(args.rounds):
                underlay.append(iperf(n1.netns, n2.netns, n2.ip, args.seconds, log))
                pod_path.append(iperf(src.netns, dst.netns, dst.ips[0], args.seconds, log))
            return statistics.median(underlay), statistics.median(pod_path)

        before = medians()
        bpf = BPF(text="int pass(struct xdp_md *ctx) { return XDP_PASS; }")
        program = bpf.load_func(b"pass", BPF.XDP)
        with netns.entered(netns.path(n2.netns)):
            BPF.attach_xdp(b"eth0", program, BPF.XDP_FLAGS_DRV_MODE)
        after = medians()
        print(f"{'XDP on n2 eth0':<16} {'node->node Gbit/s':>18} {'pod->pod Gbit/s':>16} {'ratio':>6}")
        for label, (underlay, pod_path) in (("none", before), ("no-op XDP_PASS", after)):
            print(f"{label:<16} {underlay / 1e9:>18.2f} {pod_path / 1e9:>16.2f} {pod_path / underlay:>6.2f}")
        print(f"node->node with XDP / without: {after[0] / before[0]:.2f}   "
              f"(medians of {args.rounds} x {args.seconds}s, vxlan, fast path)")
    finally:
        cluster.down(name, progress=lambda _m: None)


if __name__ == "__main__":
    main()
