"""The kernel's IPVS table (virtual servers and their real servers) over generic netlink.

Why not pyroute2's IPVS class, which works: its generic message machinery costs ~0.4 ms per message
on a host and ~9 ms in the emulated guest the IPVS tests run in, and a node with 10,000 services holds
~110,000 entries, so a cold sync would take minutes on a host and most of an hour in the guest. The
protocol is small and fixed (include/uapi/linux/ip_vs.h), so this module encodes and decodes it with
struct, sends changes in batches (many requests per sendmsg, one acknowledgement each) and reads the
table with one dump of the services plus one dump of each service's real servers.

Addresses are text ("10.96.0.1", "fd00::1"); families are 4 or 6.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# include/uapi/linux/ip_vs.h
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
CMD_FLUSH = 17
ATTR_SERVICE, ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK, SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = (
    1, 2, 3, 4, 5, 6, 7, 8, 9)
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = 1, 2, 3, 4, 5, 6
DEST_ACTIVE_CONNS, DEST_INACT_CONNS, DEST_ADDR_FAMILY = 7, 8, 11
SVC_F_PERSISTENT = 0x1
FWD_MASQUERADE = 0  # IP_VS_CONN_F_MASQ: the real server gets the packet DNATed (kube-proxy's mode)
GENL_VERSION = 1
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NETLINK_GENERIC, SOL_NETLINK, NETLINK_CAP_ACK = 16, 270, 10
BATCH = 512  # requests per sendmsg; their acknowledgements (capped to headers) fit the receive buffer
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}

_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_NLA_F_NESTED = 0x8000


class IpvsError(RuntimeError):
    """The kernel has no IPVS, or refused a request (the message names it and the errno)."""


class VirtualServerKey(NamedTuple):
    family: int
    protocol: str  # TCP, UDP, SCTP
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == 6 else self.address
        return f"{self.protocol} {host}:{self.port}"


@dataclass(frozen=True)
class VirtualServer:
    key: VirtualServerKey
    scheduler: str = "rr"
    persistence: int = 0  # seconds of client affinity (IPVS persistence); 0 = none


class RealServerKey(NamedTuple):
    address: str
    port: int


@dataclass(frozen=True)
class RealServer:
    key: RealServerKey
    weight: int = 1
    active_connections: int = 0  # read from the kernel; ignored when writing
    inactive_connections: int = 0


@dataclass(frozen=True)
class Table:
    """What the kernel holds: each virtual server with its real servers."""

    virtual_servers: dict[VirtualServerKey, VirtualServer]
    real_servers: dict[VirtualServerKey, dict[RealServerKey, RealServer]]


class IpvsSocket:
    """A generic netlink socket to IPVS in the current network namespace (create it inside
    nodekit.netns.entered() to reach another one)."""

    def __init__(self) -> None:
        self.family_id = _resolve_family()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> IpvsSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> Table:
        virtual = {v.key: v for v in self._dump_services()}
        real = {key: {r.key: r for r in self._dump_dests(key)} for key in virtual}
        return Table(virtual, real)

    def _dump_services(self) -> Iterator[VirtualServer]:
        for attrs in self._dump(CMD_GET_SERVICE, b""):
            service = _nested(attrs.get(ATTR_SERVICE, b""))
            if SVC_FWMARK in service and SVC_ADDR not in service:
                continue  # firewall-mark services are not ours
            yield _decode_service(service)

    def _dump_dests(self, key: VirtualServerKey) -> Iterator[RealServer]:
        for attrs in self._dump(CMD_GET_DEST, _nla(ATTR_SERVICE, _service_key(key), nested=True)):
            dest = _nested(attrs.get(ATTR_DEST, b""))
            family = struct.unpack("=H", dest[DEST_ADDR_FAMILY])[0] if DEST_ADDR_FAMILY in dest else (
                FAMILIES[key.family])
            yield RealServer(
                RealServerKey(_address(family, dest[DEST_ADDR]), struct.unpack("!H", dest[DEST_PORT])[0]),
                weight=_u32(dest, DEST_WEIGHT),
                active_connections=_u32(dest, DEST_ACTIVE_CONNS),
                inactive_connections=_u32(dest, DEST_INACT_CONNS),
            )

    def _dump(self, cmd: int, payload: bytes) -> Iterator[dict[int, bytes]]:
        seq = self._next_seq()
        self._sock.send(self._message(cmd, NLM_F_REQUEST | NLM_F_DUMP, seq, payload))
        while True:
            data = self._sock.recv(1 << 20)
            for msg_type, msg_seq, body in _messages(data):
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    code = struct.unpack("=i", body[:4])[0]
                    if code:
                        raise IpvsError(f"IPVS dump (command {cmd}): {os.strerror(-code)}")
                    return
                yield _attrs(body[_GENL.size:])

    # -- writing -------------------------------------------------------------------------------
    def apply(self, requests: Iterable[Request]) -> None:
        """Send the requests in order, in batches; raises IpvsError naming the first refused one
        (the ones before it are applied: the caller re-reads the table after a failure)."""
        pending: list[tuple[int, Request]] = []
        for request in requests:
            pending.append((self._next_seq(), request))
            if len(pending) == BATCH:
                self._send_batch(pending)
                pending = []
        if pending:
            self._send_batch(pending)

    def _send_batch(self, batch: Sequence[tuple[int, Request]]) -> None:
        self._sock.send(b"".join(self._message(r.cmd, r.flags, seq, r.payload) for seq, r in batch))
        waiting = {seq: request for seq, request in batch}
        failures: list[tuple[int, int, Request]] = []  # (sequence number, errno, request)
        while waiting:
            for msg_type, seq, body in _messages(self._sock.recv(1 << 20)):
                request = waiting.pop(seq, None)
                if request is None or msg_type != NLMSG_ERROR:
                    continue
                code = -struct.unpack("=i", body[:4])[0]
                if code and not request.tolerates(code):
                    failures.append((seq, code, request))
        if failures:
            _, code, request = min(failures, key=lambda f: f[0])
            raise IpvsError(f"{request.describe()}: {os.strerror(code)}")

    def _message(self, cmd: int, flags: int, seq: int, payload: bytes) -> bytes:
        body = _GENL.pack(cmd, GENL_VERSION, 0) + payload
        return _NLMSG.pack(_NLMSG.size + len(body), self.family_id, flags, seq, 0) + body

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq


@dataclass(frozen=True)
class Request:
    """One IPVS change, encoded once."""

    cmd: int
    payload: bytes
    what: str
    ignore_missing: bool = False  # a delete of something already gone succeeded

    @property
    def flags(self) -> int:
        create = NLM_F_CREATE | NLM_F_EXCL if self.cmd in (CMD_NEW_SERVICE, CMD_NEW_DEST) else 0
        return NLM_F_REQUEST | NLM_F_ACK | create

    def tolerates(self, code: int) -> bool:
        return self.ignore_missing and code in (errno.ESRCH, errno.ENOENT)

    def describe(self) -> str:
        return self.what


def add_service(server: VirtualServer) -> Request:
    payload = _nla(ATTR_SERVICE, _service_full(server), nested=True)
    return Request(CMD_NEW_SERVICE, payload, f"add {server.key}")


def update_service(server: VirtualServer) -> Request:
    return Request(CMD_SET_SERVICE, _nla(ATTR_SERVICE, _service_full(server), nested=True),
                   f"update {server.key}")


def delete_service(key: VirtualServerKey) -> Request:
    return Request(CMD_DEL_SERVICE, _nla(ATTR_SERVICE, _service_key(key), nested=True), f"delete {key}",
                   ignore_missing=True)


def add_real_server(service: VirtualServerKey, real: RealServer) -> Request:
    what = f"add {real.key.address}:{real.key.port} to {service}"
    return Request(CMD_NEW_DEST, _dest_payload(service, real), what)


def update_real_server(service: VirtualServerKey, real: RealServer) -> Request:
    return Request(CMD_SET_DEST, _dest_payload(service, real),
                   f"set weight {real.weight} of {real.key.address}:{real.key.port} in {service}")


def delete_real_server(service: VirtualServerKey, real: RealServerKey) -> Request:
    dest = _nla(DEST_ADDR, _address_bytes(real.address)) + _nla(DEST_PORT, struct.pack("!H", real.port))
    payload = _nla(ATTR_SERVICE, _service_key(service), nested=True) + _nla(ATTR_DEST, dest, nested=True)
    what = f"delete {real.address}:{real.port} from {service}"
    return Request(CMD_DEL_DEST, payload, what, ignore_missing=True)


def available() -> bool:
    """Whether this kernel has IPVS (its generic netlink family exists)."""
    try:
        _resolve_family()
    except IpvsError:
        return False
    return True


# -- encoding --------------------------------------------------------------------------------------
def _nla(kind: int, value: bytes, nested: bool = False) -> bytes:
    header = _NLA.pack(_NLA.size + len(value), kind | (_NLA_F_NESTED if nested else 0))
    return header + value + b"\0" * (-len(value) % 4)


def _address_bytes(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def _service_key(key: VirtualServerKey) -> bytes:
    return (_nla(SVC_AF, struct.pack("=H", FAMILIES[key.family]))
            + _nla(SVC_PROTOCOL, struct.pack("=H", PROTOCOLS[key.protocol]))
            + _nla(SVC_ADDR, _address_bytes(key.address))
            + _nla(SVC_PORT, struct.pack("!H", key.port)))


def _service_full(server: VirtualServer) -> bytes:
    flags = SVC_F_PERSISTENT if server.persistence else 0
    netmask = 0xFFFFFFFF if server.key.family == 4 else 128  # IPv6 takes a prefix length (host order)
    return (_service_key(server.key)
            + _nla(SVC_SCHED_NAME, server.scheduler.encode() + b"\0")
            + _nla(SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
            + _nla(SVC_TIMEOUT, struct.pack("=I", server.persistence))
            + _nla(SVC_NETMASK, struct.pack("=I", netmask)))


def _dest_payload(service: VirtualServerKey, real: RealServer) -> bytes:
    family = FAMILIES[ipaddress.ip_address(real.key.address).version]
    dest = (_nla(DEST_ADDR, _address_bytes(real.key.address))
            + _nla(DEST_PORT, struct.pack("!H", real.key.port))
            + _nla(DEST_FWD_METHOD, struct.pack("=I", FWD_MASQUERADE))
            + _nla(DEST_WEIGHT, struct.pack("=I", real.weight))
            + _nla(DEST_U_THRESH, struct.pack("=I", 0))
            + _nla(DEST_L_THRESH, struct.pack("=I", 0))
            + _nla(DEST_ADDR_FAMILY, struct.pack("=H", family)))
    return _nla(ATTR_SERVICE, _service_key(service), nested=True) + _nla(ATTR_DEST, dest, nested=True)


# -- decoding --------------------------------------------------------------------------------------
def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield msg_type, seq, data[offset + _NLMSG.size: offset + length]
        offset += (length + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        found[kind & ~_NLA_F_NESTED] = data[offset + _NLA.size: offset + length]
        offset += (length + 3) & ~3
    return found


_nested = _attrs


def _u32(attrs: dict[int, bytes], kind: int) -> int:
    return struct.unpack("=I", attrs[kind])[0] if kind in attrs else 0


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw[:16])


def _decode_service(attrs: dict[int, bytes]) -> VirtualServer:
    family = struct.unpack("=H", attrs[SVC_AF])[0]
    protocol_number = struct.unpack("=H", attrs[SVC_PROTOCOL])[0]
    protocol = next((name for name, number in PROTOCOLS.items() if number == protocol_number),
                    str(protocol_number))
    flags = struct.unpack("=II", attrs[SVC_FLAGS])[0] if SVC_FLAGS in attrs else 0
    key = VirtualServerKey(4 if family == socket.AF_INET else 6, protocol, _address(family, attrs[SVC_ADDR]),
                           struct.unpack("!H", attrs[SVC_PORT])[0])
    scheduler = attrs.get(SVC_SCHED_NAME, b"").rstrip(b"\0").decode()
    persistence = _u32(attrs, SVC_TIMEOUT) if flags & SVC_F_PERSISTENT else 0
    return VirtualServer(key, scheduler, persistence)


def _resolve_family() -> int:
    """The IPVS generic netlink family's id, from the generic netlink controller (ENOENT: the kernel
    has no IPVS)."""
    request = _GENL.pack(CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, b"IPVS\0")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.bind((0, 0))
        sock.send(_NLMSG.pack(_NLMSG.size + len(request), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + request)
        for msg_type, _seq, body in _messages(sock.recv(65536)):
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack("=i", body[:4])[0]
                raise IpvsError(f"this kernel has no IPVS (generic netlink family IPVS: {os.strerror(code)})")
            if msg_type == GENL_ID_CTRL:
                family_id = _attrs(body[_GENL.size:]).get(CTRL_ATTR_FAMILY_ID)
                if family_id:
                    return struct.unpack("=H", family_id[:2])[0]
    raise IpvsError("the generic netlink controller did not answer for IPVS")
