"""Garbage collection of one network's attachments: the one implementation behind the CNI 1.1 GC verb
and the agent's periodic collector (netagent/gc/).

Everything this network owns is findable without the pods: allocations live under the network's
IPAM directory (owner and write time in each file) and every host veth carries the network's alias.
The caller only decides, per attachment and per veth that no allocation explains, whether it goes
and why; anything that belongs to another network or to no network is never looked at.

Races with a concurrent ADD are closed by the IPAM lock and by ifindex: decisions and releases
happen under one hold of the lock, and the veths are listed inside that hold and deleted by index,
so a veth recreated afterwards by a new ADD under the same name (a new ifindex) is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute

from cni import ipam, links
from cni.config import IPAddress

Owner = tuple[str, str]  # (container id, ifname)
NOT_VALID = "not in cni.dev/valid-attachments"


@dataclass(frozen=True)
class Attachment:
    """What the node holds for one (container id, ifname): its addresses and how long it has held them."""

    owner: Owner
    addresses: tuple[IPAddress, ...]
    age: float  # seconds since the youngest of its allocations was written

    @property
    def veth_name(self) -> str:
        return links.host_veth_name(*self.owner)


@dataclass(frozen=True)
class Veth:
    """A host veth of the network; index tells a leftover from a later veth with the same name."""

    name: str
    index: int


@dataclass(frozen=True)
class Release:
    """One thing collected (or, on a dry run, that would be): an address or a veth, and why."""

    kind: str  # "allocation" or "veth"
    name: str  # the address, or the veth's name
    owner: Owner | None  # None for a veth no allocation explains
    reason: str


@dataclass(frozen=True)
class GcReport:
    releases: tuple[Release, ...]

    @property
    def released(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.releases if r.kind == "allocation")

    @property
    def deleted_links(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.releases if r.kind == "veth")


# Each judge returns the reason to collect, or None to keep.
AttachmentJudge = Callable[[Attachment], str | None]
VethJudge = Callable[[Veth], str | None]


def collect(
    network_name: str,
    data_dir: str,
    valid: frozenset[Owner],
    when_emptied: Callable[[], object] | None = None,
) -> GcReport:
    """The CNI GC verb: release allocations and host veths of `network_name` not named in `valid`."""
    keep_veths = {links.host_veth_name(container_id, ifname) for container_id, ifname in valid}
    return sweep(
        network_name,
        data_dir,
        judge_attachment=lambda attachment: None if attachment.owner in valid else NOT_VALID,
        judge_orphan_veth=lambda veth: None if veth.name in keep_veths else NOT_VALID,
        when_emptied=when_emptied,
    )


def sweep(
    network_name: str,
    data_dir: str,
    judge_attachment: AttachmentJudge,
    judge_orphan_veth: VethJudge,
    dry_run: bool = False,
    when_emptied: Callable[[], object] | None = None,
) -> GcReport:
    """Collect what the judges condemn: an attachment's addresses and its veth, and orphan veths.

    Every attachment is judged before any orphan veth. Host veths are looked up in the calling
    thread's netns, which must be the node's. when_emptied runs, under the IPAM lock, when the
    network is left without any allocation.
    """
    store = ipam.AllocationStore(data_dir, network_name)
    releases: list[Release] = []
    with links.node_iproute() as ipr:
        with store.locked_if_exists():
            attachments = _attachments(store)
            veths = _veths(ipr, network_name, {a.veth_name for a in attachments})
            condemned = {a.owner: reason for a in attachments if (reason := judge_attachment(a)) is not None}
            for attachment in attachments:
                if attachment.owner in condemned:
                    for address in attachment.addresses:
                        if not dry_run:
                            store.drop(address)
                        releases.append(Release("allocation", str(address), attachment.owner,
                                                condemned[attachment.owner]))
            if when_emptied is not None and not dry_run and len(condemned) == len(attachments):
                when_emptied()  # under the lock, as after a network's last DEL (AllocationStore.release)
        owner_of_veth = {a.veth_name: a.owner for a in attachments}
        for veth in veths:
            owner = owner_of_veth.get(veth.name)
            reason = condemned.get(owner) if owner else judge_orphan_veth(veth)
            if reason is not None and (dry_run or _delete(ipr, veth)):
                releases.append(Release("veth", veth.name, owner, reason))
    return GcReport(tuple(releases))


def _attachments(store: ipam.AllocationStore) -> list[Attachment]:
    """Allocations grouped by owner (caller holds the lock); a dual-stack pod owns two addresses."""
    now = time.time()
    grouped: dict[Owner, list[tuple[IPAddress, float]]] = {}
    for address, owner in store.allocations().items():
        written = store.allocated_at(address)
        grouped.setdefault(owner, []).append((address, now if written is None else written))
    attachments = []
    for owner, held in grouped.items():
        addresses = tuple(sorted((address for address, _ in held), key=_address_order))
        youngest = max(written for _, written in held)
        attachments.append(Attachment(owner, addresses, max(0.0, now - youngest)))
    return attachments


def _address_order(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def _veths(ipr: IPRoute, network_name: str, attachment_veths: set[str]) -> list[Veth]:
    """The network's host veths: those carrying its alias, and those named after one of its
    attachments (an ADD killed between creating the veth and labelling it leaves one without)."""
    alias = links.network_alias(network_name)
    veths = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        is_veth = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "veth"
        if is_veth and (link.get_attr("IFLA_IFALIAS") == alias or name in attachment_veths):
            veths.append(Veth(name, link["index"]))
    return veths


def _delete(ipr: IPRoute, veth: Veth) -> bool:
    """Delete by index, never by name (see the module docstring); False when it is already gone."""
    return links.delete_index(ipr, veth.index, veth.name)
