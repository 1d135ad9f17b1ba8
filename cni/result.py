"""The ADD result object, shaped as the spec's version requested by the runtime, and the same object
read back as CHECK's prevResult."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from cni import errors
from cni.config import REQUIRED, IPAddress, IPNetwork, IpRange, parse_address, parse_network, typed
from cni.errors import CniError
from cni.links import Link, default_route

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

POD = 2  # index of the pod's interface in "interfaces"


def add_result(
    cni_version: str,
    bridge: Link,
    host: Link,
    pod: Link,
    netns: str,
    mtu: int,
    addresses: list[IPAddress],
    ranges: tuple[IpRange, ...],
) -> dict[str, Any]:
    interfaces: list[dict[str, Any]] = [
        {"name": bridge.name, "mac": bridge.mac},
        {"name": host.name, "mac": host.mac},
        {"name": pod.name, "mac": pod.mac, "sandbox": netns},
    ]
    if cni_version == "1.1.0":  # the interface mtu field exists from 1.1.0 on
        for interface in interfaces[1:]:
            interface["mtu"] = mtu
    return {
        "cniVersion": cni_version,
        "interfaces": interfaces,
        "ips": [
            {"address": f"{address}/{pool.subnet.prefixlen}", "gateway": str(pool.gateway), "interface": POD}
            for address, pool in zip(addresses, ranges, strict=True)
        ],
        "routes": [{"dst": default_route(pool.subnet.version), "gw": str(pool.gateway)} for pool in ranges],
        "dns": {},
    }


@dataclass(frozen=True)
class PrevInterface:
    name: str
    mac: str | None


@dataclass(frozen=True)
class PrevIp:
    address: IPInterface
    interface: int  # index into PrevResult.interfaces


@dataclass(frozen=True)
class PrevRoute:
    dst: IPNetwork
    gw: IPAddress | None


@dataclass(frozen=True)
class PrevResult:
    """The parts of a prevResult that CHECK compares with the kernel, every field type-checked."""

    interfaces: tuple[PrevInterface, ...]
    ips: tuple[PrevIp, ...]
    routes: tuple[PrevRoute, ...]


def parse_prev_result(raw: dict[str, Any]) -> PrevResult:
    """INVALID_CONFIG for anything not shaped as the spec's result: the runtime echoes back what an
    ADD returned, so a malformed one is the config's fault and must not surface as an internal error."""
    interfaces = tuple(
        PrevInterface(
            _field(item, "interfaces[]", "name", str), _field(item, "interfaces[]", "mac", str, optional=True)
        )
        for item in _objects(raw, "interfaces")
    )
    ips = []
    for item in _objects(raw, "ips"):
        address = _interface(_field(item, "ips[]", "address", str), "prevResult ips[].address")
        index = _field(item, "ips[]", "interface", int, optional=True)
        if index is not None and not 0 <= index < len(interfaces):
            raise CniError(errors.INVALID_CONFIG, f"prevResult ips[].interface {index} names no interface")
        ips.append(PrevIp(address, POD if index is None else index))
    routes = tuple(
        PrevRoute(
            parse_network(_field(item, "routes[]", "dst", str), "prevResult routes[].dst"),
            _optional_address(_field(item, "routes[]", "gw", str, optional=True), "prevResult routes[].gw"),
        )
        for item in _objects(raw, "routes")
    )
    return PrevResult(interfaces, tuple(ips), routes)


def _objects(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = raw.get(key, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CniError(errors.INVALID_CONFIG, f"prevResult {key} must be a list of objects, got {items!r}")
    return items


def _field(item: dict[str, Any], where: str, key: str, kind: type, optional: bool = False) -> Any:
    return typed(item, key, kind, None if optional else REQUIRED, where=f"prevResult {where}.")


def _optional_address(text: str | None, what: str) -> IPAddress | None:
    return None if text is None else parse_address(text, what)


def _interface(text: str, what: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise CniError(errors.INVALID_CONFIG, f"{what} is not an address with a prefix: {text!r}") from None
