"""The ADD result object, shaped as the spec's version requested by the runtime."""

from __future__ import annotations

from typing import Any

from cni.config import IPAddress, IpRange
from cni.links import Link, default_route

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
