"""The resources the lab API server serves, and where they live in the URL space.

One table drives routing, discovery, OpenAPI and kubectl's Table output, so they cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    """One served resource: its URL path, discovery entry and store name all derive from this."""

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
