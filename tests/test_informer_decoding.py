"""One object the client cannot decode never stops a watch: the informer decodes each object on its
own, leaves the bad one out (logged once, counted) and keeps every other object flowing; a list or
watch the API server keeps refusing shows in /healthz and /metrics. Driven against the lab API
server through the official client. Malformed objects are written into the server's store directly,
as objects another API server version (or a bug) left in its storage would be."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, generate_latest
from test_agent import node_body, wait_for

from netagent.health import SyncTracker
from netagent.kube import Informer, load_api_client

apiserver = pytest.importorskip("netns_lab.apiserver.server")

# each is an object the client's models refuse, next to what a healthy one has
UNDECODABLE_NODES = {
    "garbage-deletion-timestamp": {"metadata": {"deletionTimestamp": "garbage"}},
    "address-not-a-string": {"status": {"addresses": [{"type": "InternalIP", "address": 5}]}},
    "pod-cidrs-not-a-list": {"spec": {"podCIDRs": "10.0.0.0/24"}},
}


def store_directly(server, name: str, extra: dict) -> None:
    """Write a node into the API server's storage past its validation (create, or replace)."""
    body = node_body(name)
    for key, value in extra.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    store = server.store
    with store.lock:
        current = store.find("nodes", "", name)
        if current is None:
            store.create("nodes", body)
        else:
            kept = {k: current["metadata"][k] for k in ("uid", "resourceVersion", "creationTimestamp")}
            body["metadata"] = {**kept, **body["metadata"]}
            store.update("nodes", body)


@pytest.fixture
def informer(core) -> Iterator[tuple[Informer, list[tuple[str, str]]]]:
    events: list[tuple[str, str]] = []
    informer = Informer("nodes", core.list_node)
    informer.add_handler(lambda kind, obj, old: events.append((kind, obj.metadata.name)))
    yield informer, events
    informer.stop()


@pytest.mark.parametrize("case", sorted(UNDECODABLE_NODES))
def test_an_undecodable_object_in_the_list_is_left_out_and_every_other_keeps_flowing(
    api_server, core, informer, case
):
    informer, events = informer
    core.create_node(node_body("good"))
    store_directly(api_server, "bad", UNDECODABLE_NODES[case])
    informer.start()
    assert informer.wait_for_sync(30)
    assert informer.store.keys() == ["good"]
    assert list(informer.invalid) == ["bad"]
    core.create_node(node_body("later"))  # the watch still delivers
    wait_for(lambda: informer.store.get("later"), 30, "a node created after the bad one")
    store_directly(api_server, "bad", {})  # repaired
    wait_for(lambda: informer.store.get("bad"), 30, "the repaired node")
    assert not informer.invalid
    assert events == [("ADDED", "good"), ("ADDED", "later"), ("ADDED", "bad")]
    assert informer.failing_since is None


def test_an_object_that_turns_undecodable_is_dropped_until_it_is_repaired(api_server, core, informer):
    informer, events = informer
    core.create_node(node_body("n", pod_cidr="10.1.0.0/24"))
    informer.start()
    assert informer.wait_for_sync(30)
    store_directly(api_server, "n", UNDECODABLE_NODES["garbage-deletion-timestamp"])  # arrives by watch
    wait_for(lambda: informer.store.get("n") is None, 30, "the undecodable version to drop the node")
    assert events == [("ADDED", "n"), ("DELETED", "n")]
    assert "deletionTimestamp" in informer.invalid["n"]
    store_directly(api_server, "n", {"metadata": {"labels": {"fixed": "yes"}}})
    wait_for(lambda: informer.store.get("n"), 30, "the repaired node")
    assert events[-1] == ("ADDED", "n")


def test_fields_and_enum_values_newer_than_the_client_decode(api_server, core, informer):
    """A newer API server serves fields this client has never heard of and enum values it does not
    list: neither may cost the object."""
    informer, _ = informer
    store_directly(api_server, "future", {
        "spec": {"podCIDR": "10.2.0.0/24", "someFutureField": {"x": 1}},
        "status": {"conditions": [{"type": "Ready", "status": "Maybe"}], "phase": "Hibernating"},
        "futureTopLevel": [1, 2, 3],
    })
    informer.start()
    assert informer.wait_for_sync(30)
    node = informer.store.get("future")
    assert node is not None and node.spec.pod_cidr == "10.2.0.0/24"
    assert node.status.conditions[0].status == "Maybe"
    assert not informer.invalid


def metric(registry: CollectorRegistry, name: str) -> str:
    return next(line for line in generate_latest(registry).decode().splitlines() if line.startswith(name))


def test_a_list_the_server_keeps_refusing_fails_healthz_and_shows_in_metrics(core):
    registry = CollectorRegistry()
    tracker = SyncTracker(registry, timeout=1.0)
    informer = Informer("nodes", core.list_node, field_selector="this is not a selector")  # 400
    tracker.watch_informer(informer)
    informer.start()
    try:
        wait_for(lambda: informer.failing_since is not None, 30, "the refused list")
        assert informer.failure_is_ours and "400" in informer.last_error
        assert metric(registry, "netagent_informer_failing") == 'netagent_informer_failing{kind="nodes"} 1.0'
        wait_for(lambda: not tracker.healthz()[0], 30, "healthz to fail")
        assert "nodes: API error 400" in tracker.healthz()[1]["watchesRefused"][0]
    finally:
        informer.stop()


def test_an_api_server_outage_shows_in_metrics_but_leaves_healthz_alone(tmp_path):
    """Every node would fail its health check at once and a load balancer would drain them all."""
    kubeconfig = str(tmp_path / "kubeconfig")
    nowhere = apiserver.Credentials(apiserver.new_token(), "")
    apiserver.write_kubeconfig(kubeconfig, "https://127.0.0.1:9", nowhere)  # nothing listens on port 9
    registry = CollectorRegistry()
    tracker = SyncTracker(registry, timeout=0.5)
    informer = Informer("nodes", client.CoreV1Api(load_api_client(kubeconfig)).list_node)
    tracker.watch_informer(informer)
    informer.start()
    try:
        wait_for(lambda: informer.failing_since is not None, 30, "the failed list")
        time.sleep(1.0)
        assert not informer.failure_is_ours
        assert metric(registry, "netagent_informer_failing") == 'netagent_informer_failing{kind="nodes"} 1.0'
        assert tracker.healthz()[0]
    finally:
        informer.stop()


def test_undecodable_objects_are_counted_in_metrics(api_server, core):
    registry = CollectorRegistry()
    tracker = SyncTracker(registry)
    store_directly(api_server, "bad", UNDECODABLE_NODES["address-not-a-string"])
    informer = Informer("nodes", core.list_node)
    tracker.watch_informer(informer)
    informer.start()
    try:
        assert informer.wait_for_sync(30)
        assert metric(registry, "netagent_informer_invalid_objects") == (
            'netagent_informer_invalid_objects{kind="nodes"} 1.0')
    finally:
        informer.stop()
