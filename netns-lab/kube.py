"""The lab's side of the Kubernetes API, always through the official `kubernetes` client.

The lab plays the parts a real cluster's control plane and kubelets play: node IPAM (a Node with its
podCIDR), the kubelet's pod status (podIP, Ready), and `kubectl apply` for Services and
EndpointSlices. The lab API server keeps the status given at create (no kubelet fills it in), so
one create does it. Bodies are plain dicts in the API's own JSON shape, so a manifest passes through as
written.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from netns_lab.responder import DEFAULT_PORT as RESPONDER_PORT
from netns_lab.state import LabError, PodInfo

from netagent.kube import json_body

NAMESPACE = "default"


def preload() -> None:
    """Load the API classes the lab uses now (the client loads them lazily, ~1-2 s here), so a
    caller can do it in the background while waiting for something else."""
    _ = k8s.CoreV1Api, k8s.DiscoveryV1Api


def connect(kubeconfig: str) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=kubeconfig)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """API failures as one-line LabErrors: a refusal (with its Status message) or an unreachable server."""
    try:
        yield
    except ApiException as e:
        raise LabError(f"API server: {e.status} {e.reason}: {(e.body or '').strip()[:300]}") from None
    except urllib3.exceptions.HTTPError as e:
        raise LabError(f"the lab API server is unreachable ({type(e).__name__})") from None


def create_node(api: k8s.ApiClient, name: str, address: str, pod_cidr: str) -> None:
    """Register a Node the way node IPAM and the kubelet leave it: podCIDR, InternalIP, Ready."""
    body = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }
    with api_errors():
        k8s.CoreV1Api(api).create_node(body)


def register_pod(api: k8s.ApiClient, pod: PodInfo, host_ip: str) -> None:
    """Create the Pod object the kubelet would report for a running, ready pod."""
    body = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": dict(pod.labels)},
        "spec": {
            "nodeName": pod.node,
            "containers": [{
                "name": "responder", "image": "netagent-lab/responder",
                "ports": [{"name": "http", "containerPort": RESPONDER_PORT, "protocol": "TCP"},
                          {"name": "udp", "containerPort": RESPONDER_PORT, "protocol": "UDP"}],
            }],
        },
        "status": {
            "phase": "Running", "hostIP": host_ip,
            "podIP": pod.ips[0], "podIPs": [{"ip": ip} for ip in pod.ips],
            "conditions": [{"type": "Ready", "status": "True"},
                           {"type": "ContainersReady", "status": "True"}],
        },
    }
    with api_errors():
        k8s.CoreV1Api(api).create_namespaced_pod(NAMESPACE, body)


def delete_pod(api: k8s.ApiClient, name: str) -> None:
    with api_errors():
        try:
            k8s.CoreV1Api(api).delete_namespaced_pod(name, NAMESPACE)
        except ApiException as e:
            if e.status != 404:  # already gone is what we wanted
                raise


SUPPORTED_KINDS = {("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice")}


def apply(api: k8s.ApiClient, docs: Iterable[dict]) -> list[str]:
    """Create or replace each Service / EndpointSlice; returns one line per object for the user.

    Every document is checked before the first is applied, so a bad file changes nothing.
    """
    docs = list(docs)
    for doc in docs:
        metadata = doc.get("metadata") if isinstance(doc, dict) else None
        if not isinstance(metadata, dict) or not metadata.get("name"):
            raise LabError("every manifest needs metadata.name")
        if (doc.get("apiVersion"), doc.get("kind")) not in SUPPORTED_KINDS:
            raise LabError(f"unsupported manifest {doc.get('apiVersion')}/{doc.get('kind')}: the lab applies "
                           "v1 Service and discovery.k8s.io/v1 EndpointSlice")
    return [_apply_service(api, doc) if doc["kind"] == "Service" else _apply_endpointslice(api, doc)
            for doc in docs]


def _existing(read: Callable[[], Any]) -> Any | None:
    """The object `read` fetches, or None when it does not exist yet."""
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _apply_service(api: k8s.ApiClient, doc: dict) -> str:
    core = k8s.CoreV1Api(api)
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", NAMESPACE)
    with api_errors():
        existing = _existing(lambda: core.read_namespaced_service(name, namespace))
        if existing is None:
            svc = core.create_namespaced_service(namespace, doc)
            return f"service/{name} created (clusterIP {svc.spec.cluster_ip})"
        body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": existing.metadata.resource_version}}
        spec = body.setdefault("spec", {})
        spec.setdefault("clusterIP", existing.spec.cluster_ip)  # immutable, as in a real cluster
        spec.setdefault("clusterIPs", existing.spec.cluster_ips)
        svc = core.replace_namespaced_service(name, namespace, body)
        return f"service/{name} configured (clusterIP {svc.spec.cluster_ip})"


def _apply_endpointslice(api: k8s.ApiClient, doc: dict) -> str:
    discovery = k8s.DiscoveryV1Api(api)
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", NAMESPACE)
    with api_errors():
        existing = _existing(lambda: discovery.read_namespaced_endpoint_slice(name, namespace))
        if existing is None:
            discovery.create_namespaced_endpoint_slice(namespace, doc)
            return f"endpointslice/{name} created"
        body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": existing.metadata.resource_version}}
        discovery.replace_namespaced_endpoint_slice(name, namespace, body)
        return f"endpointslice/{name} configured"


@dataclass(frozen=True)
class ServiceTarget:
    """One TCP/UDP port of a ClusterIP service and the addresses of its ready endpoints."""

    service: str
    cluster_ip: str
    port: int
    protocol: str
    backends: frozenset[str]

    @property
    def label(self) -> str:
        return f"svc/{self.service}:{self.port}/{self.protocol.lower()}"


@dataclass(frozen=True)
class ServiceView:
    targets: list[ServiceTarget]
    skipped: list[str]  # "service/NAME: why" for each object too malformed to read


class _Malformed(Exception):
    pass


def service_targets(api: k8s.ApiClient) -> ServiceView:
    """Every port of every IPv4 ClusterIP service, with its ready endpoints' addresses (maybe none).

    Endpoints come from EndpointSlices, whether the lab's endpoints controller or `lab apply` made them.
    Lists are read as JSON and each object on its own, so one malformed object (which the client's
    typed models would refuse, failing the whole list) is named in `skipped` and the rest still shows.
    """
    with api_errors():
        services = _items(k8s.CoreV1Api(api).list_namespaced_service(NAMESPACE, _preload_content=False),
                          "the Service list")
        slices = _items(k8s.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
            NAMESPACE, _preload_content=False), "the EndpointSlice list")
    skipped: list[str] = []
    backends: dict[str, set[str]] = {}
    for eps in slices:
        try:
            service, addresses = _ready_addresses(eps)
        except _Malformed as e:
            skipped.append(f"endpointslice/{_name_of(eps)}: {e}")
            continue
        if service:
            backends.setdefault(service, set()).update(addresses)
    targets = []
    for svc in services:
        try:
            targets += _targets_of(svc, backends)
        except _Malformed as e:
            skipped.append(f"service/{_name_of(svc)}: {e}")
    return ServiceView(targets, skipped)


def _items(response: urllib3.BaseHTTPResponse, what: str) -> list[Any]:
    try:
        items = json_body(response, what).get("items")
    except ValueError:
        raise LabError(f"the lab API server answered {what} with something other than a JSON list") from None
    return items if isinstance(items, list) else []


def _name_of(obj: Any) -> str:
    name = obj.get("metadata", {}).get("name") if isinstance(obj, dict) else None
    return name if isinstance(name, str) else "?"


def _field(obj: Any, key: str, kind: type, default: Any) -> Any:
    """obj[key] if it is a `kind`, `default` if absent or null; anything else is malformed."""
    if not isinstance(obj, dict):
        raise _Malformed(f"{obj!r} is not an object")
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Malformed(f"{key} {value!r} is not a {kind.__name__}")
    return value


def _ready_addresses(eps: Any) -> tuple[str | None, list[str]]:
    labels = _field(_field(eps, "metadata", dict, {}), "labels", dict, {})
    service = _field(labels, "kubernetes.io/service-name", str, None)
    addresses: list[str] = []
    for endpoint in _field(eps, "endpoints", list, []):
        ready = _field(_field(endpoint, "conditions", dict, {}), "ready", bool, True)
        listed = _field(endpoint, "addresses", list, [])
        if not all(isinstance(address, str) for address in listed):
            raise _Malformed(f"addresses {listed!r} are not all strings")
        if ready:
            addresses += listed
    return service, addresses


def _targets_of(svc: Any, backends: dict[str, set[str]]) -> list[ServiceTarget]:
    name = _field(_field(svc, "metadata", dict, {}), "name", str, "")
    spec = _field(svc, "spec", dict, {})
    ip = _field(spec, "clusterIP", str, "")
    if not ip or ip == "None":
        return []
    try:
        if ipaddress.ip_address(ip).version != 4:
            return []
    except ValueError:
        raise _Malformed(f"clusterIP {ip!r} is not an address") from None
    targets = []
    for port in _field(spec, "ports", list, []):
        number, protocol = _field(port, "port", int, 0), _field(port, "protocol", str, "TCP")
        if protocol in ("TCP", "UDP"):
            targets.append(ServiceTarget(name, ip, number, protocol, frozenset(backends.get(name, ()))))
    return targets
