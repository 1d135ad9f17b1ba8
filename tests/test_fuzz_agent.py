"""Fuzzing the agent's service proxy: generated Services and EndpointSlices, created through the lab API
server (which may refuse them, as a real one would) or written into its store past validation (what
another API server version, or a bug, can leave in storage and serve), then modified and deleted,
while a ProxyController programs a real node netns (test_proxy_dataplane's hand-built node with pods
that answer with their name). Invariants, checked after every round of changes:

- the agent never stops syncing: a change to a valid Service's EndpointSlice made after the round
  reaches the kernel (real TCP through its ClusterIP lands on the new pod);
- health reports the truth: /healthz stays healthy (it is syncing), no informer reports failing, no
  sync failed; `proxy show` says in sync;
- the API server never answers 5xx;

and once every generated object is deleted again: the kernel holds nothing but the valid Service's
rules (deleting any Service removes everything it installed), TCP and UDP through its ClusterIP work.

Default run: 10% of NETAGENT_FUZZ_EXAMPLES (see tests/fuzz_inputs.py; at least 200) objects in 4
rounds, per backend: nftables and iptables; NETAGENT_FUZZ_BACKENDS=nftables,iptables,iptables-legacy
chooses others.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from fuzz_inputs import SEED, Tally, mutated, scaled, short
from netns_lab.apiserver.store import ApiError
from prometheus_client import CollectorRegistry, generate_latest
from test_proxy_controller import Api, api  # noqa: F401 (api is a fixture)
from test_proxy_dataplane import (  # noqa: F401 (node_fixture provides the `node` fixture)
    CLUSTER_CIDR,
    NODE,
    PODS,
    VIP,
    Node,
    endpoint,
    endpoint_slice,
    node_fixture,
    service,
    tcp_ask,
    udp_ask,
)

from netagent.config import AgentConfig
from netagent.health import SyncTracker
from netagent.proxy.cli import proxy_group
from netagent.proxy.controller import ProxyController

BACKENDS = os.environ.get("NETAGENT_FUZZ_BACKENDS", "nftables,iptables").split(",")
ROUNDS = 4
PROBE = "probe"  # the valid Service whose traffic proves the agent still syncs
PROBE_PORTS = (("http", 80, "TCP", 0), ("dns", 53, "UDP", 0))
SPECIAL = {
    "clusterIP": ("999.1.1.1", "None", "", "10.96.1.0", "fd00:96::5", "x", 5, None, "10.96.1.300"),
    "clusterIPs": (["10.96.1.7", "10.96.1.7"], ["x"], "10.96.1.7", [], None),
    "type": ("ExternalName", "NodePort", "LoadBalancer", "Hibernating", "", 5),
    "port": (0, -1, 65536, 2**31, "80", None, 1.5, True),
    "targetPort": (0, 65536, "", "x" * 64, "http", None, -1),
    "nodePort": (0, 30000, 65536, 1, None, "30080"),
    "protocol": ("SCTP", "tcp", "ICMP", "", None, 5),
    "name": (5, "", "UPPER", "a" * 64, None, "p0"),
    "externalIPs": (["x"], ["192.168.60.7", "192.168.60.7"], "192.168.60.7", [5], ["0.0.0.0"], ["::"]),
    "sessionAffinity": ("ClientIP", "Sticky", None),
    "sessionAffinityConfig": (5, {"clientIP": {"timeoutSeconds": -1}}, {"clientIP": 5},
                              {"clientIP": {"timeoutSeconds": 10**12}}),
    "timeoutSeconds": (0, -1, 86401, "10", None),
    "externalTrafficPolicy": ("Local", "Cluster", "Nowhere", 5),
    "internalTrafficPolicy": ("Local", "Cluster", "Nowhere", 5),
    "healthCheckNodePort": (0, 32000, 65536, "x"),
    "ipFamilies": (["IPv6"], ["IPv4", "IPv4"], "IPv4", ["IPv5"]),
    "loadBalancerSourceRanges": (["x"], ["0.0.0.0/0"], ["10.0.0.0/33"], "10.0.0.0/8"),
    "ingress": ([{"ip": "x"}], [{"ip": "192.168.70.9"}], [{"hostname": "a"}], 5),
    "addressType": ("IPv6", "FQDN", "IPv5", None, 5),
    "addresses": ([5], [], ["x"], ["10.244.0.300"], ["10.244.0.10", "10.244.0.10"], "10.244.0.10",
                  ["fd00:244::10"], ["127.0.0.1"], ["0.0.0.0"]),
    "ready": ("yes", None, 1),
    "serving": ("yes", None, 0),
    "terminating": ("no", None, 1),
    "nodeName": (5, None, "node-b", ""),
    "kubernetes.io/service-name": (5, None, "", "x" * 300),
    "deletionTimestamp": ("garbage", 5, "2020-01-01T00:00:00Z"),
    "labels": (5, None, [], {"kubernetes.io/service-name": 5}),
}


def base_service(rng: random.Random, i: int) -> dict[str, Any]:
    svc_type = rng.choice(("ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"))
    ports = [
        {"name": f"p{j}", "port": rng.choice((80, 443, 53, 8000 + j)), "protocol": rng.choice(("TCP", "UDP")),
         "targetPort": rng.choice((8080, 8081, 5353, "p0"))}
        for j in range(rng.randint(1, 3))
    ]
    if svc_type != "ClusterIP":
        for port in ports:
            port["nodePort"] = 30000 + rng.randrange(2000)
    spec: dict[str, Any] = {"type": svc_type, "clusterIP": f"10.96.1.{i % 250 + 1}", "ports": ports}
    if rng.random() < 0.3:
        spec["externalIPs"] = [f"192.168.60.{rng.randrange(1, 250)}"]
    if rng.random() < 0.2:
        spec.update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    if svc_type == "LoadBalancer" and rng.random() < 0.5:
        spec.update(externalTrafficPolicy="Local", healthCheckNodePort=32000 + rng.randrange(700))
    body = {"metadata": {"namespace": "default", "name": f"fz-svc-{i}"}, "spec": spec}
    if svc_type == "LoadBalancer":
        body["status"] = {"loadBalancer": {"ingress": [{"ip": f"192.168.70.{rng.randrange(1, 250)}"}]}}
    return body


def base_slice(rng: random.Random, i: int, services: list[str]) -> dict[str, Any]:
    endpoints = [
        {"addresses": [rng.choice(list(PODS.values()))], "nodeName": rng.choice((NODE, NODE, "node-b")),
         "conditions": {"ready": rng.random() < 0.8, "serving": True, "terminating": rng.random() < 0.1}}
        for _ in range(rng.randint(0, 3))
    ]
    return {
        "metadata": {"namespace": "default", "name": f"fz-eps-{i}",
                     "labels": {"kubernetes.io/service-name": rng.choice(services or ["fz-svc-0"])}},
        "addressType": "IPv4",
        "ports": [
            {"name": f"p{j}", "port": rng.choice((8080, 8081, 5353)), "protocol": rng.choice(("TCP", "UDP"))}
            for j in range(rng.randint(1, 2))
        ],
        "endpoints": endpoints,
    }


def storable(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The generated body with the name and namespace the store needs to file it (all else as made)."""
    meta = body.get("metadata")
    body["metadata"] = {**(meta if isinstance(meta, dict) else {}), "namespace": "default", "name": name}
    return body


class AgentFuzz:
    """Generated objects in flight: which exist (by resource and name), and the tally."""

    def __init__(self, lab: Api, rng: random.Random, tally: Tally) -> None:
        self.api, self.rng, self.tally = lab, rng, tally
        self.existing: dict[tuple[str, str], bool] = {}  # (resource, name) -> present
        self.counter = 0

    def generate(self, resource: str, name: str = "") -> tuple[str, dict[str, Any], int]:
        """A (mutated) Service or EndpointSlice: (name, body, mutations)."""
        self.counter += 1
        if resource == "services":
            body = base_service(self.rng, self.counter)
        else:
            services = [name for (res, name) in self.existing if res == "services"]
            body = base_slice(self.rng, self.counter, services)
        name = name or body["metadata"]["name"]
        body, count = mutated(self.rng, body, SPECIAL, most=2)
        return name, storable(body, name), count

    def step(self) -> None:
        op = self.rng.random()
        present = sorted(self.existing)
        if op < 0.15 and present:
            resource, name = self.rng.choice(present)
            self.store(lambda s: s.delete(resource, "default", name), f"delete {resource}")
            self.existing.pop((resource, name), None)
            return
        if op < 0.3 and present:  # a new version of an existing object, past validation
            resource, name = self.rng.choice(present)
            _, body, count = self.generate(resource, name)
            self.tally.tried[f"{resource} ({'valid' if count == 0 else 'mutated'}) update in the store"] += 1
            self.store(lambda s: s.update(resource, body), f"update {resource}")
            return
        resource = self.rng.choice(("services", "endpointslices"))
        name, body, count = self.generate(resource)
        kind = f"{resource} ({'valid' if count == 0 else 'mutated'})"
        if op < 0.6:
            self.tally.tried[f"{kind} via the API"] += 1
            if self.create_via_api(resource, body):
                self.existing[(resource, name)] = True
        else:
            self.tally.tried[f"{kind} into the store"] += 1
            if self.store(lambda s: s.create(resource, body), f"create {resource}"):
                self.existing[(resource, name)] = True

    def create_via_api(self, resource: str, body: dict[str, Any]) -> bool:
        """POST the body as JSON, past the client's own models (which refuse much of it before
        sending): what a newer client, or kubectl, could send."""
        path = {"services": "/api/v1/namespaces/default/services",
                "endpointslices": "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"}[resource]
        config = self.api.client.configuration
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for auth in config.auth_settings().values():  # the kubeconfig's bearer token, as the client sends it
            headers[auth["key"]] = auth["value"]
        answer = self.api.client.rest_client.pool_manager.request(
            "POST", config.host + path, body=json.dumps(body).encode(), headers=headers, timeout=30)
        if answer.status >= 300:
            self.tally.outcomes[f"API refused {answer.status}"] += 1
            if answer.status >= 500:
                self.tally.violation(f"API server answered {answer.status} to a create of {resource}",
                                     f"{short(body)} -> {short(answer.data)}")
            return False
        self.tally.outcomes["API accepted"] += 1
        return True

    def store(self, change: Callable[[Any], Any], what: str) -> bool:
        store = self.api.server.store
        try:
            with store.lock:
                change(store)
        except ApiError as e:
            self.tally.outcomes[f"store refused {e.code}"] += 1
            return False
        except Exception as e:  # the object is stored; a listener of the lab's store choked on it
            self.tally.violation(f"lab API server: a store listener raised {type(e).__name__} on {what}",
                                 f"{e!r} (watchers are not woken until the next change)")
        self.tally.outcomes[f"{what} stored"] += 1
        return True

    def delete_all(self) -> None:
        for resource, name in sorted(self.existing):
            with contextlib.suppress(ApiError):
                self.store(lambda s, r=resource, n=name: s.delete(r, "default", n), f"delete {resource}")
        self.existing.clear()


def wait(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return True
        time.sleep(0.2)
    return False


def metric_value(registry: CollectorRegistry, prefix: str) -> float:
    lines = [line for line in generate_latest(registry).decode().splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def put_probe_slice(lab: Api, pod: str) -> None:
    body = endpoint_slice(PROBE, [endpoint(pod)], name=f"{PROBE}-http")
    body["ports"] = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353,
                                                                        "protocol": "UDP"}]
    lab.put_slice(body)


@pytest.mark.parametrize("node", BACKENDS, indirect=True)
def test_generated_services_and_slices_never_stop_the_proxy_and_health_tells_the_truth(
    api: Api, node: Node, tmp_path  # noqa: F811
) -> None:
    registry = CollectorRegistry()
    tracker = SyncTracker(registry, timeout=20.0)
    config = AgentConfig(node_name=NODE, proxy=node.proxier.kind, cluster_cidrs=(CLUSTER_CIDR,),
                         min_sync_period=0.2, state_dir=str(tmp_path))
    controller = ProxyController(api.client, config, families=(4,), netns=node.ns, tracker=tracker)
    controller.start()
    tally = Tally(f"agent proxy ({node.proxier.kind})")
    fuzz = AgentFuzz(api, random.Random(f"{SEED}-agent-{node.proxier.kind}"), tally)
    show = ["show", "--state-dir", str(tmp_path), "--netns", node.ns]
    try:
        api.core.create_namespaced_service("default", service(PROBE, ports=PROBE_PORTS))
        put_probe_slice(api, "p0")
        assert wait(lambda: tcp_ask(node.client, VIP, 80).pod == "p0"), "the probe Service never worked"
        per_round = max(1, scaled(0.1, 200) // ROUNDS)
        pods = sorted(PODS)
        for round_ in range(ROUNDS):
            for _ in range(per_round):
                fuzz.step()
            expected = pods[(round_ + 1) % len(pods)]
            put_probe_slice(api, expected)
            if not wait(lambda e=expected: tcp_ask(node.client, VIP, 80, timeout=1).pod == e):
                tally.violation("a change after the generated objects never reached the kernel",
                                f"round {round_}: probe endpoint {expected}")
            check_health(tally, tracker, registry, round_)
            tally.outcomes[f"round {round_}: skipped as malformed"] = check_in_sync(tally, show, round_)
        fuzz.delete_all()
        put_probe_slice(api, "p0")
        if not wait(lambda: tcp_ask(node.client, VIP, 80, timeout=1).pod == "p0"):
            tally.violation("after deleting every generated object the probe change never arrived", "")
        kernel = controller.proxier.backends[0]
        leftovers = sorted(dest for dest in kernel.kernel_view().entries if VIP not in dest)
        if leftovers:
            tally.violation("kernel entries left after every generated object was deleted", str(leftovers))
        if udp_ask(node.client, VIP, 53, source_port=40001).pod != "p0":
            tally.violation("UDP through the probe's ClusterIP does not reach its pod", "")
        check_in_sync(tally, show, "after the deletions")
    finally:
        controller.stop()
    tally.finish()


def check_in_sync(tally: Tally, show: list[str], when: object) -> int:
    """`proxy show` reaches "in sync" (it may lag the kernel by a moment); the number it lists as
    skipped (malformed)."""
    outputs = []

    def in_sync() -> bool:
        outputs.append(CliRunner().invoke(proxy_group, show))
        return outputs[-1].exit_code == 0 and "in sync" in outputs[-1].output

    if not wait(in_sync, 15):
        lines = outputs[-1].output.splitlines()
        differs = [f"{a} {b.strip()}" for a, b in itertools.pairwise(lines) if "DIFFERS" in b]
        tally.violation("proxy show stays out of sync",
                        f"{when}: exit {outputs[-1].exit_code}: {differs[:10]}")
    return outputs[-1].output.count("skipped (malformed)")


def check_health(tally: Tally, tracker: SyncTracker, registry: CollectorRegistry, round_: int) -> None:
    healthy, body = tracker.healthz()
    if not healthy:
        tally.violation("/healthz unhealthy while the proxy syncs", f"round {round_}: {body}")
    if metric_value(registry, "netagent_informer_failing") != 0:
        tally.violation("an informer reports failing", f"round {round_}")
    if metric_value(registry, 'netagent_sync_total{controller="proxy",result="error"}') != 0:
        tally.violation("a proxy sync failed (one object must never fail the whole sync)", f"round {round_}")
