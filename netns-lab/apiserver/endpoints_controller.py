"""The lab's EndpointSlice controller: what kube-controller-manager's endpointslice controller does.

For every Service with a selector, EndpointSlices (discovery.k8s.io/v1) list the matching pods that have
an IP: per address family of the Service, ports resolved per pod (a named targetPort is looked up in the
pod's container ports, so pods may resolve differently and then land in different slices), conditions
from the pod's Ready condition and deletionTimestamp. Services without a selector are left alone: their
slices are the user's. Object store events mark Services dirty; one thread reconciles their slices,
so a burst of pod changes becomes few writes, and a slice is only written when its content changes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading

from netns_lab.apiserver.store import Event, ObjectStore

log = logging.getLogger("netns_lab.apiserver.endpoints_controller")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
MAX_ENDPOINTS_PER_SLICE = 100  # the real controller's default
SLICE_FIELDS = ("addressType", "endpoints", "ports")

ServiceKey = tuple[str, str]  # (namespace, name)


def selects(selector: dict | None, pod: dict) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_ips(pod: dict) -> dict[str, list[str]]:
    """The pod's IPs by address family ("IPv4"/"IPv6"); anything that is not an IP is left out."""
    status = pod.get("status") or {}
    ips = [entry.get("ip") for entry in status.get("podIPs") or []] or [status.get("podIP")]
    by_family: dict[str, list[str]] = {}
    for ip in ips:
        try:
            by_family.setdefault(f"IPv{ipaddress.ip_address(ip).version}", []).append(ip)
        except ValueError:
            continue
    return by_family


def is_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def resolve_ports(service: dict, pod: dict) -> tuple[tuple[str, int, str], ...]:
    """(name, port, protocol) per Service port this pod serves; a named targetPort it lacks is left out."""
    container_ports = [
        p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []
    ]
    resolved = []
    for port in service["spec"].get("ports") or []:
        target, protocol = port.get("targetPort", port.get("port")), port.get("protocol", "TCP")
        if isinstance(target, str) and not target.isdigit():
            target = next(
                (
                    p["containerPort"]
                    for p in container_ports
                    if p.get("name") == target and p.get("protocol", "TCP") == protocol
                ),
                None,
            )
        if target is not None:
            resolved.append((port.get("name", ""), int(target), protocol))
    return tuple(resolved)


def endpoint(pod: dict, address: str, publish_not_ready: bool) -> dict:
    meta = pod["metadata"]
    terminating = bool(meta.get("deletionTimestamp"))
    serving = is_ready(pod) or publish_not_ready
    result = {
        "addresses": [address],
        "conditions": {"ready": serving and not terminating, "serving": serving, "terminating": terminating},
        "targetRef": {
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        },
    }
    if (pod.get("spec") or {}).get("nodeName"):
        result["nodeName"] = pod["spec"]["nodeName"]
    return result


def desired_slices(service: dict, pods: list[dict]) -> dict[str, dict]:
    """The EndpointSlices a Service should have, by name (names are a digest of their content group)."""
    meta, spec = service["metadata"], service["spec"]
    families = spec.get("ipFamilies") or ["IPv4"]
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[tuple[str, tuple], list[dict]] = {}
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or not selects(
            spec["selector"], pod
        ):
            continue
        ports = resolve_ports(service, pod)
        for family in families:
            addresses = pod_ips(pod).get(family)
            if addresses:
                groups.setdefault((family, ports), []).append(endpoint(pod, addresses[0], publish_not_ready))
    if not groups:  # as the real controller: a placeholder slice says "selected, but nothing there"
        groups[(families[0], ())] = []
    slices = {}
    for (family, ports), endpoints in sorted(groups.items()):
        endpoints.sort(key=lambda e: e["addresses"][0])
        for start in range(0, max(len(endpoints), 1), MAX_ENDPOINTS_PER_SLICE):
            digest = hashlib.sha256(repr((family, ports, start)).encode()).hexdigest()[:5]
            name = f"{meta['name'][:57]}-{digest}"
            slices[name] = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": meta["namespace"],
                    "labels": {
                        **(meta.get("labels") or {}),
                        SERVICE_NAME_LABEL: meta["name"],
                        MANAGED_BY_LABEL: MANAGED_BY,
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Service",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "addressType": family,
                "endpoints": endpoints[start : start + MAX_ENDPOINTS_PER_SLICE],
                "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
            }
    return slices


class EndpointsController:
    """Keeps EndpointSlices in step with Services and Pods, in a thread of the API server process."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self._dirty: set[ServiceKey] = set()
        self._managed: dict[ServiceKey, set[str]] = {}  # Service -> names of the slices we manage for it
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="endpoints-controller", daemon=True)

    def start(self) -> None:
        with self.store.lock:
            self.store.add_listener(self._on_event)
            services, _ = self.store.list("services")
            slices, _ = self.store.list("endpointslices")
            for slice_ in slices:
                self._index(slice_, add=True)
            self._mark(
                {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in services} | set(self._managed)
            )
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _on_event(self, event: Event) -> None:
        """Runs under the store lock: only works out which Services are affected."""
        meta = event.obj["metadata"]
        if event.resource == "services":
            self._mark({(meta["namespace"], meta["name"])})
        elif event.resource == "endpointslices":
            if event.old is not None:
                self._index(event.old, add=False)
            if event.type != "DELETED":
                self._index(event.obj, add=True)
        elif event.resource == "pods":
            services, _ = self.store.list("services", meta["namespace"])
            self._mark(
                {
                    (meta["namespace"], s["metadata"]["name"])
                    for s in services
                    if selects((s.get("spec") or {}).get("selector"), event.obj)
                    or (event.old is not None and selects((s.get("spec") or {}).get("selector"), event.old))
                }
            )

    def _index(self, slice_: dict, add: bool) -> None:
        labels = slice_["metadata"].get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or SERVICE_NAME_LABEL not in labels:
            return
        names = self._managed.setdefault((slice_["metadata"]["namespace"], labels[SERVICE_NAME_LABEL]), set())
        if add:
            names.add(slice_["metadata"]["name"])
        else:
            names.discard(slice_["metadata"]["name"])

    def _mark(self, keys: set[ServiceKey]) -> None:
        if keys:
            with self._wake:
                self._dirty |= keys
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._dirty and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                keys, self._dirty = self._dirty, set()
            for key in sorted(keys):
                try:
                    self.reconcile_slices(*key)
                except Exception as e:  # an odd Pod or Service must not stop the controller for the others
                    log.error("endpointslices of service %s/%s: %s: %s", key[0], key[1], type(e).__name__, e)

    def reconcile_slices(self, namespace: str, name: str) -> None:
        """Make the Service's controller-managed EndpointSlices what they should be, writing only changes."""
        with self.store.lock:
            if self.store.closed:
                return
            service = self.store.find("services", namespace, name)
            want: dict[str, dict] = {}
            spec = (service or {}).get("spec") or {}
            if service is not None and spec.get("selector") and spec.get("type") != "ExternalName":
                pods, _ = self.store.list("pods", namespace)
                want = desired_slices(service, pods)
            have = {
                n: self.store.get("endpointslices", namespace, n)
                for n in self._managed.get((namespace, name), ())
            }
            for slice_name in have.keys() - want.keys():
                self.store.delete("endpointslices", namespace, slice_name)
            for slice_name, slice_ in want.items():
                current = have.get(slice_name)
                if current is None:
                    if self.store.find("endpointslices", namespace, slice_name) is None:
                        self.store.create("endpointslices", slice_)
                elif any(current.get(f) != slice_[f] for f in SLICE_FIELDS) or {
                    k: current["metadata"].get(k) for k in ("labels", "ownerReferences")
                } != {k: slice_["metadata"][k] for k in ("labels", "ownerReferences")}:
                    self.store.update(
                        "endpointslices",
                        {**current, **slice_, "metadata": {**current["metadata"], **slice_["metadata"]}},
                    )
