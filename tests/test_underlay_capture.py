"""What crosses the underlay, captured with scapy on the lab's underlay bridge: vxlan mode carries pod
packets inside VXLAN between the node addresses, routes mode carries them as they are; in both the
pod's own source address arrives intact (no masquerade inside the cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns_lab import cluster, pods, probe
from netns_lab.capture import capture
from netns_lab.responder import DEFAULT_PORT
from netns_lab.state import Lab, LabState
from netns_lab.topology import UNDERLAY_BRIDGE

UDP = 17
VXLAN_PORT = 4789
PACKETS = 2  # the probe's request and the reply


@pytest.fixture(params=["vxlan", "routes"])
def two_node_lab(request, prefix: str) -> Iterator[LabState]:
    lab = Lab(prefix)
    try:
        cluster.up(prefix, nodes=2, network=request.param, progress=lambda _msg: None)
        pods.create(lab, "a", "n1", {})
        pods.create(lab, "b", "n2", {})
        yield lab.load()
    finally:
        cluster.down(prefix, progress=lambda _msg: None)


def test_pod_traffic_on_the_underlay_is_encapsulated_in_vxlan_mode_and_plain_in_routes_mode(two_node_lab):
    state = two_node_lab
    a, b = state.pods["a"], state.pods["b"]
    n1, n2 = state.nodes["n1"], state.nodes["n2"]
    underlay = Lab(state.name).underlay_netns

    if state.network == "vxlan":
        bpf = f"udp dst port {VXLAN_PORT}"
    else:
        bpf = f"udp and host {a.ips[0]} and host {b.ips[0]}"
    with capture(underlay, UNDERLAY_BRIDGE, bpf, count=PACKETS) as seen:
        assert probe.udp_name(a.netns, b.ips[0], DEFAULT_PORT) == "b"

    assert len(seen.packets) == PACKETS, seen.packets
    request, reply = seen.packets
    if state.network == "vxlan":
        assert (request["src"], request["dst"], request["dport"]) == (n1.ip, n2.ip, VXLAN_PORT)
        assert (reply["src"], reply["dst"]) == (n2.ip, n1.ip)
        assert request["vni"] == reply["vni"] == 1
        assert request["inner"] == {"src": a.ips[0], "dst": b.ips[0], "proto": UDP}
        assert reply["inner"] == {"src": b.ips[0], "dst": a.ips[0], "proto": UDP}
    else:
        assert "vni" not in request
        assert (request["src"], request["dst"], request["proto"]) == (a.ips[0], b.ips[0], UDP)
        assert (reply["src"], reply["dst"]) == (b.ips[0], a.ips[0])
