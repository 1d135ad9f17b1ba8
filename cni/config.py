"""Decoding what the runtime hands the plugin: CNI_* environment variables and the network config.

Everything is validated here, once, into frozen dataclasses, so the code that touches the kernel
never sees a raw dict or a malformed name. Values that only the node agent knows (pod CIDRs, MTU,
cluster CIDRs) are resolved separately by `resolve_network`, because DEL and GC must keep working
even when the agent's node state file is missing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cni import errors
from cni.errors import CniError
from nodekit import nodestate

SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
COMMANDS_WITHOUT_CONTAINER = ("GC", "STATUS", "VERSION")
PLUGIN_TYPE = "netagent"
DEFAULT_BRIDGE = "na0"
DEFAULT_MTU = 1500
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"
RANGE_KEYS = ("subnet", "rangeStart", "rangeEnd", "gateway")

# The spec's rule for network names and container ids, matched with fullmatch: `$` would also
# accept a trailing newline, and an id that is not the one DEL and GC are later given leaks its IP.
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# the name is a directory under dataDir (at most 255 bytes) and part of every host veth's alias (256)
MAX_NETWORK_NAME = 200
# the spec's forbidden characters, plus NUL and "%", which the kernel expands ("eth%d" -> "eth0")
_IFNAME_FORBIDDEN = re.compile(r"[/:\s\0%]")
IFNAMSIZ = 15  # bytes, not characters: the kernel's limit

# Addresses no pod can have. A pod subnet holding any of them is refused: it is either meaningless
# (a /0 makes the pod's own subnet its default route, so ADD can never finish) or shadows the node's
# loopback, link-local or multicast traffic.
_NEVER_POD_ADDRESSES = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/3",
        "::/127",
        "fe80::/10",
        "ff00::/8",
    )
)
_ABSENT = object()
REQUIRED = object()  # typed()'s default for a field that must be present
_JSON_TYPES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "a list"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Request:
    """The CNI_* environment of one invocation."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: str = ""

    @property
    def owner(self) -> tuple[str, str]:
        """The spec's attachment key within one network: (container id, interface name)."""
        return (self.container_id, self.ifname)


@dataclass(frozen=True)
class IpRange:
    """One address family's pool: addresses in [start, end] of subnet, minus the gateway."""

    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: IPAddress


@dataclass(frozen=True)
class NetConf:
    """The network config as written in the conflist (plus runtime-injected keys)."""

    cni_version: str
    name: str
    bridge: str
    mtu: int | None
    hairpin: bool
    ip_masq: bool
    cluster_cidrs: tuple[IPNetwork, ...]
    ranges: tuple[IpRange, ...]
    node_state_file: str
    data_dir: str
    prev_result: dict[str, Any] | None
    valid_attachments: frozenset[tuple[str, str]] | None


@dataclass(frozen=True)
class Network:
    """A NetConf with the node-dependent values filled in: what ADD, CHECK and STATUS work with."""

    conf: NetConf
    ranges: tuple[IpRange, ...]
    mtu: int
    cluster_cidrs: tuple[IPNetwork, ...]


def parse_request(env: Mapping[str, str]) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(errors.INVALID_ENV, f"CNI_COMMAND must be one of {', '.join(COMMANDS)}: {command!r}")
    if command in COMMANDS_WITHOUT_CONTAINER:
        return Request(command=command, path=env.get("CNI_PATH", ""))
    container_id = env.get("CNI_CONTAINERID", "")
    if not _NAME_RE.fullmatch(container_id):
        raise CniError(errors.INVALID_ENV, f"CNI_CONTAINERID is missing or invalid: {container_id!r}")
    ifname = env.get("CNI_IFNAME", "")
    if not valid_ifname(ifname):
        raise CniError(errors.INVALID_ENV, f"CNI_IFNAME is missing or invalid: {ifname!r}")
    netns = env.get("CNI_NETNS", "")
    if command != "DEL" and not netns:
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS is required for {command}")
    if "CNI_PATH" not in env:
        raise CniError(errors.INVALID_ENV, f"CNI_PATH is required for {command}")
    return Request(command, container_id, netns, ifname, env.get("CNI_ARGS", ""), env["CNI_PATH"])


def valid_ifname(name: str) -> bool:
    """The kernel's rule (dev_valid_name), which libcni applies too; the length counts UTF-8 bytes."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate, as os.environ decodes a non-UTF-8 byte
        return False
    return 0 < size <= IFNAMSIZ and name not in (".", "..") and not _IFNAME_FORBIDDEN.search(name)


def decode(stdin: bytes) -> dict[str, Any]:
    """The network config as a dict, or DECODE_FAILURE: whatever the bytes are, nothing but a
    CniError leaves here, and every string in the result can be encoded as UTF-8 again (a JSON
    escape such as "\\ud800" decodes to a lone surrogate that no path or netlink name can carry)."""
    try:
        raw = json.loads(stdin)
        json.dumps(raw, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise CniError(errors.DECODE_FAILURE, "network config is not valid JSON", str(e)) from None
    if not isinstance(raw, dict):
        raise CniError(errors.DECODE_FAILURE, "network config must be a JSON object")
    return raw


def check_version(raw: Mapping[str, Any]) -> str:
    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            errors.INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def parse_netconf(raw: Mapping[str, Any]) -> NetConf:
    version = check_version(raw)
    if raw.get("type") != PLUGIN_TYPE:
        raise CniError(errors.INVALID_CONFIG, f"type must be {PLUGIN_TYPE!r}, got {raw.get('type')!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CniError(errors.INVALID_CONFIG, f"name is missing or invalid: {name!r}")
    if len(name) > MAX_NETWORK_NAME:
        raise CniError(errors.INVALID_CONFIG, f"name is longer than {MAX_NETWORK_NAME} characters",
                       name[:40] + "...")
    bridge = typed(raw, "bridge", str, DEFAULT_BRIDGE)
    if not valid_ifname(bridge):
        raise CniError(errors.INVALID_CONFIG, f"bridge is not a valid interface name: {bridge!r}")
    mtu = typed(raw, "mtu", int, None)
    if mtu is not None and not 576 <= mtu <= 65535:
        raise CniError(errors.INVALID_CONFIG, f"mtu out of range: {mtu}")
    ipam = typed(raw, "ipam", dict, {})
    ipam_type = typed(ipam, "type", str, PLUGIN_TYPE, where="ipam.")
    if ipam_type != PLUGIN_TYPE:
        msg = f"ipam.type {ipam_type!r} is not supported: netagent has its own IPAM"
        raise CniError(errors.UNSUPPORTED_FIELD, msg)
    prev_result = typed(raw, "prevResult", dict, None)
    return NetConf(
        cni_version=version,
        name=name,
        bridge=bridge,
        mtu=mtu,
        hairpin=typed(raw, "hairpinMode", bool, True),
        ip_masq=typed(raw, "ipMasq", bool, False),
        cluster_cidrs=_cluster_cidrs(raw.get("clusterCIDR")),
        ranges=_ranges(ipam),
        node_state_file=_absolute_path(raw, "nodeStateFile", nodestate.DEFAULT_PATH),
        data_dir=_absolute_path(ipam, "dataDir", DEFAULT_DATA_DIR, where="ipam."),
        prev_result=prev_result,
        valid_attachments=_valid_attachments(raw),
    )


def resolve_network(conf: NetConf) -> Network:
    """Fill in pod CIDRs, MTU and cluster CIDRs from the agent's node state.

    The node state is the source only when the config names no subnet: a config with explicit
    subnets is self-contained (MTU defaults to 1500), so it never depends on the agent.
    """
    if conf.ranges:
        return Network(conf, conf.ranges, conf.mtu or DEFAULT_MTU, conf.cluster_cidrs)
    state = _read_node_state(conf.node_state_file)
    ranges = tuple(_range_from({"subnet": cidr}, "node state") for cidr in state.pod_cidrs)
    if not ranges:
        raise CniError(errors.TRY_AGAIN_LATER, f"node state {conf.node_state_file} lists no pod CIDR yet")
    _check_families(ranges)
    cluster = conf.cluster_cidrs or _cluster_cidrs(list(state.cluster_cidrs))
    return Network(conf, ranges, conf.mtu or state.mtu, cluster)


def _read_node_state(path: str):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read for ever
            raise CniError(errors.INVALID_CONFIG, f"node state {path} is not a regular file")
        return nodestate.read(path)
    except FileNotFoundError:
        raise CniError(
            errors.TRY_AGAIN_LATER,
            f"node state {path} does not exist: the netagent agent has not written it yet",
            "the plugin takes this node's pod CIDR and MTU from the agent; is `netagent run` running?",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CniError(errors.TRY_AGAIN_LATER, f"node state {path} is unreadable", repr(e)) from None


def typed(raw: Mapping[str, Any], key: str, kind: type, default: Any = REQUIRED, where: str = "") -> Any:
    """raw[key] if it is a `kind`, default if the key is absent, INVALID_CONFIG otherwise.

    JSON null stands for "absent" only where absent means no value (default None): `"bridge": null`
    is as wrong as `"bridge": 5`, rather than a value every later step would have to expect.
    """
    value = raw.get(key, _ABSENT)
    if value is _ABSENT and default is REQUIRED:
        raise CniError(errors.INVALID_CONFIG, f"{where}{key} is missing")
    if value is _ABSENT or (value is None and default is None):
        return default
    # bool is an int subclass: `"mtu": true` must not pass as 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CniError(errors.INVALID_CONFIG, f"{where}{key} must be {_JSON_TYPES[kind]}, got {value!r}")
    return value


def _absolute_path(raw: Mapping[str, Any], key: str, default: str, where: str = "") -> str:
    """A path the plugin writes or reads: relative ones ("" too) would depend on the caller's cwd."""
    path = typed(raw, key, str, default, where)
    if not os.path.isabs(path) or "\0" in path:
        raise CniError(errors.INVALID_CONFIG, f"{where}{key} must be an absolute path, got {path!r}")
    return path


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CniError(errors.INVALID_CONFIG, f"{what} must be a string, got {value!r}")
    return value


def _unzoned(text: Any, what: str) -> str:
    """Address text without an IPv6 zone ("fd00::1%eth0"), which ipaddress accepts and netlink not."""
    if "%" in _text(text, what):
        raise ValueError(text)
    return text


def parse_network(text: Any, what: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(_unzoned(text, what), strict=False)
    except ValueError:
        raise CniError(errors.INVALID_CONFIG, f"{what} is not a CIDR: {text!r}") from None


def parse_address(text: Any, what: str) -> IPAddress:
    try:  # ip_address(5) would be 0.0.0.5: only text is an address here
        return ipaddress.ip_address(_unzoned(text, what))
    except ValueError:
        raise CniError(errors.INVALID_CONFIG, f"{what} is not an IP address: {text!r}") from None


def _cluster_cidrs(value: Any) -> tuple[IPNetwork, ...]:
    """clusterCIDR may be one CIDR, a comma-separated pair (dual-stack) or a list."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise CniError(errors.INVALID_CONFIG, f"clusterCIDR must be a string or a list, got {value!r}")
    return tuple(parse_network(_text(item, "clusterCIDR").strip(), "clusterCIDR") for item in items)


def _ranges(ipam: Mapping[str, Any]) -> tuple[IpRange, ...]:
    specs: list[Any] = []
    if "subnet" in ipam:
        specs.append({key: ipam[key] for key in RANGE_KEYS if key in ipam})
    subnets = ipam.get("subnets", [])
    if not isinstance(subnets, list):
        raise CniError(errors.INVALID_CONFIG, "ipam.subnets must be a list")
    specs.extend({"subnet": item} if isinstance(item, str) else item for item in subnets)
    ranges = tuple(_range_from(spec, "ipam") for spec in specs)
    _check_families(ranges)
    return ranges


def _range_from(spec: Any, where: str) -> IpRange:
    if not isinstance(spec, dict):
        raise CniError(errors.INVALID_CONFIG, f"{where}: a subnet must be a CIDR string or an object")
    subnet = parse_network(spec.get("subnet"), f"{where} subnet")
    if subnet.num_addresses < 4:
        raise CniError(errors.INVALID_CONFIG, f"{where} subnet {subnet} is too small for pods")
    reserved = next((net for net in _NEVER_POD_ADDRESSES if subnet.overlaps(net)), None)
    if reserved is not None:
        msg = f"{where} subnet {subnet} cannot hold pods: it overlaps {reserved}"
        raise CniError(errors.INVALID_CONFIG, msg)
    first, last = subnet.network_address + 1, subnet.broadcast_address - 1
    gateway = parse_address(spec["gateway"], "gateway") if "gateway" in spec else first
    start = parse_address(spec["rangeStart"], "rangeStart") if "rangeStart" in spec else first
    end = parse_address(spec["rangeEnd"], "rangeEnd") if "rangeEnd" in spec else last
    for label, addr in (("gateway", gateway), ("rangeStart", start), ("rangeEnd", end)):
        if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
            raise CniError(errors.INVALID_CONFIG, f"{label} {addr} is not a usable address of {subnet}")
    if start > end:
        raise CniError(errors.INVALID_CONFIG, f"rangeStart {start} is after rangeEnd {end}")
    if start == end == gateway:
        raise CniError(errors.INVALID_CONFIG, f"range {start}-{end} holds only the gateway, no pod")
    return IpRange(subnet, start, end, gateway)


def _check_families(ranges: tuple[IpRange, ...]) -> None:
    versions = [r.subnet.version for r in ranges]
    if len(versions) != len(set(versions)):
        raise CniError(errors.INVALID_CONFIG, "at most one IPv4 and one IPv6 subnet are supported")


def _valid_attachments(raw: Mapping[str, Any]) -> frozenset[tuple[str, str]] | None:
    items = raw.get(VALID_ATTACHMENTS_KEY)
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise CniError(errors.INVALID_CONFIG, f"{VALID_ATTACHMENTS_KEY} must be a list of objects")
    what = f"{VALID_ATTACHMENTS_KEY} entry"
    return frozenset(
        (_text(item.get("containerID"), f"{what} containerID"), _text(item.get("ifname"), f"{what} ifname"))
        for item in items
    )
