"""Many plugin runs at once never hand one address to two containers, and a plugin killed at any
instant leaves each allocation complete or absent."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from test_cni_support import REFERENCE_PLUGINS, compile_shim, make_node, running_service

from nodekit import netns

SUBNET = "10.75.0.0/22"  # room for a few hundred pods


def test_100_concurrent_adds_get_distinct_addresses_and_dels_leave_nothing(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    socket_path = os.path.join(str(tmp_path), "state", "cni.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]
    conf = node.conf([SUBNET])
    pods = [make_netns(f"p{i}") for i in range(100)]

    with running_service(node.name, socket_path), ThreadPoolExecutor(max_workers=100) as pool:
        adds = list(pool.map(lambda i: node.call("ADD", conf, f"ctr-{i}", pods[i]), range(100)))
        assert [a.code for a in adds] == [0] * 100, [a for a in adds if a.code][:3]
        addresses = [a.result["ips"][0]["address"] for a in adds]
        assert len(set(addresses)) == 100
        assert len(node.allocations()) == 100
        assert len(node.links()) == 102  # lo, the bridge, 100 host veths

        dels = list(pool.map(lambda i: node.call("DEL", conf, f"ctr-{i}", pods[i]), range(100)))
        assert [d.code for d in dels] == [0] * 100

    assert node.allocations() == {}
    assert node.links() == ["lo", "na0"]


def test_concurrent_exec_plugins_share_the_pool_safely(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    conf = node.conf([SUBNET])
    pods = [make_netns(f"p{i}") for i in range(16)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        adds = list(pool.map(lambda i: node.call("ADD", conf, f"ctr-{i}", pods[i]), range(16)))
    assert [a.code for a in adds] == [0] * 16
    assert len({a.result["ips"][0]["address"] for a in adds}) == 16


def test_kill_9_during_add_leaves_each_allocation_complete_or_absent(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    conf = node.conf([SUBNET])
    # how long a whole ADD takes here, so the kills land across its whole duration
    started = time.monotonic()
    node.add(conf, "warmup", make_netns("warm"))
    full_add = time.monotonic() - started
    rng = random.Random(1234)
    killed = []

    for i in range(12):
        pod = make_netns(f"k{i}")
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"killed-{i}",
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": netns.path(pod),
            "CNI_PATH": REFERENCE_PLUGINS,
        }
        proc = subprocess.Popen(
            netns.exec_argv(node.name, node.plugin),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.3, 1.1) * full_add)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed.append((f"killed-{i}", pod))

    complete = re.compile(r"^(warmup|killed-\d+)\neth0\n$")
    allocations = node.allocations()
    assert all(complete.match(content) for content in allocations.values()), allocations
    assert len(set(allocations.values())) == len(allocations)  # no owner holds two addresses

    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "warmup", "ifname": "eth0"}]}
    assert node.call("GC", gc_conf).code == 0
    assert [c.split()[0] for c in node.allocations().values()] == ["warmup"]
    for container_id, pod in killed:  # what the runtime does after a failed ADD
        assert node.call("DEL", conf, container_id, pod).code == 0
    assert len(node.links()) == 3  # lo, the bridge, the warmup pod's veth
