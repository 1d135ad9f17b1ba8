"""The keep-or-collect rules, applied to each attachment and veth of one pass.

Never touching a live pod is the first rule:
  - an attachment holding the IP of a live pod on this node is kept, whatever its age, and so is
    one whose sandbox the container runtime still has, when a runtime is given (containerd);
  - anything else is kept during a grace period, because a pod being created holds its allocation
    and veth before the API server reports its IP: allocations by their file's age, and a veth that
    no allocation explains by how long it has been seen orphaned (recorded in gc.json by name and
    ifindex, since the kernel keeps no creation time for links);
  - without a pod list from the API server (or a runtime's answer, when given) nothing is collected;
  - a veth no allocation explains is kept while some live pod's IP has no allocation either (its
    veth could be that one: an IPAM dir wiped under live pods must not cut them off);
  - once the agent wrote this node's pod CIDRs (STATE/node.json), addresses outside them are not
    this node's to judge and are left alone (a data dir shared by mistake loses nothing).
The kernel and disk work is cni.gc.sweep, the same code the CNI GC verb runs; the agent also
forgets the conntrack entries of every address it releases.
"""

from __future__ import annotations

import ipaddress
import time

from cni import gc as cni_gc
from cni.config import IPNetwork
from netagent.gc.evidence import Evidence

DEFAULT_GRACE = 120.0
NO_LIVE_POD = "no live pod on this node has its IP"
ORPHAN_VETH = "veth without an allocation"


class PassJudge:
    """The rules of the module docstring, for one pass: cni.gc.sweep asks it about each attachment
    (a reason to release it, or None to keep it) and then about each veth no allocation explains."""

    def __init__(self, evidence: Evidence, own_cidrs: tuple[IPNetwork, ...] | None, grace: float,
                 orphans_seen: dict[str, float]) -> None:
        self.evidence = evidence
        self.own_cidrs = own_cidrs
        self.grace = grace
        self.now = time.time()
        self.orphans_seen = orphans_seen
        self.orphans_kept: dict[str, float] = {}
        self.allocated: set[str] = set()
        self.waiting = 0
        self.in_runtime = 0
        self.held_orphans = 0
        self.foreign = 0

    def attachment(self, attachment: cni_gc.Attachment) -> str | None:
        self.allocated.update(str(address) for address in attachment.addresses)
        if any(str(address) in self.evidence.pod_ips for address in attachment.addresses):
            return None
        sandboxes = self.evidence.sandboxes
        if sandboxes is not None and attachment.owner[0] in sandboxes:
            self.in_runtime += 1
            return None
        if not self._inside_own_cidrs(attachment):
            self.foreign += 1
            return None
        if attachment.age < self.grace:
            self.waiting += 1
            return None
        return NO_LIVE_POD

    def _inside_own_cidrs(self, attachment: cni_gc.Attachment) -> bool:
        if self.own_cidrs is None:
            return True
        return any(address in cidr for address in attachment.addresses for cidr in self.own_cidrs)

    def unallocated_pod_ips(self) -> set[str]:
        """Live pods' IPs inside this node's pod CIDRs that no allocation holds (sweep judges every
        attachment before any veth, so `allocated` is complete by then)."""
        inside = [ip for ip in self.evidence.pod_ips
                  if self.own_cidrs is None or any(ipaddress.ip_address(ip) in c for c in self.own_cidrs)]
        return set(inside) - self.allocated

    def orphan_veth(self, veth: cni_gc.Veth) -> str | None:
        if self.unallocated_pod_ips():
            self.held_orphans += 1
            return None
        key = f"{veth.name}@{veth.index}"
        first_seen = self.orphans_seen.get(key, self.now)
        if self.now - first_seen < self.grace:
            self.orphans_kept[key] = first_seen
            self.waiting += 1
            return None
        return ORPHAN_VETH
