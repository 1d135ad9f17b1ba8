"""The lab's Kubernetes API server stand-in.

No kube-apiserver binary exists on this machine, so the lab runs this: a small HTTP server speaking enough
of the Kubernetes API (core/v1 Namespaces, Nodes, Pods, Services, Events; discovery.k8s.io/v1
EndpointSlices) that the official `kubernetes` client and kubectl work against it unchanged, over plain
http through a kubeconfig. The agent therefore runs the same code path as against a real cluster.

What it does as the real control plane does:
- list with resourceVersion, labelSelector and fieldSelector (any dotted field path); watch as a chunked
  stream of ADDED/MODIFIED/DELETED (+ BOOKMARK with allowWatchBookmarks), resumable from a resourceVersion
  inside a bounded history window; older -> an ERROR event with a 410 `Expired` Status; timeoutSeconds.
- create/update/patch (merge, strategic-merge, JSON patch)/delete with Status objects, 404/409/422 codes,
  uid/creationTimestamp/resourceVersion/generation filled in, optimistic locking on resourceVersion,
  `/status` subresources (the main resource ignores status changes; create keeps the status given, a lab
  convenience since no kubelet fills it in).
- Services: ClusterIPs allocated from --service-cidr (comma-separated for dual-stack), nodePorts from
  30000-32767 for NodePort/LoadBalancer, healthCheckNodePort for LoadBalancer with
  externalTrafficPolicy Local (the real rule), kept across updates, released on delete.
- Pods: deleted at once, unless DeleteOptions/query ask for gracePeriodSeconds > 0: then the pod is
  terminating (deletionTimestamp set) for that long, then removed.
- The endpoints controller (endpoints_controller.py) keeps EndpointSlices of selector Services.
- State lives in the data file (store.py; JSON lines, appended and flushed before each write is
  answered, so even a SIGKILL loses nothing acknowledged): a restart keeps every object and the
  resourceVersion keeps increasing, so a watch resuming from before the restart gets 410 and relists.
- For kubectl: discovery (/api, /apis, /version), Table output for `get` (also -o wide, --watch) and a
  minimal OpenAPI v3 so `kubectl apply` validates server-side (the server accepts any fields).

Not served (clear errors or ignored): limit/continue (lists come whole), dryRun (400, rather than a
write the caller did not want), server-side apply (415), deletecollection (405), admission webhooks,
authentication (plain http, no auth; the lab is local).

Usage, as a process (SIGTERM/SIGINT stop it cleanly):

    python -m netns_lab.apiserver --data STATE.json --listen 127.0.0.1:0 \\
        [--listen-netns NETNS=10.0.0.1:6443 ...] [--service-cidr 10.96.0.0/16[,fd00:96::/112]] \\
        [--ready-file READY.json] [--kubeconfig KUBECONFIG]

  The ready file is written once every listener is up: {"url": "http://127.0.0.1:PORT", "port": PORT,
  "pid": PID}. Each --listen-netns socket is bound inside that named netns (agents in node namespaces
  reach the server over the lab underlay; host-side tools use loopback).

In-process (tests):

    server = LabApiServer(data_path, listen="127.0.0.1:0", netns_listen={"NETNS": "10.0.0.1:6443"},
                          service_cidrs=["10.96.0.0/16"], history_size=5000, bookmark_interval=30.0).start()
    write_kubeconfig(path, server.url); ...; server.stop()   # or: with LabApiServer(...) as server:

`server.stop()` then `server.start()` again restarts it from the same data file (as a process restart);
with port 0 it gets a new port, so pass the old address as `listen` to keep the URL.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import copy
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from netns_lab.endpoints_controller import EndpointsController
from netns_lab.store import ApiError, Event, Store, not_found

from netagent import netns
from netagent.files import atomic_write

log = logging.getLogger("netns_lab.apiserver")

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-netagent-lab",
    "platform": "linux/amd64",
}
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
NODE_PORT_RANGE = range(30000, 32768)
DEFAULT_WATCH_TIMEOUT = 1800.0
SYSTEM_NAMESPACES = ("default", "kube-system")
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


# ---------------------------------------------------------------- resources and discovery


@dataclass(frozen=True)
class Resource:
    name: str  # the plural in URLs, also the store's resource name
    kind: str
    group_version: str  # "v1" for core
    namespaced: bool
    short_names: tuple[str, ...] = ()
    has_status: bool = True
    in_all: bool = False  # in kubectl's "all" category (`kubectl get all`)


RESOURCES = [
    Resource("namespaces", "Namespace", "v1", False, ("ns",)),
    Resource("nodes", "Node", "v1", False, ("no",)),
    Resource("pods", "Pod", "v1", True, ("po",), in_all=True),
    Resource("services", "Service", "v1", True, ("svc",), in_all=True),
    Resource("events", "Event", "v1", True, ("ev",), has_status=False),
    Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True, has_status=False),
]
BY_PATH = {(r.group_version, r.name): r for r in RESOURCES}
GROUP_VERSIONS = sorted({r.group_version for r in RESOURCES if r.group_version != "v1"})


def resource_list(group_version: str) -> dict:
    resources = []
    for r in RESOURCES:
        if r.group_version != group_version:
            continue
        base = {"namespaced": r.namespaced, "kind": r.kind}
        resources.append(
            {
                "name": r.name,
                "singularName": r.kind.lower(),
                **base,
                "verbs": VERBS,
                "shortNames": list(r.short_names),
                "categories": ["all"] if r.in_all else [],
            }
        )
        if r.has_status:
            resources.append(
                {"name": f"{r.name}/status", "singularName": "", **base, "verbs": ["get", "patch", "update"]}
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def api_group(group_version: str) -> dict:
    group, version = group_version.split("/")
    preferred = {"groupVersion": group_version, "version": version}
    return {"name": group, "versions": [preferred], "preferredVersion": preferred}


DISCOVERY: dict[str, dict] = {
    "/version": SERVER_VERSION,
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    },
    "/api/v1": resource_list("v1"),
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(gv) for gv in GROUP_VERSIONS]},
    **{f"/apis/{gv}": resource_list(gv) for gv in GROUP_VERSIONS},
    **{
        f"/apis/{gv.split('/')[0]}": {"kind": "APIGroup", "apiVersion": "v1", **api_group(gv)}
        for gv in GROUP_VERSIONS
    },
}


def openapi_paths(group_version: str) -> dict:
    """A minimal OpenAPI v3 document: no schemas, only that PATCH takes `fieldValidation`.

    That is what kubectl looks for before validating; finding it, it leaves validation to the server
    (which here accepts any fields) instead of demanding schemas we do not have."""
    group, _, version = group_version.rpartition("/")
    prefix = f"/apis/{group_version}" if group else "/api/v1"
    paths = {}
    for r in RESOURCES:
        if r.group_version == group_version:
            scope = "/namespaces/{namespace}" if r.namespaced else ""
            patch = {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"{prefix}{scope}/{r.name}/{{name}}"] = {"patch": patch}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }


OPENAPI_ROOTS = {("apis/" + gv if gv != "v1" else "api/v1"): gv for gv in ["v1", *GROUP_VERSIONS]}
DISCOVERY["/openapi/v3"] = {
    "paths": {root: {"serverRelativeURL": f"/openapi/v3/{root}"} for root in OPENAPI_ROOTS}
}
DISCOVERY.update({f"/openapi/v3/{root}": openapi_paths(gv) for root, gv in OPENAPI_ROOTS.items()})


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    status = "Success" if code < 400 else "Failure"
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": status,
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


# ---------------------------------------------------------------- selectors

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_requirements(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p.strip()]


def label_selector(selector: str) -> Callable[[dict], bool]:
    """A predicate on labels for a Kubernetes label selector string (equality- and set-based)."""
    checks = []
    for requirement in _split_requirements(selector):
        match = _REQUIREMENT.match(requirement)
        if not match or (match["neg"] and (match["op"] or match["setop"])):
            raise bad_request(f"unable to parse requirement: {requirement!r}")
        key, op = match["key"], match["op"] or match["setop"]
        if op in ("=", "=="):
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) != v)
        elif op in ("in", "notin"):
            values = {v.strip() for v in match["values"].split(",")}
            want = op == "in"
            checks.append(lambda labels, k=key, vs=values, w=want: (k in labels and labels[k] in vs) == w)
        else:
            checks.append(lambda labels, k=key, present=not match["neg"]: (k in labels) == present)
    return lambda labels: all(check(labels) for check in checks)


def field_value(obj: dict, path: str) -> str:
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(selector: str) -> Callable[[dict], bool]:
    """A predicate on whole objects for a field selector (`a.b=v`, `a.b==v`, `a.b!=v`, comma-joined)."""
    checks = []
    for requirement in _split_requirements(selector):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not match:
            raise bad_request(f"invalid field selector: {requirement!r}")
        path, op, value = match.groups()
        equal = op != "!="
        checks.append(lambda obj, p=path, v=value, e=equal: (field_value(obj, p) == v) == e)
    return lambda obj: all(check(obj) for check in checks)


def object_filter(query: dict[str, str]) -> Callable[[dict], bool]:
    labels = label_selector(query.get("labelSelector", ""))
    fields = field_selector(query.get("fieldSelector", ""))
    return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)


# ---------------------------------------------------------------- patches


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists merged element by element in strategic merge patches (path without list indices -> merge key),
# from the Kubernetes types' patchMergeKey tags for the resources served here. Other lists are replaced.
MERGE_KEYS = {
    "metadata.ownerReferences": "uid",
    "spec.ports": "port",
    "spec.containers": "name",
    "spec.initContainers": "name",
    "spec.containers.ports": "containerPort",
    "spec.containers.env": "name",
    "spec.volumes": "name",
    "status.conditions": "type",
    "status.addresses": "type",
}
PRIMITIVE_SET_LISTS = {"metadata.finalizers"}


def strategic_merge(target: object, patch: object, path: str = "") -> object:
    """Kubernetes strategic merge patch for the lists above, including kubectl apply's directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder, $retainKeys: ordering/pruning hints we need not honour
        elif value is None:
            result.pop(key, None)
        else:
            child = f"{path}.{key}" if path else key
            result[key] = (
                _merge_list(result.get(key), value, child)
                if isinstance(value, list)
                else strategic_merge(result.get(key), value, child)
            )
    return result


def _merge_list(current: object, patch: list, path: str) -> list:
    current = current if isinstance(current, list) else []
    if path in PRIMITIVE_SET_LISTS:
        return current + [v for v in patch if v not in current]
    key = MERGE_KEYS.get(path)
    if key is None:
        return copy.deepcopy(patch)
    merged = list(current)
    for item in patch:
        index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append(strategic_merge({}, item, path))
        else:
            merged[index] = strategic_merge(merged[index], item, path)
    return merged


def json_patch(target: dict, operations: list) -> dict:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    doc = copy.deepcopy(target)

    def locate(pointer: str) -> tuple[object, str | int]:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        if not parts:
            raise invalid("JSON patch on the whole document is not supported")
        parent: object = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        return parent, (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last

    def get(pointer: str) -> object:
        parent, key = locate(pointer)
        return copy.deepcopy(parent[key])

    def put(pointer: str, value: object, insert: bool) -> None:
        parent, key = locate(pointer)
        if isinstance(parent, list) and insert:
            parent.insert(key, value)
        else:
            parent[key] = value

    def remove(pointer: str) -> object:
        parent, key = locate(pointer)
        return parent.pop(key)

    for op in operations:
        try:
            kind, pointer = op["op"], op["path"]
            if kind == "add":
                put(pointer, op["value"], insert=True)
            elif kind == "remove":
                remove(pointer)
            elif kind == "replace":
                get(pointer)
                put(pointer, op["value"], insert=False)
            elif kind == "test":
                if get(pointer) != op["value"]:
                    raise invalid(f"JSON patch test failed at {pointer}")
            elif kind in ("move", "copy"):
                value = remove(op["from"]) if kind == "move" else get(op["from"])
                put(pointer, value, insert=True)
            else:
                raise invalid(f"unknown JSON patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise invalid(f"JSON patch {op!r} does not apply: {e}") from None
    return doc


PATCHERS: dict[str, Callable[[dict, object], object]] = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge,
    "application/json-patch+json": json_patch,
}


# ---------------------------------------------------------------- service allocation


def is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def validate_metadata(meta: dict) -> None:
    """The shape every object's metadata must have (the real apiserver rejects the rest with 422 too)."""
    for field in ("name", "generateName", "namespace"):
        if not isinstance(meta.get(field, ""), str):
            raise invalid(f"metadata.{field}: Invalid value: must be a string")
    for field in ("labels", "annotations"):
        if meta.get(field) is not None and not is_string_map(meta[field]):
            raise invalid(f"metadata.{field}: Invalid value: must be a map of strings to strings")


def validate_service_spec(spec: object) -> None:
    """The shape of a Service spec that allocation and the endpoints controller rely on."""
    if not isinstance(spec, dict):
        raise invalid("spec: Invalid value: must be an object")
    if spec.get("selector") is not None and not is_string_map(spec["selector"]):
        raise invalid("spec.selector: Invalid value: must be a map of strings to strings")
    ports = spec.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
        raise invalid("spec.ports: Invalid value: must be a list of objects")
    for i, port in enumerate(ports):
        number = port.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            raise invalid(f"spec.ports[{i}].port: Invalid value: {number!r}: must be between 1 and 65535")
        if port.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            raise invalid(f"spec.ports[{i}].protocol: Unsupported value: {port['protocol']!r}")
        if not isinstance(port.get("targetPort", 0), int | str):
            raise invalid(f"spec.ports[{i}].targetPort: Invalid value: must be a number or a port name")
        if not isinstance(port.get("nodePort") or 0, int):
            raise invalid(f"spec.ports[{i}].nodePort: Invalid value: must be a number")


class ServiceAllocator:
    """ClusterIPs and nodePorts for Services, as the apiserver's allocators hand them out.

    Usage is tracked from store events, so it is rebuilt on restart from the objects themselves."""

    def __init__(self, service_cidrs: list[str]):
        self.networks = [ipaddress.ip_network(c) for c in service_cidrs]
        if not self.networks or len({n.version for n in self.networks}) != len(self.networks):
            raise ValueError("service CIDRs: one or two (one IPv4, one IPv6) networks expected")
        self.ips: dict[str, tuple[str, str]] = {}  # address -> (namespace, name) of the owner
        self.node_ports: dict[int, tuple[str, str]] = {}
        self._next_ip: dict[ipaddress._BaseNetwork, int] = {}  # per network: offset to try next

    def observe(self, event: Event) -> None:
        if event.resource != "services":
            return
        if event.old:
            self._track(event.old, add=False)
        if event.type != "DELETED":
            self._track(event.obj, add=True)

    def _track(self, svc: dict, add: bool) -> None:
        owner = (svc["metadata"].get("namespace", ""), svc["metadata"]["name"])
        spec = svc.get("spec") or {}
        for ip in spec.get("clusterIPs") or []:
            self._claim(self.ips, ip, owner, add)
        for port in spec.get("ports") or []:
            if port.get("nodePort"):
                self._claim(self.node_ports, port["nodePort"], owner, add)
        if spec.get("healthCheckNodePort"):
            self._claim(self.node_ports, spec["healthCheckNodePort"], owner, add)

    @staticmethod
    def _claim(table: dict, key: object, owner: tuple[str, str], add: bool) -> None:
        if add:
            table[key] = owner
        elif table.get(key) == owner:
            del table[key]

    def admit(self, svc: dict, old: dict | None) -> None:
        """Fill in a Service's defaults and allocations in place; Invalid if what it asks for is taken."""
        owner = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        spec = svc.setdefault("spec", {})
        validate_service_spec(spec)
        old_spec = (old or {}).get("spec") or {}
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.setdefault("ports", []):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
        if spec["type"] == "ExternalName":
            return
        spec.setdefault("internalTrafficPolicy", "Cluster")
        self._admit_cluster_ips(spec, old_spec, owner)
        own_ports: set[int] = set()
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            own_ports = self._admit_node_ports(spec, old_spec, owner)
        else:
            for port in spec["ports"]:
                port.pop("nodePort", None)
            spec.pop("externalTrafficPolicy", None)
        if spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local":
            wanted = spec.get("healthCheckNodePort") or old_spec.get("healthCheckNodePort")
            spec["healthCheckNodePort"] = self._node_port(wanted, owner, taken=own_ports)
        else:
            spec.pop("healthCheckNodePort", None)

    def _admit_cluster_ips(self, spec: dict, old_spec: dict, owner: tuple[str, str]) -> None:
        ips = list(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
        old_ips = old_spec.get("clusterIPs") or []
        if old_spec and not ips:
            ips = list(old_ips)  # an update that leaves them out keeps them (as the apiserver patches in)
        if old_ips and ips != old_ips and old_spec.get("type") != "ExternalName":
            raise invalid("spec.clusterIPs: Invalid value: field is immutable")
        policy = spec.setdefault("ipFamilyPolicy", "SingleStack")
        if ips == ["None"]:
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            spec.setdefault("ipFamilies", [f"IPv{self.networks[0].version}"])
            return
        families = [n.version for n in self.networks]
        if ips:
            first = ipaddress.ip_address(ips[0]).version
            families = [first] + [v for v in families if v != first]
        wanted = 1 if policy == "SingleStack" else 2
        if policy == "RequireDualStack" and len(self.networks) < 2:
            raise invalid(
                "spec.ipFamilyPolicy: Invalid value: RequireDualStack: this cluster is single-stack"
            )
        families = families[: min(wanted, len(self.networks))]
        for index, version in enumerate(families):
            network = next(n for n in self.networks if n.version == version)
            if index < len(ips):
                self._check_ip(ips[index], network, owner)
            else:
                ips.append(self._free_ip(network))
        spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
        spec["ipFamilies"] = [f"IPv{ipaddress.ip_address(ip).version}" for ip in ips]

    def _check_ip(self, ip: str, network: ipaddress._BaseNetwork, owner: tuple[str, str]) -> None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise invalid(f"spec.clusterIPs: Invalid value: {ip!r}: must be a valid IP address") from None
        if address not in network:
            raise invalid(
                f"spec.clusterIPs: Invalid value: {ip!r}: provided IP is not in the valid range {network}"
            )
        if self.ips.get(ip, owner) != owner:
            raise invalid(f"spec.clusterIPs: Invalid value: {ip!r}: provided IP is already allocated")

    def _free_ip(self, network: ipaddress._BaseNetwork) -> str:
        """The next free address after the last one handed out, wrapping around (O(1) when not full).

        The first ten are skipped: by convention .1 is the kubernetes Service and .10 cluster DNS."""
        first, size = int(network.network_address) + 10, min(network.num_addresses - 11, 1 << 20)
        for _ in range(max(size, 0)):
            offset = self._next_ip.get(network, 0) % size
            self._next_ip[network] = offset + 1
            candidate = str(ipaddress.ip_address(first + offset))
            if candidate not in self.ips:
                return candidate
        raise ApiError(500, "InternalError", f"range is full: no ClusterIP left in {network}")

    def _admit_node_ports(self, spec: dict, old_spec: dict, owner: tuple[str, str]) -> set[int]:
        """Give every port a nodePort (the one asked for, the one it had, or a free one); returns them."""
        old_ports = {
            (p.get("port"), p.get("protocol", "TCP")): p.get("nodePort") for p in old_spec.get("ports") or []
        }
        taken: set[int] = set()
        for port in spec["ports"]:
            wanted = port.get("nodePort") or old_ports.get((port["port"], port["protocol"]))
            port["nodePort"] = self._node_port(wanted, owner, taken)
            taken.add(port["nodePort"])
        return taken

    def _node_port(self, wanted: int | None, owner: tuple[str, str], taken: set[int]) -> int:
        """`wanted` if free (or ours), else the lowest free port not in `taken` (this Service's others)."""
        if wanted:
            if wanted not in NODE_PORT_RANGE:
                raise invalid(
                    f"spec.ports[].nodePort: Invalid value: {wanted}: provided port is not in the "
                    f"valid range. The range of valid ports is 30000-32767"
                )
            if self.node_ports.get(wanted, owner) != owner:
                raise invalid(
                    f"spec.ports[].nodePort: Invalid value: {wanted}: provided port is already allocated"
                )
            return wanted
        for port in NODE_PORT_RANGE:
            if port not in self.node_ports and port not in taken:
                return port
        raise ApiError(500, "InternalError", "range is full: no nodePort left")


# ---------------------------------------------------------------- API semantics


@dataclass
class Target:
    """What a request path names."""

    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def store_namespace(self) -> str:
        return self.namespace or ""


class Api:
    """The API's behaviour independent of HTTP: reads, writes with admission, watches."""

    def __init__(self, store: Store, allocator: ServiceAllocator, bookmark_interval: float):
        self.store = store
        self.allocator = allocator
        self.bookmark_interval = bookmark_interval
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        with store.lock:
            for key, obj in store.objects():
                allocator.observe(Event(0, "ADDED", key[0], obj, None))
            store.add_listener(allocator.observe)
            for name in SYSTEM_NAMESPACES:
                if store.find("namespaces", "", name) is None:
                    store.create(
                        "namespaces",
                        {
                            "apiVersion": "v1",
                            "kind": "Namespace",
                            "metadata": {"name": name},
                            "status": {"phase": "Active"},
                        },
                    )
            for key, obj in store.objects():
                if key[0] == "pods" and obj["metadata"].get("deletionTimestamp"):
                    self._schedule_removal(obj)

    # -- reads

    def get(self, t: Target) -> dict:
        return self.store.get(t.resource.name, t.store_namespace, t.name)

    def list(self, t: Target, query: dict[str, str]) -> dict:
        matches = object_filter(query)
        items, rv = self.store.list(t.resource.name, t.namespace)
        return {
            "kind": f"{t.resource.kind}List",
            "apiVersion": t.resource.group_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": [o for o in items if matches(o)],
        }

    # -- writes

    def create(self, t: Target, body: dict) -> dict:
        obj = self._identify(t, body, name_from_url=False)
        with self.store.lock:
            if t.resource.namespaced:
                self._require_namespace(t.namespace)
            self._admit(t.resource, obj, None)
            return self.store.create(t.resource.name, obj)

    def update(self, t: Target, body: dict) -> dict:
        obj = self._identify(t, body, name_from_url=True)
        with self.store.lock:
            return self._write_update(t, obj, self.get(t))

    def patch(self, t: Target, content_type: str, patch: object) -> dict:
        patcher = PATCHERS.get(content_type)
        if patcher is None:
            raise ApiError(
                415, "UnsupportedMediaType", f"the lab API server does not accept {content_type!r}"
            )
        if content_type == "application/json-patch+json" and not isinstance(patch, list):
            raise bad_request("a JSON patch is a list of operations")
        if content_type != "application/json-patch+json" and not isinstance(patch, dict):
            raise bad_request("a merge patch is a JSON object")
        with self.store.lock:
            current = self.get(t)
            patched = patcher(current, patch)
            if not isinstance(patched, dict):
                raise invalid("the patch does not yield an object")
            if (patched.get("metadata") or {}).get("resourceVersion") == current["metadata"][
                "resourceVersion"
            ]:
                patched["metadata"] = {**patched["metadata"], "resourceVersion": ""}  # patches don't lock
            return self._write_update(t, self._identify(t, patched, name_from_url=True), current)

    def _write_update(self, t: Target, obj: dict, current: dict) -> dict:
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            if field in current["metadata"]:
                obj["metadata"][field] = current["metadata"][field]
            else:
                obj["metadata"].pop(field, None)
        if t.subresource == "status":
            obj = {
                **current,
                "metadata": {
                    **current["metadata"],
                    "resourceVersion": obj["metadata"].get("resourceVersion"),
                },
                "status": obj.get("status"),
            }
        elif t.resource.has_status:
            obj["status"] = current.get("status")
            if obj["status"] is None:
                obj.pop("status")
            self._admit(t.resource, obj, current)
        else:
            self._admit(t.resource, obj, current)
        return self.store.update(t.resource.name, obj)

    def delete(self, t: Target, options: dict) -> dict:
        with self.store.lock:
            current = self.get(t)
            preconditions = options.get("preconditions") or {}
            for field in ("uid", "resourceVersion"):
                if preconditions.get(field) and preconditions[field] != current["metadata"].get(field):
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: {field} in precondition: "
                        f"{preconditions[field]}, {field} in object meta: {current['metadata'].get(field)}",
                    )
            grace = options.get("gracePeriodSeconds") or 0
            if not str(grace).isdigit():
                raise bad_request(f"gracePeriodSeconds: {grace!r} is not a number of seconds")
            grace = int(grace)
            if t.resource.name == "pods" and grace > 0 and not current["metadata"].get("deletionTimestamp"):
                deadline = time.time() + grace
                meta = {
                    **current["metadata"],
                    "deletionGracePeriodSeconds": grace,
                    "deletionTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)),
                }
                terminating = self.store.update("pods", {**current, "metadata": meta})
                self._schedule_removal(terminating)
                return terminating
            if t.resource.name == "namespaces":
                if t.name in SYSTEM_NAMESPACES:
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'namespaces "{t.name}" is forbidden: this namespace may not be deleted',
                    )
                for key, _ in self.store.objects():  # the namespace's objects go with it
                    if key[1] == t.name:
                        self.store.delete(*key)
            deleted = self.store.delete(t.resource.name, t.store_namespace, t.name)
        if t.resource.name in ("pods", "services"):
            return deleted  # these return the object, others a Status (as the real apiserver)
        return status_object(
            200, "", "", {"name": t.name, "kind": t.resource.name, "uid": deleted["metadata"]["uid"]}
        )

    def _schedule_removal(self, pod: dict) -> None:
        """Remove a terminating pod when its grace period ends (in the lab no kubelet does)."""
        meta = pod["metadata"]
        deadline = calendar.timegm(time.strptime(meta["deletionTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))

        def remove() -> None:
            with self.store.lock:
                still = self.store.find("pods", meta["namespace"], meta["name"])
                if still is not None and still["metadata"]["uid"] == meta["uid"] and not self.store.closed:
                    self.store.delete("pods", meta["namespace"], meta["name"])

        timer = threading.Timer(max(0.0, deadline - time.time()), remove)
        timer.daemon = True
        self._timers[(meta["namespace"], meta["name"])] = timer
        timer.start()

    def stop_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()

    def _identify(self, t: Target, body: object, name_from_url: bool) -> dict:
        """The body as an object of this resource, its kind, namespace and name checked against the URL."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON or YAML object")
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = t.resource.kind, t.resource.group_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        validate_metadata(meta)
        if t.resource.namespaced:
            if meta.get("namespace") not in (None, "", t.namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = t.namespace
        else:
            meta.pop("namespace", None)
        if name_from_url:
            if meta.get("name") not in (None, "", t.name):
                raise bad_request("the name of the object does not match the name on the URL")
            meta["name"] = t.name
        return obj

    def _require_namespace(self, namespace: str | None) -> None:
        if namespace is None:
            raise bad_request("a namespaced object is created under /namespaces/{namespace}/")
        if self.store.find("namespaces", "", namespace) is None:
            raise not_found("namespaces", namespace)

    def _admit(self, resource: Resource, obj: dict, old: dict | None) -> None:
        if resource.name == "services":
            self.allocator.admit(obj, old)
        elif resource.name == "namespaces":
            obj.setdefault("status", {"phase": "Active"})

    # -- watches

    def watch(self, t: Target, query: dict[str, str], gone: Callable[[], bool]) -> Iterator[dict]:
        """Watch events as dicts ready to send; ends at timeoutSeconds, on server stop or client loss.

        The request is checked here, before the stream starts, so a bad one gets a plain error response."""
        matches = object_filter(query)
        start = query.get("resourceVersion", "")
        if not start.isdigit() and start != "":
            raise bad_request(f"invalid resourceVersion {start!r}")
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError:
            raise bad_request("timeoutSeconds must be a number") from None
        return self._events(
            t,
            matches,
            start,
            time.monotonic() + timeout,
            query.get("allowWatchBookmarks") in ("true", "1"),
            gone,
        )

    def _events(
        self,
        t: Target,
        matches: Callable[[dict], bool],
        start: str,
        deadline: float,
        bookmarks: bool,
        gone: Callable[[], bool],
    ) -> Iterator[dict]:
        next_bookmark = time.monotonic() + self.bookmark_interval
        with self.store.lock:
            if start in ("", "0"):  # "current state, then changes": synthetic ADDED for what exists
                items, cursor = self.store.list(t.resource.name, t.namespace)
                initial = [{"type": "ADDED", "object": o} for o in items if matches(o)]
            else:
                cursor, initial = int(start), []
        yield from initial
        while True:
            with self.store.lock:
                try:
                    events, cursor = self.store.events_since(cursor)
                except ApiError as e:
                    yield {"type": "ERROR", "object": status_object(e.code, e.reason, e.message)}
                    return
                if not events:
                    now = time.monotonic()
                    wake = min(deadline, next_bookmark if bookmarks else deadline, now + 2.0)
                    self.store.changed.wait(max(0.0, wake - now))
                if self.store.closed:
                    return
            for event in events:
                sent = self._as_seen_by(t, matches, event)
                if sent:
                    yield sent
            now = time.monotonic()
            if now >= deadline or gone():
                return
            if bookmarks and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": t.resource.kind,
                        "apiVersion": t.resource.group_version,
                        "metadata": {"resourceVersion": str(cursor)},
                    },
                }

    @staticmethod
    def _as_seen_by(t: Target, matches: Callable[[dict], bool], event: Event) -> dict | None:
        """The event as this watch sees it: objects entering or leaving its selector are ADDED/DELETED."""
        if event.resource != t.resource.name:
            return None
        if t.namespace is not None and event.obj["metadata"].get("namespace") != t.namespace:
            return None
        if event.type == "DELETED":
            now, before = False, matches(event.obj)
        else:
            now, before = matches(event.obj), event.old is not None and matches(event.old)
        if now and before:
            return {"type": "MODIFIED", "object": event.obj}
        if now:
            return {"type": "ADDED", "object": event.obj}
        if before:
            return {"type": "DELETED", "object": event.obj}
        return None


# ---------------------------------------------------------------- kubectl tables


def age(obj: dict) -> str:
    """How long ago an object was created, the way kubectl shows it (server-side, as the apiserver does)."""
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    seconds = max(0, int(time.time() - calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _condition(obj: dict, type_: str) -> str | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("status") for c in conditions if c.get("type") == type_), None)


def _service_ports(svc: dict) -> str:
    ports = svc["spec"].get("ports") or []
    return (
        ",".join(
            f"{p['port']}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
            for p in ports
        )
        or "<none>"
    )


def _internal_ip(node: dict) -> str:
    addresses = (node.get("status") or {}).get("addresses") or []
    return next((a["address"] for a in addresses if a.get("type") == "InternalIP"), "<none>")


Column = tuple[str, int, Callable[[dict], object]]  # (name, priority: 1 = only with -o wide, cell)
NAME: Column = ("Name", 0, lambda o: o["metadata"]["name"])
AGE: Column = ("Age", 0, age)
TABLE_COLUMNS: dict[str, list[Column]] = {
    "Node": [
        NAME,
        ("Status", 0, lambda o: "Ready" if _condition(o, "Ready") == "True" else "NotReady"),
        AGE,
        ("Internal-IP", 1, _internal_ip),
        ("Pod-CIDR", 1, lambda o: (o.get("spec") or {}).get("podCIDR")),
    ],
    "Pod": [
        NAME,
        ("Ready", 0, lambda o: "1/1" if _condition(o, "Ready") == "True" else "0/1"),
        (
            "Status",
            0,
            lambda o: (
                "Terminating"
                if o["metadata"].get("deletionTimestamp")
                else (o.get("status") or {}).get("phase", "Pending")
            ),
        ),
        AGE,
        ("IP", 1, lambda o: (o.get("status") or {}).get("podIP", "<none>")),
        ("Node", 1, lambda o: (o.get("spec") or {}).get("nodeName", "<none>")),
    ],
    "Service": [
        NAME,
        ("Type", 0, lambda o: o["spec"].get("type")),
        ("Cluster-IP", 0, lambda o: o["spec"].get("clusterIP", "<none>")),
        ("External-IP", 0, lambda o: ",".join(o["spec"].get("externalIPs") or []) or "<none>"),
        ("Port(s)", 0, _service_ports),
        AGE,
        (
            "Selector",
            1,
            lambda o: ",".join(f"{k}={v}" for k, v in (o["spec"].get("selector") or {}).items()) or "<none>",
        ),
    ],
    "EndpointSlice": [
        NAME,
        ("AddressType", 0, lambda o: o.get("addressType")),
        ("Ports", 0, lambda o: ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"),
        (
            "Endpoints",
            0,
            lambda o: ",".join(a for e in o.get("endpoints") or [] for a in e["addresses"]) or "<unset>",
        ),
        AGE,
    ],
    "Namespace": [NAME, ("Status", 0, lambda o: (o.get("status") or {}).get("phase", "Active")), AGE],
}


def as_table(resource: Resource, objects: list[dict], rv: str) -> dict:
    """A meta.k8s.io/v1 Table: what kubectl asks for to print `kubectl get` (columns as kubectl has them)."""
    columns = TABLE_COLUMNS.get(resource.kind, [NAME, AGE])
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": [
            {
                "name": name,
                "type": "string",
                "format": "name" if name == "Name" else "",
                "description": "",
                "priority": priority,
            }
            for name, priority, _ in columns
        ],
        "rows": [
            {
                "cells": [cell(obj) for _, _, cell in columns],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objects
        ],
    }


# ---------------------------------------------------------------- HTTP


def parse_target(path: str) -> Target | None:
    """Map /api/v1/... and /apis/GROUP/VERSION/... paths to what they name; None if not a resource path."""
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        group_version, rest = "v1", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group_version, rest[2]) in BY_PATH:
        namespace, rest = rest[1], rest[2:]
    if not rest or not 1 <= len(rest) <= 3 or (group_version, rest[0]) not in BY_PATH:
        return None
    resource = BY_PATH[(group_version, rest[0])]
    if len(rest) == 3 and (rest[2] != "status" or not resource.has_status):
        return None
    if namespace is not None and not resource.namespaced:
        return None
    if resource.namespaced and namespace is None and len(rest) > 1:
        return None
    return Target(resource, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request against the Api; every failure becomes a Kubernetes Status response."""

    protocol_version = "HTTP/1.1"
    server: LabHTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without this, Nagle + delayed ACK add ~40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            body = self._read_body()
            if method == "GET" and url.path.rstrip("/") in DISCOVERY:
                return self._send(200, DISCOVERY[url.path.rstrip("/")])
            if method == "GET" and url.path in ("/healthz", "/readyz", "/livez"):
                return self._send_raw(200, b"ok", "text/plain")
            if "dryRun" in query:
                raise bad_request("dryRun is not supported by the lab API server")
            target = parse_target(url.path)
            if target is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._dispatch(method, target, query, body)
        except ApiError as e:
            self._send(e.code, status_object(e.code, e.reason, e.message, e.details))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug here must not take the server down; the client gets a Status
            log.exception("%s %s failed", method, self.path)
            self._send(500, status_object(500, "InternalError", f"internal error: {e}"))

    def _dispatch(self, method: str, t: Target, query: dict[str, str], body: object) -> None:
        api = self.server.api
        if t.name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                events = api.watch(t, query, self._client_gone)
                if self._wants_table():  # kubectl get --watch
                    events = (
                        {**e, "object": as_table(t.resource, [e["object"]], "")}
                        if e["type"] in ("ADDED", "MODIFIED", "DELETED")
                        else e
                        for e in events
                    )
                return self._stream(events)
            if method == "GET":
                listed = api.list(t, query)
                if self._wants_table():
                    listed = as_table(t.resource, listed["items"], listed["metadata"]["resourceVersion"])
                return self._send(200, listed)
            if method == "POST":
                return self._send(201, api.create(t, body))
        elif method == "GET":
            obj = api.get(t)
            return self._send(200, as_table(t.resource, [obj], "") if self._wants_table() else obj)
        elif method == "PUT":
            return self._send(200, api.update(t, body))
        elif method == "PATCH":
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            return self._send(200, api.patch(t, content_type, body))
        elif method == "DELETE" and t.subresource is None:
            options = dict(body) if isinstance(body, dict) else {}
            if "gracePeriodSeconds" in query:
                options["gracePeriodSeconds"] = query["gracePeriodSeconds"]
            return self._send(200, api.delete(t, options))
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {self.path}")

    def _wants_table(self) -> bool:
        return "as=Table" in self.headers.get("Accept", "")

    def _read_body(self) -> object:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise bad_request(f"bad Content-Length {length!r}")
        length = int(length)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            if "yaml" in self.headers.get("Content-Type", ""):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the request body is not valid JSON or YAML: {e}") from None

    def _send(self, code: int, obj: dict) -> None:
        self._send_raw(code, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _send_raw(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[dict]) -> None:
        """A watch: one JSON event per line, each line one HTTP chunk, flushed as it happens."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for event in events:
                self._chunk(event)
        except ConnectionError:
            raise
        except Exception:  # too late for an error response: end the stream, the client will re-watch
            log.exception("watch %s failed", self.path)
            self.close_connection = True
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True once the client closed its end (a readable socket with nothing to read)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class LabHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: Api

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that hangs up is normal (watchers stop, kubectl exits): one debug line, no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("%s: %s", client_address, error)
        else:
            log.exception("connection from %s failed", client_address)


def _listener(address: str, api: Api) -> LabHTTPServer:
    """An HTTP server bound to ADDR:PORT or [ADDR6]:PORT (in the calling thread's netns)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"listen address {address!r}: expected ADDR:PORT")
    server_class = (
        type("LabHTTPServer6", (LabHTTPServer,), {"address_family": socket.AF_INET6})
        if ":" in host
        else LabHTTPServer
    )
    server = server_class((host, int(port)), Handler)
    server.api = api
    return server


class LabApiServer:
    """The lab API server in this process: start() binds and serves, stop() ends watches and saves."""

    def __init__(
        self,
        data_path: str,
        listen: str = "127.0.0.1:0",
        netns_listen: dict[str, str] | None = None,
        service_cidrs: list[str] | None = None,
        history_size: int = 5000,
        bookmark_interval: float = 30.0,
    ):
        self.data_path = data_path
        self.listen = listen
        self.netns_listen = netns_listen or {}
        self.service_cidrs = service_cidrs or [DEFAULT_SERVICE_CIDR]
        self.history_size = history_size
        self.bookmark_interval = bookmark_interval
        self._servers: list[LabHTTPServer] = []
        self._serving: list[LabHTTPServer] = []
        self.store: Store | None = None
        self.api: Api | None = None
        self.controller: EndpointsController | None = None

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> LabApiServer:
        self.store = Store(self.data_path, self.history_size)
        try:
            allocator = ServiceAllocator(self.service_cidrs)
            self.api = Api(self.store, allocator, self.bookmark_interval)
            self.controller = EndpointsController(self.store)
            self._servers.append(_listener(self.listen, self.api))
            for name, address in self.netns_listen.items():
                with netns.entered(netns.path(name)):
                    self._servers.append(_listener(address, self.api))
        except BaseException:
            self.stop()
            raise
        self.controller.start()
        for server in self._servers:
            threading.Thread(
                target=server.serve_forever,
                args=(0.1,),
                name=f"apiserver {server.server_address}",
                daemon=True,
            ).start()
            self._serving.append(server)
        return self

    def stop(self) -> None:
        """Stop accepting, end every watch, stop the controller and timers, close the data file."""
        for server in self._serving:
            server.shutdown()
        for server in self._servers:
            server.server_close()
        if self.controller:
            self.controller.stop()
        if self.api:
            self.api.stop_timers()
        if self.store:
            self.store.close()
        self._servers, self._serving = [], []

    def __enter__(self) -> LabApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_kubeconfig(path: str, server_url: str, name: str = "netagent-lab") -> None:
    """A kubeconfig pointing kubectl and the `kubernetes` client at `server_url` (plain http, no auth)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server_url}}],
        "users": [{"name": name, "user": {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    }
    atomic_write(path, yaml.safe_dump(config, sort_keys=False), mode=0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.apiserver", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="state file (created if missing)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="ADDR:PORT on the host side (port 0: any)")
    parser.add_argument(
        "--listen-netns",
        action="append",
        default=[],
        metavar="NETNS=ADDR:PORT",
        help="also listen inside named network namespace NETNS",
    )
    parser.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR, help="CIDR[,CIDR] for ClusterIPs")
    parser.add_argument("--ready-file", help="write {url, port, pid} here as JSON once listening")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for the host-side listener here")
    parser.add_argument("--history", type=int, default=5000, help="watch history window, in events")
    parser.add_argument("--bookmark-interval", type=float, default=30.0, help="seconds between BOOKMARKs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s apiserver %(levelname)s %(message)s",
    )
    try:
        netns_listen = dict(item.split("=", 1) for item in args.listen_netns)
    except ValueError:
        parser.error("--listen-netns takes NETNS=ADDR:PORT")
    server = LabApiServer(
        args.data,
        args.listen,
        netns_listen,
        args.service_cidr.split(","),
        args.history,
        args.bookmark_interval,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (OSError, ValueError) as e:
        print(f"lab apiserver: cannot start: {e}", file=sys.stderr)
        return 1
    try:
        if args.kubeconfig:
            write_kubeconfig(args.kubeconfig, server.url)
        if args.ready_file:
            port = int(server.url.rsplit(":", 1)[1])
            atomic_write(args.ready_file, json.dumps({"url": server.url, "port": port, "pid": os.getpid()}))
        log.info("serving on %s%s", server.url, "".join(f", {n}={a}" for n, a in netns_listen.items()))
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
