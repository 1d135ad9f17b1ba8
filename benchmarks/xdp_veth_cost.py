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
import statistics

from iperf_overlay import pod_pair_lab

from nodekit import netns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from bcc import BPF  # Debian's python3-bpfcc, exposed to the venv by bootstrap

    with pod_pair_lab("bxdp", "vxlan", fast_path=True) as pair:

        def medians() -> tuple[float, float]:
            underlay, pod_path = pair.rounds(args.rounds, args.seconds)
            return statistics.median(underlay), statistics.median(pod_path)

        before = medians()
        bpf = BPF(text="int pass(struct xdp_md *ctx) { return XDP_PASS; }")
        program = bpf.load_func(b"pass", BPF.XDP)
        with netns.entered(netns.path(pair.n2.netns)):
            BPF.attach_xdp(b"eth0", program, BPF.XDP_FLAGS_DRV_MODE)
        after = medians()
    print(f"{'XDP on n2 eth0':<16} {'node->node Gbit/s':>18} {'pod->pod Gbit/s':>16} {'ratio':>6}")
    for label, (underlay, pod_path) in (("none", before), ("no-op XDP_PASS", after)):
        print(f"{label:<16} {underlay / 1e9:>18.2f} {pod_path / 1e9:>16.2f} {pod_path / underlay:>6.2f}")
    print(f"node->node with XDP / without: {after[0] / before[0]:.2f}   "
          f"(medians of {args.rounds} x {args.seconds}s, vxlan, fast path)")


if __name__ == "__main__":
    main()
