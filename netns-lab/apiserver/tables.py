"""kubectl's Table output (`kubectl get`, -o wide, --watch), rendered server-side as the apiserver does.

kubectl asks for `as=Table` and prints the columns it gets back, so these columns are what a lab user
sees; they follow kubectl's own for the resources served here."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from netns_lab.apiserver.resources import Resource


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
