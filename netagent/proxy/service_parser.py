"""One Service and its EndpointSlices -> this node's ServicePorts, validated.

One ServicePort per (service, port, IP family), so dual-stack services become two entries, each with
its endpoints categorized for this node (netagent.proxy.policy.categorize_endpoints).
A Service that cannot be programmed raises InvalidService, and the SnapshotBuilder logs and skips
that one Service; an EndpointSlice that cannot be used raises InvalidSlice in parse_slice, and only
that slice is left out (a slice labelled with a good Service's name cannot take it down). Objects
arrive as JSON, so every field read is checked for its type here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from typing import Any, NamedTuple

from netagent.proxy.fields import json_field, json_fields, json_path
from netagent.proxy.policy import categorize_endpoints
from netagent.proxy.service import Endpoint, ServicePort

PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the Kubernetes default for sessionAffinity ClientIP
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class InvalidService(ValueError):
    """A Service that cannot be programmed; the message says why."""


class InvalidSlice(ValueError):
    """An EndpointSlice that cannot be used; the Service keeps its other slices."""


class ParsedSlice(NamedTuple):
    """What a proxy needs of one valid EndpointSlice."""

    family: int  # 4 or 6; 0 for an address type no proxy serves (FQDN)
    ports: dict[tuple[str, str], int]  # (port name, protocol) -> number
    # per endpoint: (addresses, node name, ready, serving, terminating)
    endpoints: tuple[tuple[tuple[str, ...], str, bool, bool, bool], ...]


def parse_slice(es: Any) -> ParsedSlice:
    """One EndpointSlice, every field the proxy reads checked for its type and range (a real API
    server would have refused the rest; an API server stand-in or a newer one may not)."""
    address_type = json_field(es, "addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidSlice(f"addressType {address_type!r} is not IPv4, IPv6 or FQDN")
    if address_type == "FQDN":
        return ParsedSlice(0, {}, ())
    family = int(address_type[-1])
    ports: dict[tuple[str, str], int] = {}
    for sp in _list(json_field(es, "ports"), "ports", InvalidSlice):
        name, protocol, number = json_fields(sp, "name", "protocol", "port")
        name = _text(name, "port name", InvalidSlice)
        protocol = _text(protocol, "port protocol", InvalidSlice) or "TCP"
        if number is not None:  # a port the endpoints do not serve (yet)
            ports[(name, protocol)] = _int_in(number, 1, 65535, "port", InvalidSlice)
    endpoints = []
    for ep in _list(json_field(es, "endpoints"), "endpoints", InvalidSlice):
        addresses, node_name, cond = json_fields(ep, "addresses", "nodeName", "conditions")
        ready, serving, terminating = (_flag(v, InvalidSlice) for v in json_fields(cond, "ready", "serving",
                                                                                     "terminating"))
        ready = ready is not False  # unknown counts as ready (the API's documented default)
        serving = ready if serving is None else serving
        ips = []
        for ip in _list(addresses, "addresses", InvalidSlice):
            ip_family, canonical = _parse_ip(ip, InvalidSlice)
            if ip_family != family:
                raise InvalidSlice(f"address {canonical} is not {address_type}")
            ips.append(canonical)
        endpoints.append((tuple(ips), _text(node_name, "nodeName", InvalidSlice), ready, serving,
                          bool(terminating)))
    return ParsedSlice(family, ports, tuple(endpoints))


def service_ports(svc: Any, slices: list[ParsedSlice], node_name: str) -> list[ServicePort]:
    """The ServicePorts of `svc` for `node_name`; [] for Services a proxy has nothing to do with."""
    meta, spec = json_field(svc, "metadata"), json_field(svc, "spec")
    namespace, name = json_field(meta, "namespace") or "default", json_field(meta, "name") or ""
    for label in (namespace, name):
        if not isinstance(label, str) or not _DNS_LABEL.fullmatch(label):
            raise InvalidService(f"invalid name {label!r}")
    if spec is not None and not _is_object(spec):
        raise InvalidService("spec is not an object")
    svc_type = _text(json_field(spec, "type"), "type", InvalidService) or "ClusterIP"
    if svc_type == "ExternalName":
        return []
    cluster_ip = _text(json_field(spec, "clusterIP"), "clusterIP", InvalidService)
    cluster_ips = _list(json_field(spec, "clusterIPs"), "clusterIPs", InvalidService) or (
        [cluster_ip] if cluster_ip else [])
    if not cluster_ips or cluster_ips[0] == "None":
        return []  # headless (or not allocated yet): nothing for a proxy to do
    families = {}
    for ip in cluster_ips:
        family, canonical = _parse_ip(ip, InvalidService)
        if family in families:
            raise InvalidService(f"clusterIPs {cluster_ips!r} hold two IPv{family} addresses")
        families[family] = canonical
    external = [*_list(json_field(spec, "externalIPs"), "externalIPs", InvalidService)]
    if svc_type == "LoadBalancer":
        ingress = _list(json_path(svc, "status", "loadBalancer", "ingress"), "ingress", InvalidService)
        external += [ip for ip in (json_field(i, "ip") for i in ingress) if ip]
    external_by_family: dict[int, set[str]] = {4: set(), 6: set()}
    for ip in external:
        family, canonical = _parse_ip(ip, InvalidService)
        external_by_family[family].add(canonical)
    affinity = 0
    affinity_config = json_field(spec, "sessionAffinityConfig")
    if affinity_config is not None and not _is_object(affinity_config):
        raise InvalidService(f"sessionAffinityConfig {affinity_config!r} is not an object")
    if json_field(spec, "sessionAffinity") == "ClientIP":
        timeout = json_path(affinity_config, "clientIP", "timeoutSeconds")
        affinity = _int_in(timeout or DEFAULT_AFFINITY_TIMEOUT, 1, 86400, "timeout", InvalidService)
    external_local = json_field(spec, "externalTrafficPolicy") == "Local"
    internal_local = json_field(spec, "internalTrafficPolicy") == "Local"
    uses_node_ports = svc_type in ("NodePort", "LoadBalancer")
    health_port = json_field(spec, "healthCheckNodePort") or 0
    if health_port:
        _int_in(health_port, 1, 65535, "healthCheckNodePort", InvalidService)

    result, seen_names, seen_ports = [], set(), set()
    for sp in _list(json_field(spec, "ports"), "ports", InvalidService):
        if not _is_object(sp):
            raise InvalidService(f"port {sp!r} is not an object")
        port_name = _text(json_field(sp, "name"), "port name", InvalidService)
        if port_name and not _PORT_NAME.fullmatch(port_name):
            raise InvalidService(f"invalid port name {port_name!r}")
        protocol = _text(json_field(sp, "protocol"), "protocol", InvalidService) or "TCP"
        if protocol not in PROTOCOLS:
            raise InvalidService(f"unsupported protocol {protocol!r}")
        port = _int_in(json_field(sp, "port"), 1, 65535, "port", InvalidService)
        # the API server refuses these; two entries for one port would program it twice
        if port_name in seen_names or (port, protocol) in seen_ports:
            raise InvalidService(f"duplicate port {port_name or port}/{protocol}")
        seen_names.add(port_name)
        seen_ports.add((port, protocol))
        node_port = json_field(sp, "nodePort") if uses_node_ports else None
        node_port = _int_in(node_port, 1, 65535, "nodePort", InvalidService) if node_port else 0
        for family, cluster_ip in sorted(families.items()):
            endpoints = _endpoints(slices, family, port_name, protocol)
            cluster_endpoints, external_endpoints = categorize_endpoints(
                endpoints, node_name, internal_local, external_local
            )
            result.append(
                ServicePort(
                    namespace=namespace,
                    name=name,
                    port_name=port_name,
                    family=family,
                    protocol=protocol,
                    port=port,
                    cluster_ip=cluster_ip,
                    node_port=node_port,
                    external_ips=tuple(sorted(external_by_family[family])),
                    affinity_timeout=affinity,
                    external_local=external_local,
                    internal_local=internal_local,
                    health_check_node_port=health_port if external_local else 0,
                    cluster_endpoints=cluster_endpoints,
                    external_endpoints=external_endpoints,
                )
            )
    return result


def _endpoints(slices: list[ParsedSlice], family: int, port_name: str, protocol: str) -> list[Endpoint]:
    """Endpoints of one service port: the slice port with the same name gives the (resolved) number."""
    found: dict[tuple[str, int], Endpoint] = {}
    for parsed in slices:
        number = parsed.ports.get((port_name, protocol)) if parsed.family == family else None
        if number is None:
            continue
        for ips, node_name, ready, serving, terminating in parsed.endpoints:
            for ip in ips:
                found[(ip, number)] = Endpoint(ip, number, node_name, ready, serving, terminating)
    return list(found.values())


def _is_object(value: Any) -> bool:
    """A JSON object, or the official client's model of one."""
    return isinstance(value, dict) or hasattr(type(value), "attribute_map")


def _list(value: Any, what: str, error: type[ValueError]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise error(f"{what} {value!r} is not a list")
    return value


def _text(value: Any, what: str, error: type[ValueError]) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise error(f"{what} {value!r} is not a string")
    return value


def _flag(value: Any, error: type[ValueError]) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise error(f"condition {value!r} is not true, false or absent")
    return value


def _parse_ip(ip: Any, error: type[ValueError]) -> tuple[int, str]:
    if not isinstance(ip, str):
        raise error(f"address {ip!r} is not a string")
    parsed = _parse_ip_text(ip)
    if parsed is None:
        raise error(f"invalid IP address {ip!r}")
    return parsed


@functools.lru_cache(maxsize=1 << 17)
def _parse_ip_text(ip: str) -> tuple[int, str] | None:
    """(family, canonical text), None if not an address; cached: the same endpoint IPs come back on
    every rebuild. IPv4 goes through inet_pton (strict dotted quad, as ipaddress), ~5x faster than
    ipaddress for the 100,000 endpoint addresses of a cold start; IPv6 through ipaddress for its
    canonical (RFC 5952) text."""
    try:
        return 4, socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip))
    except (OSError, ValueError):  # ValueError: text inet_pton cannot encode (a lone surrogate, a NUL)
        pass
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address.version, str(address)


def _int_in(value: Any, low: int, high: int, what: str, error: type[ValueError]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{what} {value!r} is not an integer in {low}..{high}")
    return value
