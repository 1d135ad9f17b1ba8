"""The kernel's connection tracking table, through the `conntrack` tool.

Two users: the proxy forgets UDP flows DNATed to an endpoint that left (the kernel would keep sending
the "connection" there), GC forgets every flow of an address it released (so the next pod to get it
inherits nothing), and the fast path reads which flows the stack has DNATed. Every call is best
effort: a failure is logged and the table entries time out on their own eventually.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from nodekit.tools import ToolError, run_tool

log = logging.getLogger(__name__)

DEADLINE = 30.0  # seconds; a conntrack call never holds up a sync or a GC pass for longer


class FlowTuple(NamedTuple):
    """One direction of a TCP/UDP flow."""

    src: str
    dst: str
    sport: int
    dport: int
    protocol: int  # IPPROTO_*


def conntrack(*args: str, netns_name: str | None = None) -> str:
    """Run `conntrack ARGS`; its output, or "" (logged) when it failed. Exit 1 with "0 flow entries"
    means nothing matched, which is no failure."""
    try:
        return run_tool(["conntrack", *args], netns_name=netns_name, timeout=DEADLINE)
    except ToolError as err:
        if "0 flow entries" not in err.stderr:
            log.warning("conntrack %s: %s", " ".join(args), err)
        return ""


def delete_dnat_udp_flows_to(family: int, ip: str, port: int, netns_name: str | None = None) -> None:
    """Forget UDP flows the kernel DNATed to ip:port."""
    conntrack("-D", "-f", f"ipv{family}", "-p", "udp", "--reply-src", ip, "--reply-port-src", str(port),
              "--dst-nat", netns_name=netns_name)


def forget_addresses(addresses: Iterable[str]) -> None:
    """Delete the flows from, to, or DNATed to each address. One listing first: most addresses have no
    entries, and three deletions each would cost seconds for a batch."""
    addresses = list(addresses)
    if not addresses:
        return
    listed = conntrack("-L", "-f", "ipv4") + conntrack("-L", "-f", "ipv6")
    for address in addresses:
        if f"={address} " in listed:
            for selector in ("--orig-src", "--orig-dst", "--reply-src"):
                conntrack("-D", selector, address)


def dnat_replies(family: int = 4) -> Iterator[FlowTuple]:
    """The reply direction of every DNATed TCP/UDP flow (raises ToolError when the table is unreadable:
    the caller must know it learned nothing)."""
    listing = run_tool(["conntrack", "-L", "--dst-nat", "-f", f"ipv{family}"], timeout=DEADLINE)
    return parse_replies(listing)


def parse_replies(listing: str) -> Iterator[FlowTuple]:
    """The second src=/dst=/sport=/dport= group of each TCP/UDP line of `conntrack -L` output."""
    for line in listing.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] not in ("tcp", "udp"):
            continue
        fields: dict[str, list[str]] = {}
        for word in words:
            key, _, value = word.partition("=")
            fields.setdefault(key, []).append(value)
        try:
            yield FlowTuple(fields["src"][1], fields["dst"][1], int(fields["sport"][1]),
                            int(fields["dport"][1]), int(words[1]))
        except (KeyError, IndexError, ValueError):
            continue
