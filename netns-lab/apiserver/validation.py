"""Shape checks on incoming objects, so a malformed body gets 422 instead of breaking a controller later."""

from __future__ import annotations

from netns_lab.apiserver.api_errors import invalid


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
