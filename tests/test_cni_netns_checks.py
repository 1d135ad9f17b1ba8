"""CNI_NETNS must name a pod's network namespace: it is checked before anything opens it for real or
enters it, without ever blocking, in one place (cni.links.open_pod on nodekit.netns.open_network)
that the exec'd plugin and the agent share. Each case runs through both."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_cni_support import CniNode, Outcome, node_on_path

from nodekit import netns

V4 = "10.73.0.0/24"
PROMPTLY = 30.0  # seconds: a call that takes longer is taken as hanging


@pytest.fixture(params=["exec", "shim"])
def node(request, make_netns, tmp_path):
    with node_on_path(request.param, make_netns, tmp_path) as cni_node:
        yield cni_node


def add_with_netns(node: CniNode, netns_path: str, container_id: str = "ctr-a") -> Outcome:
    return node.call("ADD", node.conf([V4]), container_id, env={"CNI_NETNS": netns_path}, timeout=PROMPTLY)


def assert_refused(outcome: Outcome, code: int, node: CniNode) -> dict:
    assert outcome.code != 0, outcome
    error = json.loads(outcome.stdout)
    assert error["code"] == code, error
    assert "CNI_NETNS" in error["msg"] or "netns" in error["msg"], error
    assert node.allocations() == {} and node.links() == ["lo"]  # nothing was created
    return error


def test_a_fifo_as_cni_netns_is_refused_at_once_not_waited_on(node, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    error = assert_refused(add_with_netns(node, fifo), 3, node)

    assert "not a network namespace" in error["msg"]


@pytest.mark.parametrize("kind", ["regular-file", "directory", "device", "uts-namespace"])
def test_a_path_that_is_not_a_network_namespace_is_refused(node, tmp_path, kind):
    path = {
        "regular-file": "/etc/hostname",
        "directory": str(tmp_path),
        "device": "/dev/null",
        "uts-namespace": "/proc/self/ns/uts",
    }[kind]

    assert "not a network namespace" in assert_refused(add_with_netns(node, path), 3, node)["msg"]


def test_sixteen_fifo_calls_at_once_all_get_their_error_and_the_plugin_keeps_answering(node, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(lambda i: add_with_netns(node, fifo, f"ctr-{i}"), range(20)))

    assert [json.loads(o.stdout)["code"] for o in outcomes] == [3] * 20
    version = node.call("VERSION", {"cniVersion": "1.1.0"}, timeout=PROMPTLY)
    assert version.code == 0 and version.result["cniVersion"] == "1.1.0"


def test_a_relative_cni_netns_is_refused_rather_than_resolved_against_a_working_directory(node, make_netns):
    pod = make_netns("a")
    relative = os.path.relpath(netns.path(pod))  # names the pod from the plugin's (= our) cwd

    error = assert_refused(add_with_netns(node, relative), 4, node)

    assert "absolute" in error["msg"]


@pytest.mark.parametrize("how", ["proc-self", "by-name"])
def test_the_nodes_own_namespace_is_refused_as_a_pod_namespace(node, how):
    path = {"proc-self": "/proc/self/ns/net", "by-name": netns.path(node.name)}[how]

    error = assert_refused(add_with_netns(node, path), 4, node)

    assert "node's own" in error["msg"]


@pytest.mark.parametrize("bad", ["fifo", "relative", "missing"])
def test_del_releases_the_address_whatever_cni_netns_says(node, make_netns, tmp_path, bad):
    # DEL needs no netns; refusing it for a bad one would leak the address for ever
    pod = make_netns("a")
    node.add(node.conf([V4]), "ctr-a", pod)
    os.mkfifo(tmp_path / "fifo")
    path = {"fifo": str(tmp_path / "fifo"), "relative": "run/netns/x", "missing": ""}[bad]

    outcome = node.call("DEL", node.conf([V4]), "ctr-a", env={"CNI_NETNS": path}, timeout=PROMPTLY)

    assert outcome.code == 0, outcome
    assert node.allocations() == {}
    assert node.links() == ["lo", "na0"]
