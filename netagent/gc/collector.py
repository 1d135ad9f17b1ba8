"""One GC pass: gather the evidence, let the rules judge the node's attachments, release the
leftovers through cni.gc.sweep, count them in gc.json and forget their conntrack entries."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cni import gc as cni_gc
from netagent.gc.evidence import EvidenceUnavailable, GatherEvidence, node_pod_cidrs
from netagent.gc.rules import PassJudge
from netagent.gc.state import updating_state
from nodekit import conntrack

log = logging.getLogger("netagent.gc")


@dataclass(frozen=True)
class PassResult:
    releases: tuple[cni_gc.Release, ...]
    waiting: int  # candidates kept only because they are still inside the grace period
    in_runtime: int  # attachments without a live pod IP kept because the runtime still has the sandbox
    held_orphans: int  # veths without allocation kept because some live pod's IP has no allocation
    foreign: int  # attachments left alone because their addresses are outside this node's pod CIDRs


class Collector:
    """One pass compares the node's attachments with the evidence of use and releases the leftovers."""

    def __init__(self, network_name: str, data_dir: str, state_dir: str, grace: float,
                 gather_evidence: GatherEvidence) -> None:
        self.network_name = network_name
        self.data_dir = data_dir
        self.state_dir = state_dir
        self.grace = grace
        self.gather_evidence = gather_evidence

    def run_once(self, dry_run: bool = False) -> PassResult:
        try:
            evidence = self.gather_evidence()
        except Exception as exc:  # API server or runtime unreachable, bad kubeconfig, ...
            raise EvidenceUnavailable(f"{type(exc).__name__}: {exc}") from exc
        own_cidrs = node_pod_cidrs(self.state_dir)
        with updating_state(self.state_dir, save=not dry_run) as state:
            judge = PassJudge(evidence, own_cidrs, self.grace, state.orphan_veths_seen)
            report = cni_gc.sweep(self.network_name, self.data_dir, judge.attachment, judge.orphan_veth,
                                  dry_run=dry_run)
            if not dry_run:
                state.passes += 1
                state.last_pass = time.time()
                state.orphan_veths_seen = judge.orphans_kept
                for release in report.releases:
                    by_reason = state.released.setdefault(release.kind, {})
                    by_reason[release.reason] = by_reason.get(release.reason, 0) + 1
        for release in report.releases:
            owner = "/".join(release.owner) if release.owner else "no owner"
            log.info("%s %s %s (attachment %s): %s", "would release" if dry_run else "released",
                     release.kind, release.name, owner, release.reason)
        if not dry_run:
            conntrack.forget_addresses(r.name for r in report.releases if r.kind == "allocation")
        if judge.held_orphans:
            log.warning("kept %d veths without allocation: live pods %s have none, one may be theirs",
                        judge.held_orphans, ", ".join(sorted(judge.unallocated_pod_ips())))
        return PassResult(report.releases, judge.waiting, judge.in_runtime, judge.held_orphans, judge.foreign)
