"""Checks on incoming objects, so a body the real apiserver refuses is refused here too instead of being
stored (and breaking a controller or an agent later): first decoding into the API's types (a value of
the wrong JSON type is 400, as Go's typed decoding fails), then each kind's validation (422)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime

from netns_lab.apiserver.api_errors import FieldError, bad_request, invalid_object, shown

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_MAX = 63
ENDPOINTSLICE_MAX_PORTS = 100  # the EndpointSlice API's documented limits
ENDPOINTSLICE_MAX_ENDPOINTS = 1000


@dataclass(frozen=True)
class Struct:
    """A Go struct of the API: its type name (for messages) and the JSON fields whose type is checked;
    other fields pass untouched (a newer client's fields are not this server's to judge)."""

    name: str
    fields: dict[str, Schema]


# A scalar is named by its Go type; a one-element list is a Go slice of that element.
Schema = Struct | str | list
STRING, INT32, INT64, BOOL, TIME = "string", "int32", "int64", "bool", "metav1.Time"
INT_OR_STRING, STRING_MAP = "intstr.IntOrString", "map[string]string"
_INT_RANGES = {INT32: 2**31, INT64: 2**63}
_ZERO: dict[str, object] = {STRING: "", INT32: 0, INT64: 0, BOOL: False, INT_OR_STRING: 0, STRING_MAP: {}}
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)

OBJECT_META = Struct("ObjectMeta", {
    "name": STRING, "generateName": STRING, "namespace": STRING, "uid": STRING, "resourceVersion": STRING,
    "generation": INT64, "creationTimestamp": TIME, "deletionTimestamp": TIME,
    "deletionGracePeriodSeconds": INT64, "labels": STRING_MAP, "annotations": STRING_MAP,
    "finalizers": [STRING],
})
SERVICE = Struct("Service", {
    "metadata": OBJECT_META,
    "spec": Struct("ServiceSpec", {
        "ports": [Struct("ServicePort", {
            "name": STRING, "protocol": STRING, "appProtocol": STRING, "port": INT32,
            "targetPort": INT_OR_STRING, "nodePort": INT32})],
        "selector": STRING_MAP, "clusterIP": STRING, "clusterIPs": [STRING], "type": STRING,
        "externalIPs": [STRING], "sessionAffinity": STRING, "loadBalancerIP": STRING,
        "loadBalancerSourceRanges": [STRING], "externalName": STRING, "externalTrafficPolicy": STRING,
        "healthCheckNodePort": INT32, "publishNotReadyAddresses": BOOL,
        "sessionAffinityConfig": Struct("SessionAffinityConfig", {
            "clientIP": Struct("ClientIPConfig", {"timeoutSeconds": INT32})}),
        "ipFamilies": [STRING], "ipFamilyPolicy": STRING, "allocateLoadBalancerNodePorts": BOOL,
        "loadBalancerClass": STRING, "internalTrafficPolicy": STRING,
    }),
    "status": Struct("ServiceStatus", {"loadBalancer": Struct("LoadBalancerStatus", {
        "ingress": [Struct("LoadBalancerIngress", {"ip": STRING, "hostname": STRING, "ipMode": STRING})]})}),
})
ENDPOINT_SLICE = Struct("EndpointSlice", {
    "metadata": OBJECT_META,
    "addressType": STRING,
    "endpoints": [Struct("Endpoint", {
        "addresses": [STRING],
        "conditions": Struct("EndpointConditions", {"ready": BOOL, "serving": BOOL, "terminating": BOOL}),
        "hostname": STRING, "nodeName": STRING, "zone": STRING,
        "targetRef": Struct("ObjectReference", {
            "kind": STRING, "namespace": STRING, "name": STRING, "uid": STRING, "apiVersion": STRING}),
    })],
    "ports": [Struct("EndpointPort", {
        "name": STRING, "protocol": STRING, "port": INT32, "appProtocol": STRING})],
})
_SCHEMAS = {"Service": SERVICE, "EndpointSlice": ENDPOINT_SLICE}


class _DecodeError(Exception):
    """Why a value cannot be decoded into its Go type (the apiserver's message after its prefix)."""


def decoded(kind: str, version: str, obj: dict) -> dict:
    """The object as the real apiserver decodes it into the API's Go types before validating it: a
    value of the wrong JSON type fails the whole request with 400 (not 422: it never becomes an object),
    a null is the field's zero value (so it is dropped, as the apiserver would not store it)."""
    schema = _SCHEMAS.get(kind, Struct(kind, {"metadata": OBJECT_META}))
    try:
        return _decode(obj, schema, "", kind)
    except _DecodeError as e:
        raise bad_request(f'{kind} in version "{version}" cannot be handled as a {kind}: {e}') from None


def _decode(value: object, schema: Schema, path: str, owner: str) -> object:
    """`value` decoded as `schema` at `path` (JSON names from the root) inside the struct `owner`."""
    if isinstance(schema, Struct):
        if not isinstance(value, dict):
            raise _type_error(value, _go_type(schema), path, owner)
        return {key: _decode(item, schema.fields[key], f"{path}.{key}".lstrip("."), schema.name)
                if key in schema.fields else item
                for key, item in value.items() if item is not None or key not in schema.fields}
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise _type_error(value, _go_type(schema), path, owner)
        return [_zero(schema[0]) if item is None else _decode(item, schema[0], path, owner) for item in value]
    if schema == STRING_MAP:
        if not isinstance(value, dict):
            raise _type_error(value, STRING_MAP, path, owner)
        for item in value.values():
            if item is not None and not isinstance(item, str):
                raise _type_error(item, STRING, path, owner)
        return {key: item or "" for key, item in value.items()}
    if schema == TIME:
        if not isinstance(value, str) or not _is_rfc3339(value):
            raise _DecodeError(f"{path}: {shown(value)} is not a time in RFC 3339 format")
    elif schema == INT_OR_STRING and not isinstance(value, str):
        return _decode(value, INT32, path, owner)
    elif not _is_scalar(value, schema):
        raise _type_error(value, schema, path, owner)
    return value


def _is_scalar(value: object, schema: str) -> bool:
    if schema in _INT_RANGES:
        limit = _INT_RANGES[schema]
        return isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit
    return isinstance(value, {STRING: str, BOOL: bool}.get(schema, object))


def _is_rfc3339(value: str) -> bool:
    if not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:  # a 13th month, a 25th hour: the right shape is not enough
        return False
    return True


def _zero(schema: Schema) -> object:
    """What a null list element decodes to: the element type's zero value."""
    return {} if isinstance(schema, Struct) else [] if isinstance(schema, list) else _ZERO[schema]


def _go_type(schema: Schema) -> str:
    if isinstance(schema, Struct):
        return f"v1.{schema.name}"
    return f"[]{_go_type(schema[0])}" if isinstance(schema, list) else schema


def _type_error(value: object, go_type: str, path: str, owner: str) -> _DecodeError:
    """Go's wording for a JSON value of the wrong type, so the message reads as the real server's."""
    if isinstance(value, bool):
        json_type = "bool"
    elif isinstance(value, int | float):
        json_type = f"number {value}" if go_type in _INT_RANGES else "number"
    else:
        json_type = {str: "string", list: "array", dict: "object"}[type(value)]
    return _DecodeError(f"json: cannot unmarshal {json_type} into Go struct field {owner}.{path} of type "
                        f"{go_type}")


def validate_service(svc: dict) -> None:
    """The Service rules the allocators, the endpoints controller and every agent rely on (on a
    decoded Service): ports well-formed, named when there are several, no name or port/protocol twice;
    cluster and external IPs addresses; every enum one the API knows; affinity and source ranges
    only where they mean something."""
    spec = svc["spec"]
    errors = _service_port_errors(spec.get("ports") or [])
    errors += _cluster_ip_errors(spec)
    errors += _service_enum_errors(spec)
    errors += _service_external_errors(spec)
    if errors:
        raise invalid_object("Service", svc["metadata"].get("name"), errors)


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
        number = port.get("port", 0)
        number_ok = 1 <= number <= 65535
        if not number_ok:
            errors.append(FieldError.invalid(f"{path}.port", number,
                                             "must be between 1 and 65535, inclusive"))
        protocol = port.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            errors.append(FieldError.not_supported(f"{path}.protocol", protocol, PROTOCOLS))
        elif number_ok and (number, protocol) in keys:
            errors.append(FieldError.duplicate(path, {"port": number, "protocol": protocol}))
        elif number_ok:
            keys.add((number, protocol))
    return errors


PROTOCOLS = ("SCTP", "TCP", "UDP")
SERVICE_ENUMS = {  # field: its values, the first the default an empty value means
    "type": ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort"),
    "sessionAffinity": ("None", "ClientIP"),
    "externalTrafficPolicy": ("Cluster", "Local"),
    "internalTrafficPolicy": ("Cluster", "Local"),
}
AFFINITY_TIMEOUT_MAX = 86400  # seconds: the API's limit for sessionAffinityConfig.clientIP.timeoutSeconds


def _service_enum_errors(spec: dict) -> list[FieldError]:
    """Enum values this API version defines (an unknown one would mean something to no one), and a
    sessionAffinityConfig only with ClientIP affinity, its timeout within the API's range."""
    errors = [FieldError.not_supported(f"spec.{field}", spec[field], values)
              for field, values in SERVICE_ENUMS.items() if spec.get(field, "") not in ("", *values)]
    config = spec.get("sessionAffinityConfig")
    if spec.get("sessionAffinity") == "ClientIP":
        timeout = ((config or {}).get("clientIP") or {}).get("timeoutSeconds", AFFINITY_TIMEOUT_MAX)
        if not 0 < timeout <= AFFINITY_TIMEOUT_MAX:
            errors.append(FieldError.invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout,
                                             f"must be greater than 0 and less than {AFFINITY_TIMEOUT_MAX}"))
    elif config is not None:
        errors.append(FieldError.invalid("spec.sessionAffinityConfig", config,
                                         "must not be set when session affinity is None"))
    if spec.get("type") == "ExternalName" and not is_dns_subdomain(spec.get("externalName", "")):
        errors.append(FieldError.invalid("spec.externalName", spec.get("externalName", ""),
                                         "must be a DNS-1123 subdomain"))
    return errors


def _service_external_errors(spec: dict) -> list[FieldError]:
    """externalIPs are unicast addresses a node could own; loadBalancerSourceRanges are CIDRs, and only
    for LoadBalancer Services (the agent builds rules from both)."""
    errors: list[FieldError] = []
    for i, ip in enumerate(spec.get("externalIPs") or []):
        why = _special_ip_error(ip)
        if why:
            errors.append(FieldError.invalid(f"spec.externalIPs[{i}]", ip, why))
    ranges = spec.get("loadBalancerSourceRanges") or []
    if ranges and spec.get("type") != "LoadBalancer":
        errors.append(FieldError.forbidden("spec.loadBalancerSourceRanges",
                                           "may only be used when `type` is 'LoadBalancer'"))
    for i, cidr in enumerate(ranges):
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            errors.append(FieldError.invalid(f"spec.loadBalancerSourceRanges[{i}]", cidr,
                                             "must be a list of IP ranges, e.g. 10.240.0.0/24"))
    return errors


def _special_ip_error(ip: str, version: int | None = None) -> str | None:
    """Why `ip` cannot be a Service's external or an endpoint's address: not an address (of the family
    wanted), or one that never leaves a host (unspecified, loopback, link-local)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        address = None
    if address is None or version not in (None, address.version):
        family = {4: "IPv4 ", 6: "IPv6 "}.get(version or 0, "IP ")
        return f"must be a valid {family}address"
    if address.is_unspecified:
        return "may not be unspecified (0.0.0.0 or ::)"
    if address.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if address.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if address in LINK_LOCAL_MULTICAST[address.version]:
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/16)"
    return None


LINK_LOCAL_MULTICAST = {4: ipaddress.ip_network("224.0.0.0/24"), 6: ipaddress.ip_network("ff02::/16")}
_DNS_SUBDOMAIN_MAX = 253


def is_dns_label(value: object) -> bool:
    return isinstance(value, str) and len(value) <= DNS_LABEL_MAX and bool(_DNS_LABEL.fullmatch(value))


def is_dns_subdomain(value: str) -> bool:
    return 0 < len(value) <= _DNS_SUBDOMAIN_MAX and all(is_dns_label(label) for label in value.split("."))
def _cluster_ip_errors(spec: dict) -> list[FieldError]:
    """clusterIP/clusterIPs as the apiserver checks them before any allocation: addresses (or the lone
    "None"), at most one per family, clusterIPs[0] the same as clusterIP."""
    cluster_ip, cluster_ips = spec.get("clusterIP"), spec.get("clusterIPs")
    if cluster_ips is None:
        cluster_ips = [cluster_ip] if cluster_ip else []
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
    """A decoded EndpointSlice as the API defines it: a known addressType, every endpoint with
    addresses of that type, ports named and of a known protocol, within the size limits. The agent
    turns each of these into kernel rules, so what no real cluster could hold is refused here."""
    address_type = eps.get("addressType", "")
    errors: list[FieldError] = []
    if address_type == "":
        errors.append(FieldError.required("addressType"))
    elif address_type not in ADDRESS_TYPES:
        errors.append(FieldError.not_supported("addressType", address_type, ADDRESS_TYPES))
    for field, limit in (("ports", ENDPOINTSLICE_MAX_PORTS), ("endpoints", ENDPOINTSLICE_MAX_ENDPOINTS)):
        if len(eps.get(field) or []) > limit:
            errors.append(FieldError.too_many(field, len(eps[field]), limit))
    if not errors:
        for i, endpoint in enumerate(eps.get("endpoints") or []):
            errors += _endpoint_errors(endpoint, f"endpoints[{i}]", address_type)
        errors += _endpoint_port_errors(eps.get("ports") or [])
    if errors:
        raise invalid_object("EndpointSlice", eps["metadata"].get("name"), errors)


ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")
ENDPOINT_MAX_ADDRESSES = 100


def _endpoint_errors(endpoint: dict, path: str, address_type: str) -> list[FieldError]:
    addresses = endpoint.get("addresses") or []
    errors: list[FieldError] = []
    if not addresses:
        errors.append(FieldError.required(f"{path}.addresses"))
    elif len(addresses) > ENDPOINT_MAX_ADDRESSES:
        errors.append(FieldError.too_many(f"{path}.addresses", len(addresses), ENDPOINT_MAX_ADDRESSES))
    for i, address in enumerate(addresses[:ENDPOINT_MAX_ADDRESSES]):
        if address_type == "FQDN":
            why = None if "." in address.rstrip(".") and is_dns_subdomain(address.rstrip(".")) else \
                "must be a fully qualified domain name"
        else:
            why = _special_ip_error(address, 4 if address_type == "IPv4" else 6)
        if why:
            errors.append(FieldError.invalid(f"{path}.addresses[{i}]", address, why))
    if endpoint.get("hostname", "") != "" and not is_dns_label(endpoint["hostname"]):
        errors.append(FieldError.invalid(f"{path}.hostname", endpoint["hostname"],
                                         "must be a DNS-1123 label"))
    if endpoint.get("nodeName", "") != "" and not is_dns_subdomain(endpoint["nodeName"]):
        errors.append(FieldError.invalid(f"{path}.nodeName", endpoint["nodeName"],
                                         "must be a DNS-1123 subdomain"))
    return errors


def _endpoint_port_errors(ports: list[dict]) -> list[FieldError]:
    errors: list[FieldError] = []
    names: set[str] = set()
    for i, port in enumerate(ports):
        path, name = f"ports[{i}]", port.get("name", "")
        if name != "" and not is_dns_label(name):
            errors.append(FieldError.invalid(f"{path}.name", name, "must be a DNS-1123 label"))
        elif name in names:
            errors.append(FieldError.duplicate(f"{path}.name", name))
        names.add(name)
        if port.get("protocol", "TCP") not in PROTOCOLS:
            errors.append(FieldError.not_supported(f"{path}.protocol", port["protocol"], PROTOCOLS))
    return errors  # the port number is any int32: the API leaves its meaning to the consumer
