"""Packet capture on a lab link with scapy: what really crosses the underlay.

Reading routes and FDB entries back says what the kernel was told; a capture says what it did. The
tests use it to prove that vxlan mode encapsulates pod traffic (outer node IPs, UDP to the VXLAN port,
the VNI, the pod addresses inside) and that routes mode carries pod addresses unencapsulated, with
the pod's own source address preserved in both.

The sniffer runs as a child process inside the link's namespace (a raw socket belongs to the netns it
was opened in, and scapy's sniffer opens it in a thread of its own), and reports each packet as one
JSON line:

    python -m netns_lab.capture --iface br0 --filter "udp port 4789" --count 4 --timeout 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from nodekit import netns

READY = "capturing"
ECN_MASK = 3  # the low two bits of the IPv4 TOS byte


@dataclass
class Capture:
    """A running capture; `packets` is filled when the block using it ends."""

    process: subprocess.Popen
    packets: list[dict] = field(default_factory=list)


@contextmanager
def capture(netns_name: str, iface: str, bpf_filter: str, count: int,
            timeout: float = 20.0) -> Iterator[Capture]:
    """Sniff `count` packets matching `bpf_filter` on `iface` in `netns_name` while the block runs."""
    argv = [sys.executable, "-m", "netns_lab.capture", "--iface", iface, "--filter", bpf_filter,
            "--count", str(count), "--timeout", str(timeout)]
    process = subprocess.Popen(netns.exec_argv(netns_name, argv), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    handle = Capture(process)
    try:
        ready = process.stderr.readline()
        if READY not in ready:
            detail = ready + process.stderr.read()
            raise RuntimeError(f"capture on {netns_name}/{iface} did not start: {detail}")
        yield handle
        out, _ = process.communicate(timeout=timeout + 10)
        handle.packets = [json.loads(line) for line in out.splitlines() if line.strip()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def describe(packet) -> dict:  # a scapy packet
    """The fields a test asserts on, outer and (for VXLAN) inner."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.vxlan import VXLAN

    summary: dict = {}
    if IP in packet:
        summary.update(src=packet[IP].src, dst=packet[IP].dst, proto=packet[IP].proto,
                       ecn=packet[IP].tos & ECN_MASK)
    if UDP in packet:
        summary.update(dport=packet[UDP].dport)
    if VXLAN in packet:
        inner = packet[VXLAN].payload
        summary["vni"] = packet[VXLAN].vni
        if IP in inner:
            summary["inner"] = {"src": inner[IP].src, "dst": inner[IP].dst, "proto": inner[IP].proto}
            summary["inner_ecn"] = inner[IP].tos & ECN_MASK
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iface", required=True)
    parser.add_argument("--filter", required=True, help="a tcpdump (BPF) filter expression")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()

    from scapy.all import AsyncSniffer, conf
    from scapy.layers.inet import UDP
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers

    conf.verb = 0
    bind_layers(UDP, VXLAN, dport=4789)
    sniffer = AsyncSniffer(iface=args.iface, filter=args.filter, count=args.count, store=True,
                           started_callback=lambda: print(READY, file=sys.stderr, flush=True))
    sniffer.start()
    sniffer.join(timeout=args.timeout)
    if sniffer.running:
        sniffer.stop()
    for packet in sniffer.results or []:
        print(json.dumps(describe(packet)), flush=True)


if __name__ == "__main__":
    main()
