"""The service model and the shared diff: pure functions, no kernel needed."""

from __future__ import annotations

import logging

import pytest
from kubernetes import client

from netagent.proxy.ruleset import RuleSet, diff
from netagent.proxy.service import Endpoint, Snapshot
from netagent.proxy.snapshot_builder import SnapshotBuilder, build_snapshot

NODE = "node-a"


def svc(name: str = "web", **spec: object) -> dict:
    base = {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    return {"metadata": {"namespace": "default", "name": name}, "spec": {**base, **spec}}


def es(
    endpoints: list[dict], port: int = 8080, family: int = 4, name: str = "web-a", port_name: str = "http"
) -> dict:
    return {
        "metadata": {"namespace": "default", "name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": f"IPv{family}",
        "ports": [{"name": port_name, "port": port}],
        "endpoints": endpoints,
    }


def ep(ip: str, node: str = NODE, **conditions: bool) -> dict:
    return {"addresses": [ip], "nodeName": node, "conditions": conditions}


def only_port(snapshot: Snapshot):
    assert len(snapshot.ports) == 1, snapshot
    return snapshot.ports[0]


def test_headless_and_external_name_services_are_skipped_silently() -> None:
    snapshot = build_snapshot(
        [svc(clusterIP="None"), svc("ext", type="ExternalName", clusterIP="")], [], NODE
    )
    assert snapshot == Snapshot()
    assert snapshot.skipped == ()


def test_named_target_port_is_taken_per_endpoint_from_its_slice() -> None:
    slices = [es([ep("10.244.0.10")], port=8080, name="a"), es([ep("10.244.0.11")], port=9090, name="b")]
    port = only_port(build_snapshot([svc()], slices, NODE))
    assert {(e.ip, e.port) for e in port.cluster_endpoints} == {("10.244.0.10", 8080), ("10.244.0.11", 9090)}


def test_ready_endpoints_win_and_serving_terminating_ones_are_the_fallback() -> None:
    leaving = ep("10.244.0.10", ready=False, serving=True, terminating=True)
    gone = ep("10.244.0.12", ready=False, serving=False, terminating=True)
    port = only_port(build_snapshot([svc()], [es([leaving, gone, ep("10.244.0.11")])], NODE))
    assert [e.ip for e in port.cluster_endpoints] == ["10.244.0.11"]
    port = only_port(build_snapshot([svc()], [es([leaving, gone])], NODE))
    assert [e.ip for e in port.cluster_endpoints] == ["10.244.0.10"]


def test_external_traffic_policy_local_keeps_only_local_endpoints_for_external_traffic() -> None:
    slices = [es([ep("10.244.0.10"), ep("10.244.1.10", node="node-b")])]
    port = only_port(
        build_snapshot(
            [
                svc(
                    type="NodePort",
                    externalTrafficPolicy="Local",
                    healthCheckNodePort=32000,
                    ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                )
            ],
            slices,
            NODE,
        )
    )
    assert [e.ip for e in port.external_endpoints] == ["10.244.0.10"]
    assert len(port.cluster_endpoints) == 2
    assert (port.node_port, port.health_check_node_port) == (30080, 32000)


def test_internal_traffic_policy_local_keeps_only_local_endpoints_for_cluster_traffic() -> None:
    slices = [es([ep("10.244.0.10"), ep("10.244.1.10", node="node-b")])]
    port = only_port(build_snapshot([svc(internalTrafficPolicy="Local")], slices, NODE))
    assert [e.ip for e in port.cluster_endpoints] == ["10.244.0.10"]


def test_dual_stack_service_becomes_one_port_per_family_with_that_familys_endpoints() -> None:
    service = svc(clusterIPs=["10.96.0.10", "fd00:96::10"], externalIPs=["192.168.60.5", "2001:db8::5"])
    slices = [es([ep("10.244.0.10")]), es([ep("fd00:244::10")], family=6, name="web-b")]
    v4, v6 = build_snapshot([service], slices, NODE).ports
    assert (v4.family, v4.cluster_ip, v4.external_ips, v4.cluster_endpoints[0].ip) == (
        4,
        "10.96.0.10",
        ("192.168.60.5",),
        "10.244.0.10",
    )
    assert (v6.family, v6.cluster_ip, v6.external_ips, v6.cluster_endpoints[0].address) == (
        6,
        "fd00:96::10",
        ("2001:db8::5",),
        "[fd00:244::10]:8080",
    )


def test_load_balancer_ingress_ips_and_affinity_are_read() -> None:
    service = {
        **svc(
            type="LoadBalancer",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        ),
        "status": {"loadBalancer": {"ingress": [{"ip": "192.168.70.5"}, {"hostname": "lb.example"}]}},
    }
    port = only_port(build_snapshot([service], [], NODE))
    assert (port.external_ips, port.affinity_timeout) == (("192.168.70.5",), 60)


@pytest.mark.parametrize(
    "broken_spec, reason",
    [
        ({"ports": [{"port": 70000}]}, "port 70000"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "unsupported protocol"),
        ({"clusterIP": "10.96.0.300"}, "invalid IP address"),
        ({"externalIPs": ["nope"]}, "invalid IP address"),
        ({"type": "NodePort", "ports": [{"port": 80, "nodePort": "30080"}]}, "nodePort"),
    ],
)
def test_malformed_service_is_logged_and_skipped_and_others_survive(
    broken_spec: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    snapshot = build_snapshot([svc("broken", **broken_spec), svc()], [es([ep("10.244.0.10")])], NODE)
    assert [p.name for p in snapshot.ports] == ["web"]
    assert len(snapshot.skipped) == 1 and snapshot.skipped[0].startswith("default/broken: ")
    assert reason in snapshot.skipped[0]
    assert "default/broken" in caplog.text


def test_official_client_objects_are_accepted_like_json() -> None:
    service = client.V1Service(
        metadata=client.V1ObjectMeta(namespace="default", name="web"),
        spec=client.V1ServiceSpec(
            cluster_ip="10.96.0.10", ports=[client.V1ServicePort(name="http", port=80)]
        ),
    )
    endpoint_slice = client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(
            namespace="default", name="web-a", labels={"kubernetes.io/service-name": "web"}
        ),
        ports=[client.DiscoveryV1EndpointPort(name="http", port=8080)],
        endpoints=[
            client.V1Endpoint(
                addresses=["10.244.0.10"], node_name=NODE, conditions=client.V1EndpointConditions(ready=True)
            )
        ],
    )
    from_objects = build_snapshot([service], [endpoint_slice], NODE)
    assert from_objects == build_snapshot([svc()], [es([ep("10.244.0.10", ready=True)])], NODE)


def owned_slice(service: str, name: str, ip: str) -> dict:
    slice_ = es([ep(ip)], name=name)
    slice_["metadata"]["labels"] = {"kubernetes.io/service-name": service}
    return slice_


def endpoints_by_service(snapshot: Snapshot) -> dict[str, list[str]]:
    return {p.name: [e.ip for e in p.cluster_endpoints] for p in snapshot.ports}


def test_events_fed_one_by_one_give_the_snapshot_of_the_lists_they_add_up_to() -> None:
    builder = SnapshotBuilder(NODE)
    for name, ip in (("web", "10.96.0.10"), ("api", "10.96.0.11"), ("db", "10.96.0.12")):
        builder.service_changed(svc(name, clusterIP=ip))
    builder.slice_changed(owned_slice("web", "web-a", "10.244.0.10"))
    builder.slice_changed(owned_slice("api", "api-a", "10.244.0.20"))
    builder.snapshot()

    moved = owned_slice("db", "web-a", "10.244.0.30")  # relabelled: now belongs to db, not web
    builder.slice_changed(moved)
    builder.service_changed(svc("api", clusterIP="10.96.0.11"), deleted=True)
    builder.service_changed(svc("cache", clusterIP="10.96.0.13"))
    incremental = builder.snapshot()

    services = [svc("web", clusterIP="10.96.0.10"), svc("db", clusterIP="10.96.0.12"),
                svc("cache", clusterIP="10.96.0.13")]
    assert incremental == build_snapshot(services, [moved, owned_slice("api", "api-a", "10.244.0.20")], NODE)
    assert endpoints_by_service(incremental) == {"cache": [], "db": ["10.244.0.30"], "web": []}


def test_a_snapshot_rebuilds_only_the_services_whose_objects_changed() -> None:
    builder = SnapshotBuilder(NODE)
    web, api = svc("web", clusterIP="10.96.0.10"), svc("api", clusterIP="10.96.0.11")
    first = builder.build([web, api], [owned_slice("web", "web-a", "10.244.0.10")])
    second = builder.build([web, api], [owned_slice("web", "web-a", "10.244.0.11")])
    unchanged_api = [p for p in first.ports if p.name == "api"][0]
    assert [p for p in second.ports if p.name == "api"][0] is unchanged_api  # reused, not rebuilt
    assert endpoints_by_service(second)["web"] == ["10.244.0.11"]


def test_a_malformed_service_is_logged_once_per_change_not_once_per_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    builder = SnapshotBuilder(NODE)
    builder.service_changed(svc("broken", clusterIP="10.96.0.300"))
    assert len(builder.snapshot().skipped) == len(builder.snapshot().skipped) == 1
    assert caplog.text.count("default/broken") == 1
    builder.service_changed(svc("broken", clusterIP="10.96.0.30"))  # fixed
    assert builder.snapshot().skipped == () and [p.name for p in builder.snapshot().ports] == ["broken"]


def test_snapshot_survives_a_round_trip_through_json_data() -> None:
    snapshot = build_snapshot([svc(externalIPs=["192.168.60.5"])], [es([ep("10.244.0.10")])], NODE)
    assert Snapshot.from_dict(snapshot.to_dict()) == snapshot
    assert isinstance(Snapshot.from_dict(snapshot.to_dict()).ports[0].cluster_endpoints[0], Endpoint)


def test_diff_rewrites_unknown_chains_and_touches_only_what_changed() -> None:
    applied = RuleSet(chains={"a": ("x",), "b": ("y",), "gone": ("z",)}, elements={("m", "k1"): "v1"})
    desired = RuleSet(chains={"a": ("x",), "b": ("y2",), "new": ()}, elements={("m", "k1"): "v2"})
    changes = diff(applied, desired)
    assert (changes.chains.added, changes.chains.changed, changes.chains.removed) == (
        ("new",),
        ("b",),
        ("gone",),
    )
    assert changes.elements.changed == (("m", "k1"),)
    after_restart = RuleSet(chains={"a": None, "b": None})  # present in the kernel, content unknown
    assert diff(after_restart, desired).chains.changed == ("a", "b")
    assert not diff(desired, desired)


def test_incremental_render_matches_a_full_merge_and_keeps_shared_keys() -> None:
    from netagent.proxy.backend import NodeContext
    from netagent.proxy.nftables import HAIRPIN, NftablesBackend

    backend = NftablesBackend(NodeContext(NODE, ("10.244.0.0/16",)))

    def render(endpoints_a: list[str], endpoints_b: list[str]) -> RuleSet:
        services = [svc("web"), svc("api", clusterIP="10.96.0.11")]
        slices = [es([ep(ip) for ip in endpoints_a])]
        slices.append(dict(es([ep(ip) for ip in endpoints_b], name="api-a")))
        slices[1]["metadata"] = {**slices[1]["metadata"], "labels": {"kubernetes.io/service-name": "api"}}
        rendered = backend.render(build_snapshot(services, slices, NODE).ports)
        rendered = RuleSet(dict(rendered.chains), dict(rendered.objects), dict(rendered.elements))
        chains, objects, elements = backend._merge(list(backend._fragments.values()))  # the full merge
        assert rendered == RuleSet(
            chains={**chains, **backend.fixed_chains(backend._shared)},
            objects={**objects, **backend.fixed_objects()},
            elements=elements,
        )
        return rendered

    first = render(["10.244.0.10", "10.244.0.11"], ["10.244.0.10"])
    changed = render(["10.244.0.12", "10.244.0.11"], ["10.244.0.10"])  # same count: slots reused
    assert (HAIRPIN, "10.244.0.10 . 10.244.0.10") in changed.elements  # api still uses it
    changes = diff(first, changed, backend._dirty)
    assert changes.elements and not changes.chains and not changes.objects  # an element-only change
    assert changes == diff(first, changed) == diff(backend._before, changed, backend._dirty)
    gone = render(["10.244.0.12", "10.244.0.11"], ["10.244.0.13"])
    assert (HAIRPIN, "10.244.0.10 . 10.244.0.10") not in gone.elements


def test_a_service_repeating_a_port_is_skipped_as_the_api_server_would_refuse_it() -> None:
    port = {"name": "http", "port": 80, "targetPort": "http"}
    snapshot = build_snapshot([svc(ports=[port, dict(port)]), svc("ok")], [], NODE)
    assert [p.name for p in snapshot.ports] == ["ok"]
    assert snapshot.skipped == ("default/web: duplicate port http/TCP",)


# each is a field the client's typed models refuse; as JSON the parser must check it itself
MALFORMED_SERVICES = {
    "port-name-not-a-string": {"ports": [{"name": 5, "port": 80}]},
    "external-ip-not-an-address": {"externalIPs": ["x"]},
    "external-ips-not-a-list": {"externalIPs": "10.0.0.1"},
    "affinity-config-not-an-object": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": 5},
    "cluster-ip-not-a-string": {"clusterIP": 5, "clusterIPs": None},
    "port-not-an-integer": {"ports": [{"name": "http", "port": "80"}]},
    "ports-not-a-list": {"ports": {"name": "http"}},
    "spec-not-an-object": None,
    "cluster-ip-with-a-lone-surrogate": {"clusterIP": "10.96.0.\udfff", "clusterIPs": None},
    "external-ip-with-a-nul": {"externalIPs": ["10.0.0.1\x00"]},
    "port-name-ending-in-a-newline": {"ports": [{"name": "http\n", "port": 80}]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SERVICES))
def test_a_malformed_service_is_skipped_with_its_reason_and_the_others_are_built(case: str) -> None:
    bad = svc("bad") if MALFORMED_SERVICES[case] is not None else {"metadata": svc("bad")["metadata"],
                                                                      "spec": "x"}
    bad["spec"] = {**bad["spec"], **MALFORMED_SERVICES[case]} if MALFORMED_SERVICES[case] else bad["spec"]
    snapshot = build_snapshot([bad, svc()], [es([ep("10.244.0.10")])], NODE)
    assert [p.name for p in snapshot.ports] == ["web"]
    assert len(snapshot.skipped) == 1 and snapshot.skipped[0].startswith("default/bad: ")


MALFORMED_SLICES = {
    "no-address-type": lambda s: s.pop("addressType"),
    "address-not-a-string": lambda s: s["endpoints"][0].update(addresses=[5]),
    "ready-not-a-bool": lambda s: s["endpoints"][0]["conditions"].update(ready="yes"),
    "port-zero": lambda s: s["ports"][0].update(port=0),
    "endpoints-not-a-list": lambda s: s.update(endpoints={"addresses": ["10.244.0.12"]}),
    "address-of-the-other-family": lambda s: s["endpoints"][0].update(addresses=["fd00::12"]),
    "address-with-a-lone-surrogate": lambda s: s["endpoints"][0].update(addresses=["10.244.0.\udfff"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SLICES))
def test_a_malformed_slice_is_left_out_and_its_service_keeps_its_good_slices(case: str) -> None:
    """Even a slice that only claims to be the Service's (a foreign one labelled with its name)."""
    bad = es([ep("10.244.0.12", ready=True)], name="intruder")
    MALFORMED_SLICES[case](bad)
    port = only_port(build_snapshot([svc()], [es([ep("10.244.0.10")]), bad], NODE))
    assert [e.ip for e in port.cluster_endpoints] == ["10.244.0.10"]
    snapshot = build_snapshot([svc()], [es([ep("10.244.0.10")]), bad], NODE)
    assert len(snapshot.skipped) == 1
    assert snapshot.skipped[0].startswith("default/intruder (EndpointSlice of web): ")


def test_a_problem_is_logged_once_however_often_its_service_is_rebuilt(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="netagent.proxy.snapshot_builder")
    builder = SnapshotBuilder(NODE)
    bad = es([ep("10.244.0.12")], name="intruder")
    bad["ports"][0]["port"] = 0
    for i in range(5):  # five changes of the good slice rebuild the Service five times
        builder.build([svc()], [es([ep(f"10.244.0.{20 + i}")]), bad])
    assert sum("intruder" in r.getMessage() for r in caplog.records) == 1
    builder.build([svc()], [es([ep("10.244.0.30")])])  # the bad slice is gone
    assert builder.snapshot().skipped == ()


@pytest.mark.parametrize("labels", [
    5, ["kubernetes.io/service-name"], {"kubernetes.io/service-name": {"a": 1}},
    {"kubernetes.io/service-name": 5},
])
def test_a_slice_whose_service_name_label_is_not_a_string_belongs_to_no_service(labels: object) -> None:
    """Not to crash the event handler either: the builder must still take every later change."""
    builder = SnapshotBuilder(NODE)
    builder.service_changed(svc())
    odd = es([ep("10.244.0.12")], name="odd")
    odd["metadata"]["labels"] = labels
    builder.slice_changed(odd)
    builder.slice_changed(es([ep("10.244.0.10")]))
    builder.slice_changed(odd)  # a second version of it
    builder.slice_changed(es([ep("10.244.0.11")], name="odd"))  # repaired: now it is web's
    endpoints = only_port(builder.snapshot()).cluster_endpoints
    assert sorted(e.ip for e in endpoints) == ["10.244.0.10", "10.244.0.11"]
    builder.slice_changed(es([ep("10.244.0.11")], name="odd"), deleted=True)
    assert [e.ip for e in only_port(builder.snapshot()).cluster_endpoints] == ["10.244.0.10"]
