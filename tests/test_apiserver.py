"""The lab API server, driven through the official `kubernetes` client as the agent drives a real one."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from netns_lab.apiserver.server import Credentials, LabApiServer, new_token, write_kubeconfig

from nodekit import netns

T = TypeVar("T")
TIMEOUT = 20.0  # generous: the machine is shared with other test runs


def eventually(check: Callable[[], T], timeout: float = TIMEOUT) -> T:
    """Poll until `check()` returns something truthy (and return it), or fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"condition not reached within {timeout}s (last: {result!r})"
            return result
        time.sleep(0.05)


class Cluster:
    """A running lab API server and clients for it, built from a kubeconfig as the agent builds them."""

    def __init__(self, tmp_path, **server_args):
        self.data = str(tmp_path / "state.json")
        self.kubeconfig = str(tmp_path / "kubeconfig")
        self.server_args = server_args
        self.server: LabApiServer | None = None

    def start(self) -> Cluster:
        self.server = LabApiServer(self.data, **self.server_args).start()
        write_kubeconfig(self.kubeconfig, self.server.url, self.server.credentials)
        api_client = config.new_client_from_config(self.kubeconfig)
        self.core = client.CoreV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        return self

    def headers(self) -> dict[str, str]:
        """What a request to the server carries besides its body."""
        assert self.server is not None
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.server.token}"}

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    lab = Cluster(tmp_path, bookmark_interval=0.3, history_size=50).start()
    yield lab
    lab.stop()


def node(name: str, **labels: str) -> dict:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.1"}]},
    }


def pod(
    name: str, ip: str | None, ready: bool = True, node_name: str = "n1", http_port: int = 8080, **labels
):
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}
    if ip:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    container = {"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": http_port}]}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node_name, "containers": [container]},
        "status": status,
    }


def collect(stream: Iterator[dict], until: Callable[[list], bool]) -> list[tuple[str, str]]:
    """(type, name) of watch events, consumed in a thread until `until(events)`; the stream must end."""
    events: list[tuple[str, str]] = []
    for event in stream:
        events.append((event["type"], event["raw_object"]["metadata"].get("name", "")))
        if until(events):
            break
    return events


# ------------------------------------------------------------------------------------------ CRUD


def test_created_node_gets_server_metadata_and_round_trips(cluster):
    created = cluster.core.create_node(node("n1", zone="a"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation == 1 and int(created.metadata.resource_version) > 0

    fetched = cluster.core.read_node("n1")
    assert fetched.metadata.uid == created.metadata.uid
    assert fetched.status.addresses[0].address == "192.168.77.1"

    fetched.spec.pod_cidr = "10.244.9.0/24"
    replaced = cluster.core.replace_node("n1", fetched)
    assert replaced.spec.pod_cidr == "10.244.9.0/24"
    assert replaced.metadata.generation == 2
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)

    cluster.core.delete_node("n1")
    with pytest.raises(ApiException) as missing:
        cluster.core.read_node("n1")
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"


def test_creating_an_existing_object_is_a_409_already_exists(cluster):
    cluster.core.create_node(node("n1"))
    with pytest.raises(ApiException) as duplicate:
        cluster.core.create_node(node("n1"))
    assert duplicate.value.status == 409
    assert json.loads(duplicate.value.body)["reason"] == "AlreadyExists"


def test_update_from_a_stale_resource_version_is_a_409_conflict(cluster):
    stale = cluster.core.create_node(node("n1"))
    cluster.core.patch_node("n1", {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(ApiException) as conflict:
        cluster.core.replace_node("n1", stale)
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["reason"] == "Conflict"


def test_patching_node_annotations_merges_and_null_removes(cluster):
    cluster.core.create_node(
        {**node("n1"), "metadata": {"name": "n1", "annotations": {"keep": "1", "drop": "2"}}}
    )
    patched = cluster.core.patch_node(
        "n1", {"metadata": {"annotations": {"netagent.io/vtep": "aa:bb", "drop": None}}}
    )
    assert patched.metadata.annotations == {"keep": "1", "netagent.io/vtep": "aa:bb"}
    assert patched.metadata.generation == 1  # metadata changes do not bump the generation


def test_node_status_subresource_merges_conditions_by_type_and_main_resource_ignores_status(cluster):
    cluster.core.create_node(node("n1"))
    ready = {"type": "Ready", "status": "True"}
    cluster.core.patch_node_status(
        "n1", {"status": {"conditions": [ready, {"type": "DiskPressure", "status": "False"}]}}
    )
    patched = cluster.core.patch_node_status(
        "n1", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    )
    assert {c.type: c.status for c in patched.status.conditions} == {
        "Ready": "False",
        "DiskPressure": "False",
    }
    assert patched.status.addresses[0].address == "192.168.77.1"  # untouched by the patch

    ignored = cluster.core.patch_node("n1", {"status": {"addresses": []}, "metadata": {"labels": {"a": "b"}}})
    assert ignored.status.addresses[0].address == "192.168.77.1"
    assert ignored.metadata.labels == {"a": "b"}


def test_json_patch_edits_and_a_no_op_patch_keeps_the_resource_version(cluster):
    cluster.core.create_node(node("n1", zone="a"))
    patched = cluster.core.patch_node(
        "n1",
        [
            {"op": "add", "path": "/metadata/labels/role", "value": "edge"},
            {"op": "remove", "path": "/metadata/labels/zone"},
        ],
    )
    assert patched.metadata.labels == {"role": "edge"}
    again = cluster.core.patch_node("n1", {"metadata": {"labels": {"role": "edge"}}})
    assert again.metadata.resource_version == patched.metadata.resource_version


def test_list_filters_pods_by_label_selector_and_spec_node_name(cluster):
    cluster.core.create_namespaced_pod(
        "default", pod("a", "10.244.1.2", node_name="n1", app="web", tier="fe")
    )
    cluster.core.create_namespaced_pod("default", pod("b", "10.244.2.2", node_name="n2", app="web"))
    cluster.core.create_namespaced_pod("default", pod("c", "10.244.1.3", node_name="n1", app="db"))

    def names(**kwargs) -> list[str]:
        return [p.metadata.name for p in cluster.core.list_namespaced_pod("default", **kwargs).items]

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app in (web,db),!tier") == ["b", "c"]
    assert names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert names(field_selector="spec.nodeName=n1,metadata.name!=a") == ["c"]
    listed = cluster.core.list_pod_for_all_namespaces()
    assert int(listed.metadata.resource_version) >= 3


def raw_request(cluster: Cluster, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """A request the typed client would refuse to send (it validates bodies itself)."""
    response = cluster.core.api_client.rest_client.pool_manager.request(
        method, cluster.server.url + path, body=body, headers=cluster.headers()
    )
    return response.status, json.loads(response.data)


def test_malformed_objects_are_refused_with_clear_statuses_and_the_server_keeps_serving(cluster):
    services = "/api/v1/namespaces/default/services"
    bad_services = [  # a value of the wrong JSON type fails decoding (400), a wrong value validation (422)
        (service("bad-port", ports=[{"port": "eighty"}]), 400, "BadRequest"),
        (service("bad-protocol", ports=[{"port": 80, "protocol": "ICMP"}]), 422, "Invalid"),
        ({"metadata": {"name": "bad-labels", "labels": {"app": 5}}, "spec": {"ports": [{"port": 80}]}},
         400, "BadRequest"),
        ({"metadata": {"name": "bad-spec"}, "spec": ["not", "an", "object"]}, 400, "BadRequest"),
    ]
    for body, expected_code, reason in bad_services:
        code, status = raw_request(cluster, "POST", services, json.dumps(body).encode())
        assert (code, status["kind"], status["reason"]) == (expected_code, "Status", reason), body
        assert status["message"]
    code, status = raw_request(cluster, "POST", "/api/v1/nodes", b"{not json")
    assert (code, status["reason"]) == (400, "BadRequest")
    assert cluster.core.list_namespaced_service("default").items == []
    assert cluster.core.create_namespaced_service("default", service("good")).spec.cluster_ip


SERVICES = "/api/v1/namespaces/default/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


@pytest.mark.parametrize("spec, field, cause", [
    ({"clusterIP": "999.1.1.1"}, "spec.clusterIPs[0]", "FieldValueInvalid"),
    ({"clusterIP": "fd00::1"}, "spec.clusterIPs[0]", "FieldValueInvalid"),  # a family the cluster lacks
    ({"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.51"]}, "spec.clusterIPs[0]", "FieldValueInvalid"),
    ({"clusterIP": "10.1.2.3"}, "spec.clusterIPs[0]", "FieldValueInvalid"),  # outside the service CIDR
    ({"clusterIP": "10.96.0.0"}, "spec.clusterIPs[0]", "FieldValueInvalid"),  # its network address
    ({"clusterIP": "10.96.255.255"}, "spec.clusterIPs[0]", "FieldValueInvalid"),  # its broadcast address
    ({"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}, "spec.ports[1].name",
     "FieldValueDuplicate"),
    ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}, "spec.ports[1]",
     "FieldValueDuplicate"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name", "FieldValueRequired"),
    ({"ports": [{"name": "Not_A_Label", "port": 80}]}, "spec.ports[0].name", "FieldValueInvalid"),
    ({"externalIPs": ["x"]}, "spec.externalIPs[0]", "FieldValueInvalid"),
    ({"externalIPs": ["127.0.0.1"]}, "spec.externalIPs[0]", "FieldValueInvalid"),  # never leaves a host
    ({"externalIPs": ["169.254.1.1"]}, "spec.externalIPs[0]", "FieldValueInvalid"),
    ({"type": "Magic"}, "spec.type", "FieldValueNotSupported"),
    ({"sessionAffinity": "Sticky"}, "spec.sessionAffinity", "FieldValueNotSupported"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "FieldValueInvalid"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "FieldValueInvalid"),
    ({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}, "spec.sessionAffinityConfig",
     "FieldValueInvalid"),  # with the default affinity, None
    ({"type": "NodePort", "externalTrafficPolicy": "Nearest"}, "spec.externalTrafficPolicy",
     "FieldValueNotSupported"),
    ({"internalTrafficPolicy": "Nearest"}, "spec.internalTrafficPolicy", "FieldValueNotSupported"),
    ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8", "not-a-cidr"]},
     "spec.loadBalancerSourceRanges[1]", "FieldValueInvalid"),
    ({"loadBalancerSourceRanges": ["10.0.0.0/8"]}, "spec.loadBalancerSourceRanges", "FieldValueForbidden"),
    ({"type": "ExternalName"}, "spec.externalName", "FieldValueInvalid"),
])
def test_services_the_real_api_server_refuses_are_422_invalid_naming_the_field(cluster, spec, field, cause):
    body = {"metadata": {"name": "bad"}, "spec": {"ports": [{"name": "http", "port": 80}], **spec}}
    code, status = raw_request(cluster, "POST", SERVICES, json.dumps(body).encode())

    assert (code, status["kind"], status["reason"], status["code"]) == (422, "Status", "Invalid", 422)
    assert status["message"].startswith('Service "bad" is invalid: ')
    assert status["details"]["kind"] == "Service" and status["details"]["name"] == "bad"
    assert {"field": field, "reason": cause} in [
        {"field": c["field"], "reason": c["reason"]} for c in status["details"]["causes"]]
    assert cluster.core.list_namespaced_service("default").items == []


@pytest.mark.parametrize("path, body, field", [
    (SERVICES, {"spec": {"ports": [{"port": 80, "name": 5}]}}, "ServicePort.spec.ports.name"),
    (SERVICES, {"spec": {"ports": [{"port": 80.5}]}}, "ServicePort.spec.ports.port"),
    (SERVICES, {"spec": {"ports": [{"port": True}]}}, "ServicePort.spec.ports.port"),
    (SERVICES, {"spec": {"ports": [{"port": 2**31}]}}, "ServicePort.spec.ports.port"),
    (SERVICES, {"spec": {"ports": [{"port": 80, "targetPort": [8080]}]}},
     "ServicePort.spec.ports.targetPort"),
    (SERVICES, {"spec": {"clusterIP": 5}}, "ServiceSpec.spec.clusterIP"),
    (SERVICES, {"spec": {"clusterIPs": "10.96.0.50"}}, "ServiceSpec.spec.clusterIPs"),
    (SERVICES, {"spec": {"externalIPs": "192.0.2.1"}}, "ServiceSpec.spec.externalIPs"),
    (SERVICES, {"spec": {"externalIPs": [5]}}, "ServiceSpec.spec.externalIPs"),
    (SERVICES, {"spec": {"sessionAffinityConfig": 5}}, "ServiceSpec.spec.sessionAffinityConfig"),
    (SERVICES, {"spec": {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "60"}}}},
     "ClientIPConfig.spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    (SERVICES, {"spec": {"publishNotReadyAddresses": "yes"}}, "ServiceSpec.spec.publishNotReadyAddresses"),
    (SERVICES, {"spec": {"selector": {"app": 5}}}, "ServiceSpec.spec.selector"),
    (SERVICES, {"metadata": {"name": 5}}, "ObjectMeta.metadata.name"),
    (SERVICES, {"metadata": {"labels": ["app"]}}, "ObjectMeta.metadata.labels"),
    (SERVICES, {"metadata": {"deletionTimestamp": "garbage"}}, "metadata.deletionTimestamp"),
    (SERVICES, {"metadata": {"creationTimestamp": "2024-13-01T00:00:00Z"}}, "metadata.creationTimestamp"),
    (SERVICES, {"metadata": {"creationTimestamp": 1700000000}}, "metadata.creationTimestamp"),
    (SLICES, {"addressType": 4}, "EndpointSlice.addressType"),
    (SLICES, {"endpoints": [{"addresses": [5]}]}, "Endpoint.endpoints.addresses"),
    (SLICES, {"endpoints": [{"addresses": "10.0.0.1"}]}, "Endpoint.endpoints.addresses"),
    (SLICES, {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]},
     "EndpointConditions.endpoints.conditions.ready"),
    (SLICES, {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": True}]},
     "Endpoint.endpoints.conditions"),
    (SLICES, {"ports": [{"port": "80"}]}, "EndpointPort.ports.port"),
    (SLICES, {"ports": [{"port": 80, "name": 5}]}, "EndpointPort.ports.name"),
])
def test_a_value_of_the_wrong_json_type_fails_decoding_with_400_naming_the_field(cluster, path, body, field):
    """As the real apiserver decodes a body into the API's Go types before validating it: a string
    where a number belongs (or a time that is not RFC 3339) never becomes an object, so it is 400, not
    422; nothing is stored, so no watcher ever sees it."""
    if path == SERVICES:
        body = {**body, "spec": {"ports": [{"port": 80}], **body.get("spec", {})}}
    else:
        body = {"addressType": "IPv4", **body}
    body = {**body, "metadata": {"name": "bad", **body.get("metadata", {})}}
    code, status = raw_request(cluster, "POST", path, json.dumps(body).encode())

    kind = "Service" if path == SERVICES else "EndpointSlice"
    assert (code, status["kind"], status["reason"], status["code"]) == (400, "Status", "BadRequest", 400)
    assert status["message"].startswith(f'{kind} in version "v1" cannot be handled as a {kind}: ')
    assert field in status["message"]
    listed = raw_request(cluster, "GET", path)[1]["items"]
    assert listed == []


def test_a_deletion_timestamp_sent_on_create_is_dropped_as_only_a_delete_sets_it(cluster):
    body = service("not-terminating")
    body["metadata"] |= {"deletionTimestamp": "2024-01-01T00:00:00Z", "deletionGracePeriodSeconds": 30}
    created = cluster.core.create_namespaced_service("default", body)

    assert created.metadata.deletion_timestamp is None
    assert created.metadata.deletion_grace_period_seconds is None


@pytest.mark.parametrize("slice_fields, field, cause", [
    ({"addressType": None}, "addressType", "FieldValueRequired"),
    ({"addressType": "IPv5"}, "addressType", "FieldValueNotSupported"),
    ({"endpoints": [{"addresses": ["fd00::1"]}]}, "endpoints[0].addresses[0]", "FieldValueInvalid"),
    ({"endpoints": [{"addresses": ["not-an-ip"]}]}, "endpoints[0].addresses[0]", "FieldValueInvalid"),
    ({"endpoints": [{"addresses": ["10.0.0.1", "10.0.0.256"]}]}, "endpoints[0].addresses[1]",
     "FieldValueInvalid"),
    ({"endpoints": [{"addresses": ["127.0.0.1"]}]}, "endpoints[0].addresses[0]", "FieldValueInvalid"),
    ({"endpoints": [{"addresses": ["0.0.0.0"]}]}, "endpoints[0].addresses[0]", "FieldValueInvalid"),
    ({"addressType": "IPv6", "endpoints": [{"addresses": ["10.0.0.1"]}]}, "endpoints[0].addresses[0]",
     "FieldValueInvalid"),
    ({"addressType": "FQDN", "endpoints": [{"addresses": ["single-label"]}]}, "endpoints[0].addresses[0]",
     "FieldValueInvalid"),
    ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses", "FieldValueRequired"),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "hostname": "Not_A_Label"}]}, "endpoints[0].hostname",
     "FieldValueInvalid"),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1/../x"}]}, "endpoints[0].nodeName",
     "FieldValueInvalid"),
    ({"ports": [{"name": "Not_A_Label", "port": 80}]}, "ports[0].name", "FieldValueInvalid"),
    ({"ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]}, "ports[0].protocol",
     "FieldValueNotSupported"),
    ({"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}, "ports[1].name",
     "FieldValueDuplicate"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "ports[1].name", "FieldValueDuplicate"),  # both named ""
])
def test_endpoint_slices_the_real_api_server_refuses_are_422_invalid_naming_the_field(
        cluster, slice_fields, field, cause):
    """Every address must be one of the slice's addressType (the agent programs each into the kernel
    as such), every port named once with a known protocol."""
    body = {"metadata": {"name": "bad"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"]}], "ports": [{"name": "http", "port": 80}]}
    body |= slice_fields
    code, status = raw_request(cluster, "POST", SLICES, json.dumps(body).encode())

    assert (code, status["kind"], status["reason"], status["code"]) == (422, "Status", "Invalid", 422)
    assert status["message"].startswith('EndpointSlice "bad" is invalid: ')
    assert {"field": field, "reason": cause} in [
        {"field": c["field"], "reason": c["reason"]} for c in status["details"]["causes"]]
    assert cluster.discovery.list_namespaced_endpoint_slice("default").items == []


def test_valid_endpoint_slices_of_each_address_type_are_accepted(cluster):
    for name, address_type, address in (("v4", "IPv4", "10.244.1.5"), ("v6", "IPv6", "fd00:244::5"),
                                        ("dns", "FQDN", "backend.example.com")):
        body = {"metadata": {"name": name}, "addressType": address_type,
                "endpoints": [{"addresses": [address], "conditions": {"ready": True}, "hostname": "b-0",
                               "nodeName": "n1"}],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53,
                                                                             "protocol": "UDP"}]}
        assert raw_request(cluster, "POST", SLICES, json.dumps(body).encode())[0] == 201, name


def test_an_endpoint_slice_over_the_apis_size_limits_is_422_too_many(cluster):
    ports = [{"name": f"p{i}", "port": 1000 + i, "protocol": "TCP"} for i in range(101)]
    body = {"metadata": {"name": "wide"}, "addressType": "IPv4", "ports": ports, "endpoints": []}
    code, status = raw_request(cluster, "POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                               json.dumps(body).encode())

    assert (code, status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"] == [
        {"field": "ports", "reason": "FieldValueTooMany",
         "message": "Too many: 101: must have at most 100 items"}]
    body["ports"] = ports[:100]
    assert raw_request(cluster, "POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                       json.dumps(body).encode())[0] == 201


def test_the_first_and_last_usable_addresses_of_the_service_cidr_are_accepted(cluster):
    for name, ip in (("low", "10.96.0.1"), ("high", "10.96.255.254")):
        body = service(name)
        body["spec"]["clusterIP"] = ip
        assert cluster.core.create_namespaced_service("default", body).spec.cluster_ip == ip


def test_a_burst_of_a_thousand_creates_on_as_many_connections_all_get_answers(cluster):
    """Each request on its own connection, all released at once: the listen backlog must hold them
    (a backlog of 5 got a third of them reset)."""
    host, port = cluster.server.url.removeprefix("https://").rsplit(":", 1)
    tls = ssl.create_default_context(cadata=cluster.server.credentials.ca_pem)
    answers: list[object] = []
    release = threading.Barrier(1000)

    def create(i: int) -> None:
        body = json.dumps({"metadata": {"name": f"burst-{i}"}})
        release.wait()
        try:
            connection = http.client.HTTPSConnection(host, int(port), timeout=60, context=tls)
            connection.request("POST", "/api/v1/nodes", body, cluster.headers())
            answers.append(connection.getresponse().status)
            connection.close()
        except OSError as e:
            answers.append(type(e).__name__)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(answers, key=str) == [201] * 1000
    assert len(cluster.core.list_node().items) == 1000


def test_objects_in_a_missing_namespace_are_refused_with_404(cluster):
    with pytest.raises(ApiException) as missing:
        cluster.core.create_namespaced_pod("nowhere", pod("a", None))
    assert missing.value.status == 404


# ------------------------------------------------------------------------------------------ authentication


def anonymous(cluster: Cluster, method: str, path: str, token: str | None = None) -> tuple[int, dict | bytes]:
    """A request over https that trusts the server's certificate, with `token` or no credentials."""
    host, port = cluster.server.url.removeprefix("https://").rsplit(":", 1)
    tls = ssl.create_default_context(cadata=cluster.server.credentials.ca_pem)
    connection = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT, context=tls)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    body = json.dumps(node("intruder")) if method == "POST" else None
    connection.request(method, path, body, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    is_json = response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(data) if is_json else data


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/v1/nodes"), ("GET", "/api/v1/nodes"), ("GET", "/api/v1/nodes?watch=true"),
    ("GET", "/api"), ("GET", "/apis"), ("DELETE", "/api/v1/namespaces/default"),
])
@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_requests_without_the_kubeconfigs_token_are_401_unauthorized(cluster, method, path, token):
    code, status = anonymous(cluster, method, path, token)

    assert code == 401
    assert (status["kind"], status["status"], status["reason"], status["code"]) == (
        "Status", "Failure", "Unauthorized", 401)
    assert cluster.core.list_node().items == []  # the kubeconfig's client gets in; nothing was written


def test_health_and_version_are_open_to_anyone_as_on_a_real_api_server(cluster):
    for path in ("/healthz", "/readyz", "/livez", "/version"):
        assert anonymous(cluster, "GET", path)[0] == 200, path


def test_the_kubeconfig_carries_the_token_and_trusts_only_the_servers_certificate(cluster, tmp_path):
    assert os.stat(cluster.kubeconfig).st_mode & 0o777 == 0o600
    assert cluster.core.create_node(node("n1")).metadata.name == "n1"
    assert anonymous(cluster, "GET", "/api/v1/nodes", cluster.server.token)[0] == 200

    host, port = cluster.server.url.removeprefix("https://").rsplit(":", 1)
    with pytest.raises(ssl.SSLCertVerificationError):  # a client trusting the system's CAs only
        http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT).request("GET", "/healthz")
    plain = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    with pytest.raises((ConnectionError, http.client.HTTPException)):  # no plain http at all
        plain.request("GET", "/api/v1/nodes")
        plain.getresponse()


def test_a_body_over_the_real_servers_3_mib_limit_is_413_unread_and_the_server_keeps_serving(cluster):
    host, port = cluster.server.url.removeprefix("https://").rsplit(":", 1)
    tls = ssl.create_default_context(cadata=cluster.server.credentials.ca_pem)
    connection = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT, context=tls)
    connection.putrequest("POST", "/api/v1/nodes")
    for header, value in {**cluster.headers(), "Content-Length": str(3 * 1024 * 1024 + 1)}.items():
        connection.putheader(header, value)
    connection.endheaders()  # and no body: the server must not wait for 3 MiB
    response = connection.getresponse()

    assert (response.status, json.loads(response.read())["reason"]) == (413, "RequestEntityTooLarge")
    assert cluster.core.create_node(node("n1")).metadata.name == "n1"


# ------------------------------------------------------------------------------------------ watch


def test_watch_from_list_resource_version_sees_added_modified_deleted_in_order(cluster):
    listed = cluster.core.list_node()
    result: list = []
    stream = watch.Watch().stream(
        cluster.core.list_node,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=int(TIMEOUT),
    )
    reader = threading.Thread(target=lambda: result.extend(collect(stream, lambda ev: len(ev) == 3)))
    reader.start()
    cluster.core.create_node(node("n1"))
    cluster.core.patch_node("n1", {"metadata": {"annotations": {"a": "1"}}})
    cluster.core.delete_node("n1")
    reader.join(TIMEOUT + 5)
    assert result == [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1")]


@pytest.mark.parametrize("odd_spec", [
    "x", {"ports": 5, "clusterIPs": 7}, {"ports": ["p"], "healthCheckNodePort": "y"},
])
def test_an_odd_object_in_the_store_still_wakes_watchers_and_the_allocator_keeps_working(cluster, odd_spec):
    """A stored object the server's own bookkeeping cannot read (written by a newer API server, say)
    reaches watchers at once; before, the failing bookkeeping kept them asleep until the next write."""
    listed = cluster.core.list_namespaced_service("default")
    response = cluster.core.list_namespaced_service(
        "default", watch=True, resource_version=listed.metadata.resource_version,
        timeout_seconds=int(TIMEOUT), _preload_content=False)
    first_line: list[bytes] = []
    reader = threading.Thread(target=lambda: first_line.append(response.readline()))
    reader.start()
    odd = {"metadata": {"name": "odd", "namespace": "default"}, "spec": odd_spec}
    cluster.server.store.create("services", odd)
    reader.join(3)
    response.close()  # a streamed watch cannot go back to the pool half read

    assert first_line and json.loads(first_line[0])["object"]["metadata"]["name"] == "odd"
    valid = cluster.core.create_namespaced_service("default", {
        "metadata": {"name": "valid"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}}})
    assert valid.spec.cluster_ip.startswith("10.96.")


def test_watch_without_resource_version_starts_with_current_objects(cluster):
    cluster.core.create_node(node("n1"))
    cluster.core.create_node(node("n2"))
    stream = watch.Watch().stream(cluster.core.list_node, timeout_seconds=int(TIMEOUT))
    assert collect(stream, lambda ev: len(ev) == 2) == [("ADDED", "n1"), ("ADDED", "n2")]


def test_watch_on_a_field_selector_sees_objects_enter_and_leave_it(cluster):
    cluster.core.create_namespaced_pod("default", pod("a", "10.244.1.2", node_name="n1"))
    rv = cluster.core.list_namespaced_pod("default").metadata.resource_version
    result: list = []
    stream = watch.Watch().stream(
        cluster.core.list_namespaced_pod,
        "default",
        field_selector="spec.nodeName=n2",
        resource_version=rv,
        timeout_seconds=int(TIMEOUT),
    )
    reader = threading.Thread(target=lambda: result.extend(collect(stream, lambda ev: len(ev) == 2)))
    reader.start()
    cluster.core.create_namespaced_pod("default", pod("b", "10.244.2.2", node_name="n2"))
    cluster.core.create_namespaced_pod("default", pod("c", "10.244.1.3", node_name="n1"))
    cluster.core.delete_namespaced_pod("b", "default")
    reader.join(TIMEOUT + 5)
    assert result == [("ADDED", "b"), ("DELETED", "b")]


def test_watch_from_a_resource_version_older_than_the_history_is_410_gone(cluster):
    old_rv = cluster.core.create_node(node("n0")).metadata.resource_version
    for i in range(60):  # the fixture keeps 50 events of history
        cluster.core.patch_node("n0", {"metadata": {"annotations": {"i": str(i)}}})
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(cluster.core.list_node, resource_version=old_rv, timeout_seconds=5):
            pass
    assert gone.value.status == 410
    assert "Expired" in gone.value.reason


def test_expired_watch_is_an_error_event_with_a_410_status_on_the_wire(cluster):
    old_rv = cluster.core.create_node(node("n0")).metadata.resource_version
    for i in range(60):
        cluster.core.patch_node("n0", {"metadata": {"annotations": {"i": str(i)}}})
    response = cluster.core.list_node(
        watch=True, resource_version=old_rv, timeout_seconds=5, _preload_content=False
    )
    assert response.status == 200  # as the real apiserver: the stream opens, then says Gone
    event = json.loads(response.data.decode().splitlines()[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")


def test_a_watch_ends_on_the_server_once_its_client_closes_even_with_a_tls_close_notify(cluster):
    """Go clients (kubectl) say close_notify before closing: the server must not take that for data
    and keep the watch's thread until its timeout."""
    def serving() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    host, port = cluster.server.url.removeprefix("https://").rsplit(":", 1)
    tls = ssl.create_default_context(cadata=cluster.server.credentials.ca_pem)
    before = serving()
    watches = []
    for polite in (True, False):
        connection = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT, context=tls)
        connection.request("GET", "/api/v1/nodes?watch=true", headers=cluster.headers())
        response = connection.getresponse()
        assert response.status == 200
        watches.append((connection, response, polite))
    eventually(lambda: serving() == before + 2)
    for connection, response, polite in watches:
        if polite:
            connection.sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                connection.sock.unwrap()  # sends close_notify (then waits for the server's, in vain)
        response.close()
        connection.close()
    eventually(lambda: serving() == before, timeout=10)


def test_watch_sends_bookmarks_with_the_current_resource_version_when_allowed(cluster):
    rv = cluster.core.create_node(node("n1")).metadata.resource_version
    stream = watch.Watch().stream(
        cluster.core.list_node, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=int(TIMEOUT)
    )
    bookmark = next(event for event in stream if event["type"] == "BOOKMARK")
    assert bookmark["raw_object"]["metadata"]["resourceVersion"] == rv


def test_watch_ends_when_its_timeout_passes(cluster):
    started = time.monotonic()
    events = list(watch.Watch().stream(cluster.core.list_node, resource_version="1", timeout_seconds=1))
    assert events == []
    assert time.monotonic() - started < TIMEOUT


# ------------------------------------------------------------------------------------------ services


def service(name: str, type_: str = "ClusterIP", selector: dict | None = None, **spec) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"type": type_, "selector": selector, "ports": [{"name": "http", "port": 80}], **spec},
    }


def test_service_without_cluster_ip_gets_one_from_the_service_cidr_and_headless_stays_none(cluster):
    first = cluster.core.create_namespaced_service("default", service("a")).spec
    second = cluster.core.create_namespaced_service("default", service("b")).spec
    headless = cluster.core.create_namespaced_service("default", service("h", cluster_ip="None")).spec
    assert first.cluster_ip.startswith("10.96.") and first.cluster_ips == [first.cluster_ip]
    assert second.cluster_ip.startswith("10.96.") and second.cluster_ip != first.cluster_ip
    assert first.ip_families == ["IPv4"]
    assert headless.cluster_ip == "None"
    assert first.ports[0].target_port == 80 and first.ports[0].protocol == "TCP"

    with pytest.raises(ApiException) as taken:
        cluster.core.create_namespaced_service("default", service("c", cluster_ip=first.cluster_ip))
    assert taken.value.status == 422
    with pytest.raises(ApiException) as outside:
        cluster.core.create_namespaced_service("default", service("d", cluster_ip="10.1.2.3"))
    assert outside.value.status == 422


def test_node_ports_are_allocated_kept_on_update_and_freed_when_no_longer_needed(cluster):
    svc = cluster.core.create_namespaced_service("default", service("np", "NodePort"))
    node_port = svc.spec.ports[0].node_port
    assert 30000 <= node_port <= 32767
    assert svc.spec.health_check_node_port is None

    updated = cluster.core.patch_namespaced_service("np", "default", {"metadata": {"labels": {"x": "y"}}})
    assert updated.spec.ports[0].node_port == node_port
    assert updated.spec.cluster_ip == svc.spec.cluster_ip

    with pytest.raises(ApiException) as taken:
        cluster.core.create_namespaced_service(
            "default", service("np2", "NodePort", ports=[{"port": 81, "nodePort": node_port}])
        )
    assert taken.value.status == 422
    cluster.core.patch_namespaced_service("np", "default", {"spec": {"type": "ClusterIP"}})
    reused = cluster.core.create_namespaced_service(
        "default", service("np2", "NodePort", ports=[{"port": 81, "nodePort": node_port}])
    )
    assert reused.spec.ports[0].node_port == node_port


def test_local_load_balancer_gets_a_health_check_node_port(cluster):
    svc = cluster.core.create_namespaced_service(
        "default", service("lb", "LoadBalancer", external_traffic_policy="Local")
    ).spec
    assert 30000 <= svc.health_check_node_port <= 32767
    assert svc.health_check_node_port != svc.ports[0].node_port


def test_dual_stack_service_gets_an_address_of_each_family(tmp_path):
    lab = Cluster(tmp_path, service_cidrs=["10.96.0.0/16", "fd00:96::/112"]).start()
    try:
        spec = lab.core.create_namespaced_service(
            "default", service("ds", ip_family_policy="RequireDualStack")
        ).spec
        assert spec.ip_families == ["IPv4", "IPv6"]
        assert spec.cluster_ips[0].startswith("10.96.") and spec.cluster_ips[1].startswith("fd00:96::")
    finally:
        lab.stop()


# ------------------------------------------------------------------------------------------ endpoint slices


def endpoints_of(cluster: Cluster, service_name: str) -> dict[str, tuple]:
    """address -> ((port name, port) pairs, (ready, serving, terminating), nodeName), over all slices."""
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service_name}"
    ).items
    result = {}
    for s in slices:
        ports = tuple(sorted((p.name, p.port) for p in s.ports or []))
        for e in s.endpoints or []:
            c = e.conditions
            result[e.addresses[0]] = (ports, (c.ready, c.serving, c.terminating), e.node_name)
    return result


def test_endpoint_slices_follow_pod_labels_readiness_and_named_target_ports(cluster):
    ports = [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "metrics", "port": 9090}]
    cluster.core.create_namespaced_service("default", service("web", selector={"app": "web"}, ports=ports))
    cluster.core.create_namespaced_pod("default", pod("w1", "10.244.1.5", app="web"))
    cluster.core.create_namespaced_pod(
        "default", pod("w2", "10.244.2.5", ready=False, node_name="n2", http_port=8081, app="web")
    )
    cluster.core.create_namespaced_pod("default", pod("db", "10.244.1.6", app="db"))
    cluster.core.create_namespaced_pod("default", pod("noip", None, app="web"))

    expected = {
        "10.244.1.5": ((("http", 8080), ("metrics", 9090)), (True, True, False), "n1"),
        "10.244.2.5": ((("http", 8081), ("metrics", 9090)), (False, False, False), "n2"),
    }
    eventually(lambda: endpoints_of(cluster, "web") == expected)
    slice_ = cluster.discovery.list_namespaced_endpoint_slice("default").items[0]
    assert slice_.address_type == "IPv4"
    assert slice_.metadata.owner_references[0].name == "web"
    assert slice_.endpoints[0].target_ref.kind == "Pod"

    cluster.core.patch_namespaced_pod_status(
        "w2", "default", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    eventually(lambda: endpoints_of(cluster, "web")["10.244.2.5"][1] == (True, True, False))

    cluster.core.patch_namespaced_pod("w2", "default", {"metadata": {"labels": {"app": "other"}}})
    eventually(lambda: set(endpoints_of(cluster, "web")) == {"10.244.1.5"})


def test_dual_stack_service_gets_a_slice_per_address_family(tmp_path):
    lab = Cluster(tmp_path, service_cidrs=["10.96.0.0/16", "fd00:96::/112"]).start()
    try:
        lab.core.create_namespaced_service(
            "default", service("ds", selector={"app": "web"}, ip_family_policy="PreferDualStack")
        )
        body = pod("w1", "10.244.1.5", app="web")
        body["status"]["podIPs"] = [{"ip": "10.244.1.5"}, {"ip": "fd00:244:1::5"}]
        lab.core.create_namespaced_pod("default", body)

        def families() -> dict[str, list[str]]:
            slices = lab.discovery.list_namespaced_endpoint_slice("default").items
            return {s.address_type: [a for e in s.endpoints or [] for a in e.addresses] for s in slices}

        eventually(lambda: families() == {"IPv4": ["10.244.1.5"], "IPv6": ["fd00:244:1::5"]})
    finally:
        lab.stop()


def test_gracefully_deleted_pod_is_a_terminating_endpoint_until_it_is_gone(cluster):
    cluster.core.create_namespaced_service("default", service("web", selector={"app": "web"}))
    cluster.core.create_namespaced_pod("default", pod("w1", "10.244.1.5", app="web"))
    eventually(lambda: endpoints_of(cluster, "web").get("10.244.1.5"))

    terminating = cluster.core.delete_namespaced_pod("w1", "default", grace_period_seconds=2)
    assert terminating.metadata.deletion_timestamp is not None
    eventually(lambda: endpoints_of(cluster, "web")["10.244.1.5"][1] == (False, True, True))
    eventually(lambda: endpoints_of(cluster, "web") == {})
    assert cluster.core.list_namespaced_pod("default").items == []


def test_services_without_selector_keep_the_users_slices_and_deleted_services_lose_theirs(cluster):
    cluster.core.create_namespaced_service("default", service("ext"))
    cluster.discovery.create_namespaced_endpoint_slice(
        "default",
        {
            "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.168.1.1"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    )
    cluster.core.create_namespaced_service("default", service("web", selector={"app": "web"}))
    cluster.core.create_namespaced_pod("default", pod("w1", "10.244.1.5", app="web"))
    eventually(lambda: endpoints_of(cluster, "web"))
    assert endpoints_of(cluster, "ext") == {"192.168.1.1": ((("http", 80),), (True, None, None), None)}

    cluster.core.delete_namespaced_service("web", "default")
    eventually(
        lambda: (
            [s.metadata.name for s in cluster.discovery.list_namespaced_endpoint_slice("default").items]
            == ["ext-1"]
        )
    )


# ------------------------------------------------------------------------------ restarts, listeners


def test_restart_from_the_data_file_keeps_objects_and_old_watches_get_410(tmp_path):
    lab = Cluster(tmp_path).start()
    try:
        lab.core.create_node(node("n1"))
        old_rv = lab.core.list_node().metadata.resource_version
        lab.core.patch_node("n1", {"metadata": {"annotations": {"a": "1"}}})
        svc = lab.core.create_namespaced_service("default", service("a", "NodePort"))
        before = lab.core.list_node().metadata.resource_version
    finally:
        lab.stop()

    lab.start()
    try:
        restored = lab.core.read_node("n1")
        assert restored.metadata.annotations == {"a": "1"}
        again = lab.core.read_namespaced_service("a", "default").spec
        assert (again.cluster_ip, again.ports[0].node_port) == (
            svc.spec.cluster_ip,
            svc.spec.ports[0].node_port,
        )
        after = lab.core.create_namespaced_service("default", service("b")).metadata.resource_version
        assert int(after) > int(before)
        assert (
            lab.core.create_namespaced_service("default", service("c")).spec.cluster_ip != svc.spec.cluster_ip
        )
        with pytest.raises(ApiException) as gone:
            for _ in watch.Watch().stream(lab.core.list_node, resource_version=old_rv, timeout_seconds=5):
                pass
        assert gone.value.status == 410
    finally:
        lab.stop()


def start_cli_server(tmp_path, *extra: str) -> tuple[subprocess.Popen, dict]:
    """`python -m netns_lab.apiserver` as the lab runs it; returns the process and its ready file."""
    ready = tmp_path / "ready.json"
    ready.unlink(missing_ok=True)
    token = tmp_path / "token"
    if not token.exists():  # kept across restarts, as clients keep their kubeconfig
        token.write_text(new_token())
    argv = [
        sys.executable,
        "-m",
        "netns_lab.apiserver",
        "--data",
        str(tmp_path / "state.json"),
        "--listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        "--token-file",
        str(token),
        *extra,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    eventually(lambda: ready.exists() or process.poll() is not None)
    assert process.poll() is None, process.communicate()[0]
    info = json.loads(ready.read_text())
    return process, {**info, "credentials": Credentials.read(str(token), info["ca"])}


def test_module_cli_serves_on_loopback_and_inside_a_node_netns_reached_over_a_veth(tmp_path, make_netns):
    server_ns, node_ns = make_netns("srv"), make_netns("node")
    netns.run(
        server_ns, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", node_ns]
    )
    for ns, address in ((server_ns, "10.123.0.1/24"), (node_ns, "10.123.0.2/24")):
        netns.run(ns, ["ip", "addr", "add", address, "dev", "eth0"])
        netns.run(ns, ["ip", "link", "set", "eth0", "up"])
    process, info = start_cli_server(tmp_path, "--listen-netns", f"{server_ns}=10.123.0.1:6443")
    try:
        assert info["url"] == f"https://127.0.0.1:{info['port']}" and info["pid"] == process.pid

        host_kubeconfig = str(tmp_path / "host.kubeconfig")
        write_kubeconfig(host_kubeconfig, info["url"], info["credentials"])
        client.CoreV1Api(config.new_client_from_config(host_kubeconfig)).create_node(node("n1"))

        node_kubeconfig = str(tmp_path / "node.kubeconfig")
        write_kubeconfig(node_kubeconfig, "https://10.123.0.1:6443", info["credentials"])
        with netns.entered(netns.path(node_ns)):  # the client's socket is made in the node's netns
            nodes = client.CoreV1Api(config.new_client_from_config(node_kubeconfig)).list_node(
                _request_timeout=10
            )
        assert [n.metadata.name for n in nodes.items] == ["n1"]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_a_killed_server_restarts_with_every_acknowledged_write(tmp_path):
    kubeconfig = str(tmp_path / "kubeconfig")
    process, info = start_cli_server(tmp_path)
    try:
        write_kubeconfig(kubeconfig, info["url"], info["credentials"])
        core = client.CoreV1Api(config.new_client_from_config(kubeconfig))
        for i in range(20):
            last = core.create_node(node(f"n{i}")).metadata.resource_version
    finally:
        process.kill()  # no clean shutdown: only what reached the data file survives
        process.communicate()

    process, info = start_cli_server(tmp_path)
    try:
        write_kubeconfig(kubeconfig, info["url"], info["credentials"])
        core = client.CoreV1Api(config.new_client_from_config(kubeconfig))
        assert len(core.list_node().items) == 20
        assert int(core.create_node(node("after")).metadata.resource_version) > int(last)
    finally:
        process.terminate()
        process.communicate()


def test_module_cli_refuses_a_bad_listen_address_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "netns_lab.apiserver",
            "--data",
            str(tmp_path / "s.json"),
            "--listen",
            "nonsense",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "nonsense" in result.stderr and "Traceback" not in result.stderr


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@needs_kubectl
def test_kubectl_reads_and_annotates_through_a_kubeconfig(cluster):
    cluster.core.create_node(node("n1"))
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}

    def kubectl(*args: str) -> str:
        result = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        return result.stdout

    table = kubectl("get", "nodes", "-o", "wide").split()
    assert table[:5] == ["NAME", "STATUS", "AGE", "INTERNAL-IP", "POD-CIDR"]  # the server's Table columns
    assert table[5:6] == ["n1"] and "192.168.77.1" in table
    kubectl("annotate", "node", "n1", "netagent.io/x=1")
    kubectl("label", "node", "n1", "role=worker")
    meta = cluster.core.read_node("n1").metadata
    assert meta.annotations["netagent.io/x"] == "1" and meta.labels["role"] == "worker"


@needs_kubectl
def test_kubectl_apply_creates_then_updates_a_service_merging_its_ports_by_port(cluster, tmp_path):
    manifest = tmp_path / "svc.yaml"
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}

    def apply(ports: list[dict]) -> None:
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": ports},
        }
        manifest.write_text(json.dumps(svc))
        result = subprocess.run(
            ["kubectl", "apply", "-f", str(manifest)],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
        )
        assert result.returncode == 0, result.stderr

    apply([{"name": "http", "port": 80}])
    first = cluster.core.read_namespaced_service("web", "default").spec
    apply([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    second = cluster.core.read_namespaced_service("web", "default").spec
    assert [(p.name, p.port) for p in second.ports] == [("http", 80), ("dns", 53)]
    assert second.ports[0].node_port == first.ports[0].node_port
    apply([{"name": "dns", "port": 53, "protocol": "UDP"}])
    assert [p.name for p in cluster.core.read_namespaced_service("web", "default").spec.ports] == ["dns"]
