"""Checks on incoming objects, so a body the real apiserver refuses gets 422 here too instead of being
stored (and breaking a controller or an agent later)."""

from __future__ import annotations

import ipaddress
import re

from netns_lab.apiserver.api_errors import FieldError, invalid, invalid_object, shown

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_MAX = 63
ENDPOINTSLICE_MAX_PORTS = 100  # the EndpointSlice API's documented limits
ENDPOINTSLICE_MAX_ENDPOINTS = 1000


def is_string_map(value: object) -> bool:
    """True for a map of strings to strings (labels, annotations, selectors)."""
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


def validate_service(svc: dict) -> None:
    """The Service rules the allocators, the endpoints controller and every agent rely on: ports
    well-formed, named when there are several, no name or port/protocol twice; cluster IPs addresses."""
    spec = svc.get("spec")
    name = svc["metadata"].get("name")
    if not isinstance(spec, dict):
        raise invalid_object("Service", name, [FieldError.invalid("spec", spec, "must be an object")])
    errors: list[FieldError] = []
    if spec.get("selector") is not None and not is_string_map(spec["selector"]):
        errors.append(FieldError.invalid("spec.selector", spec["selector"],
                                         "must be a map of strings to strings"))
    ports = spec.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
        errors.append(FieldError.invalid("spec.ports", ports, "must be a list of objects"))
    else:
        errors += _service_port_errors(ports)
    errors += _cluster_ip_errors(spec)
    if errors:
        raise invalid_object("Service", name, errors)


def _service_port_errors(ports: list[dict]) -> list[FieldError]:
    errors: list[FieldError] = []
    names: set[str] = set()
    keys: set[tuple[object, object]] = set()
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        port_name = port.get("name", "")
        if port_name == "" and len(ports) > 1:
            errors.append(FieldError.required(f"{path}.name"))
        elif port_name != "":
            if not is_dns_label(port_name):
                errors.append(FieldError.invalid(f"{path}.name", port_name, "must be a DNS-1123 label"))
            elif port_name in names:
                errors.append(FieldError.duplicate(f"{path}.name", port_name))
            else:
                names.add(port_name)
        number = port.get("port")
        number_ok = isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535
        if not number_ok:
            errors.append(FieldError.invalid(f"{path}.port", number,
                                             "must be between 1 and 65535, inclusive"))
        protocol = port.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            errors.append(FieldError(f"{path}.protocol", "FieldValueNotSupported",
                                     f'Unsupported value: {shown(protocol)}: supported values: '
                                     '"SCTP", "TCP", "UDP"'))
        elif number_ok and (number, protocol) in keys:
            errors.append(FieldError.duplicate(path, {"port": number, "protocol": protocol}))
        elif number_ok:
            keys.add((number, protocol))
        if not isinstance(port.get("targetPort", 0), int | str):
            errors.append(FieldError.invalid(f"{path}.targetPort", port["targetPort"],
                                             "must be a number or a port name"))
        if not isinstance(port.get("nodePort") or 0, int):
            errors.append(FieldError.invalid(f"{path}.nodePort", port["nodePort"], "must be a number"))
    return errors


def is_dns_label(value: object) -> bool:
    return isinstance(value, str) and len(value) <= DNS_LABEL_MAX and bool(_DNS_LABEL.fullmatch(value))


def _cluster_ip_errors(spec: dict) -> list[FieldError]:
    """clusterIP/clusterIPs as the apiserver checks them before any allocation: strings that are
    addresses (or the lone "None"), at most one per family, clusterIPs[0] the same as clusterIP."""
    cluster_ip, cluster_ips = spec.get("clusterIP"), spec.get("clusterIPs")
    if cluster_ip is not None and not isinstance(cluster_ip, str):
        return [FieldError.invalid("spec.clusterIP", cluster_ip, "must be a string")]
    if cluster_ips is None:
        cluster_ips = [cluster_ip] if cluster_ip else []
    elif not isinstance(cluster_ips, list) or not all(isinstance(ip, str) for ip in cluster_ips):
        return [FieldError.invalid("spec.clusterIPs", cluster_ips, "must be a list of strings")]
    elif cluster_ip and cluster_ips and cluster_ips[0] != cluster_ip:
        return [FieldError.invalid("spec.clusterIPs[0]", cluster_ips[0], "must be the same as clusterIP")]
    if cluster_ips == ["None"]:
        return []
    errors: list[FieldError] = []
    families: set[int] = set()
    if len(cluster_ips) > 2:
        errors.append(FieldError.too_many("spec.clusterIPs", len(cluster_ips), 2))
    for i, ip in enumerate(cluster_ips):
        try:
            version = ipaddress.ip_address(ip).version
        except ValueError:
            errors.append(FieldError.invalid(f"spec.clusterIPs[{i}]", ip,
                                             "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)"))
            continue
        if version in families:
            errors.append(FieldError.invalid(f"spec.clusterIPs[{i}]", ip, "may not have the same family as "
                                             "another cluster IP"))
        families.add(version)
    return errors


def validate_endpoint_slice(eps: dict) -> None:
    """The EndpointSlice API's size limits (what its shape may be, the agent checks: see issue 11)."""
    errors: list[FieldError] = []
    for field, limit in (("ports", ENDPOINTSLICE_MAX_PORTS), ("endpoints", ENDPOINTSLICE_MAX_ENDPOINTS)):
        items = eps.get(field)
        if isinstance(items, list) and len(items) > limit:
            errors.append(FieldError.too_many(field, len(items), limit))
    if errors:
        raise invalid_object("EndpointSlice", eps["metadata"].get("name"), errors)
