"""netagent first in a chain with Debian's reference plugins, as the installed conflist runs it:
netagent, then portmap (hostPort), then bandwidth. Each plugin gets the previous one's result."""

from __future__ import annotations

import json
import os

from test_cni_support import REFERENCE_PLUGINS, make_node, tcp_reaches

from nodekit import netns

# the reference plugins (containernetworking-plugins 1.1.1) speak up to CNI 1.0.0
VERSION = "1.0.0"
HOST_PORT, CONTAINER_PORT = 8080, 80


def test_host_port_reaches_the_pod_through_portmap_and_bandwidth(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    pod = make_netns("a")
    base = {"cniVersion": VERSION, "name": "testnet"}
    chain = [
        node.conf(["10.74.0.0/24"], version=VERSION),
        {
            **base,
            "type": "portmap",
            "capabilities": {"portMappings": True},
            "runtimeConfig": {
                "portMappings": [{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]
            },
        },
        {
            **base,
            "type": "bandwidth",
            "capabilities": {"bandwidth": True},
            "runtimeConfig": {
                "bandwidth": {
                    "ingressRate": 100_000_000,
                    "ingressBurst": 1_000_000,
                    "egressRate": 100_000_000,
                    "egressBurst": 1_000_000,
                }
            },
        },
    ]

    result = None
    for conf in chain:
        stdin = {**conf, "prevResult": result} if result else conf
        outcome = node.call("ADD", stdin, "ctr-a", pod, plugin=plugin_argv(conf))
        assert outcome.code == 0, outcome
        result = outcome.result
    pod_ip = result["ips"][0]["address"].split("/")[0]
    node_ip = result["ips"][0]["gateway"]

    assert tcp_reaches(node.name, pod, node_ip, HOST_PORT, listen=(pod_ip, CONTAINER_PORT))
    # the pod reaching itself through its own hostPort leaves and re-enters by the same bridge port
    assert tcp_reaches(pod, pod, node_ip, HOST_PORT, listen=(pod_ip, CONTAINER_PORT)), "hairpin"
    host_veth = result["interfaces"][1]["name"]
    qdiscs = json.loads(netns.run(node.name, ["tc", "-j", "qdisc", "show", "dev", host_veth]).stdout)
    assert any(q["kind"] == "tbf" for q in qdiscs)  # bandwidth shaped the pod's host veth

    for conf in reversed(chain):  # DEL runs the chain backwards, each with the final result
        outcome = node.call("DEL", {**conf, "prevResult": result}, "ctr-a", pod, plugin=plugin_argv(conf))
        assert outcome.code == 0, outcome
    assert not tcp_reaches(node.name, pod, node_ip, HOST_PORT, listen=("0.0.0.0", CONTAINER_PORT))
    assert node.allocations() == {}


def plugin_argv(conf: dict) -> list[str] | None:
    """The reference plugin's binary; None means the node's own netagent plugin."""
    return None if conf["type"] == "netagent" else [os.path.join(REFERENCE_PLUGINS, conf["type"])]
