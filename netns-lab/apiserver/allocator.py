"""ClusterIP and nodePort allocation for Services.

The agent programs whatever addresses and ports Services carry, so the lab must hand them out as the
real apiserver does: unique, inside the configured ranges, kept across updates, released on delete."""

from __future__ import annotations

import ipaddress

from netns_lab.apiserver.api_errors import FieldError, invalid, invalid_object
from netns_lab.apiserver.store import ApiError, Event

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
NODE_PORT_RANGE = range(30000, 32768)


class ServiceAllocator:
    """ClusterIPs and nodePorts for Services, as the apiserver's allocators hand them out.

    Usage is tracked from store events, so it is rebuilt on restart from the objects themselves."""

    def __init__(self, service_cidrs: list[str]) -> None:
        self.networks = [ipaddress.ip_network(c) for c in service_cidrs]
        if not self.networks or len({n.version for n in self.networks}) != len(self.networks):
            raise ValueError("service CIDRs: one or two (one IPv4, one IPv6) networks expected")
        self.ips: dict[str, tuple[str, str]] = {}  # address -> (namespace, name) of the owner
        self.node_ports: dict[int, tuple[str, str]] = {}
        self._next_ip: dict[ipaddress._BaseNetwork, int] = {}  # per network: offset to try next

    def observe(self, event: Event) -> None:
        """A store listener: move the Service's claims from its old version to its new one."""
        if event.resource != "services":
            return
        if event.old:
            self._track(event.old, add=False)
        if event.type != "DELETED":
            self._track(event.obj, add=True)

    def _track(self, svc: dict, add: bool) -> None:
        owner = (svc["metadata"].get("namespace", ""), svc["metadata"]["name"])
        spec = svc.get("spec")
        if not isinstance(spec, dict):  # only a Service written straight into the store can be this odd
            return
        for ip in _list(spec.get("clusterIPs")):
            if isinstance(ip, str):
                self._claim(self.ips, ip, owner, add)
        for port in _list(spec.get("ports")):
            if isinstance(port, dict) and isinstance(port.get("nodePort"), int) and port["nodePort"]:
                self._claim(self.node_ports, port["nodePort"], owner, add)
        if isinstance(spec.get("healthCheckNodePort"), int) and spec["healthCheckNodePort"]:
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
        if len(ips) > 1 and policy == "SingleStack":
            raise self._invalid(owner, FieldError.invalid(
                "spec.ipFamilyPolicy", policy, "must be RequireDualStack or PreferDualStack when multiple "
                "cluster IPs are specified"))
        for i, ip in enumerate(ips):
            version = ipaddress.ip_address(ip).version
            if version not in families:
                raise self._invalid(owner, FieldError.invalid(
                    f"spec.clusterIPs[{i}]", ip, f"IPv{version} is not configured on this cluster "
                    f"(service CIDRs: {', '.join(map(str, self.networks))})"))
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
                self._check_ip(index, ips[index], network, owner)
            else:
                ips.append(self._free_ip(network))
        spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
        spec["ipFamilies"] = [f"IPv{ipaddress.ip_address(ip).version}" for ip in ips]

    def _check_ip(self, index: int, ip: str, network: ipaddress._BaseNetwork, owner: tuple[str, str]) -> None:
        """An asked-for address: inside the range, not its network address (nor, in IPv4, its broadcast
        address: the real allocator never hands those out), and not another Service's."""
        address = ipaddress.ip_address(ip)
        edges = {network.network_address} | ({network.broadcast_address} if network.version == 4 else set())
        if address not in network or address in edges:
            raise self._invalid(owner, FieldError.invalid(
                f"spec.clusterIPs[{index}]", ip,
                f"provided IP is not in the valid range. The range of valid IPs is {network}"))
        if self.ips.get(ip, owner) != owner:
            raise self._invalid(owner, FieldError.invalid(
                f"spec.clusterIPs[{index}]", ip, "provided IP is already allocated"))

    @staticmethod
    def _invalid(owner: tuple[str, str], error: FieldError) -> ApiError:
        return invalid_object("Service", owner[1], [error])

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


def _list(value: object) -> list:
    return value if isinstance(value, list) else []
