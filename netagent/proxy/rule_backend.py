"""What the rule backends (iptables, nftables) share: the sync loop render -> diff -> one kernel
transaction, and running their kernel tools."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from netagent.proxy.backend import Backend, NodeContext, SyncError
from netagent.proxy.gc_pause import gc_paused
from netagent.proxy.render_engine import IncrementalRenderer
from netagent.proxy.ruleset import RuleSet, RuleSetDiff, diff
from netagent.proxy.service import ServicePort
from nodekit.tools import ToolError, run_tool

MASQUERADE_MARK = 0x4000  # the bit kube-proxy also uses: "SNAT this packet on the way out"


class RuleBackend(Backend, IncrementalRenderer):
    """Renders ServicePorts of one family into kernel rules and keeps the kernel in step."""

    def __init__(self, node: NodeContext, family: int = 4, netns: str | None = None) -> None:
        Backend.__init__(self, node, family, netns)
        IncrementalRenderer.__init__(self)
        self._applied: RuleSet | None = None  # None: unknown, read the kernel before the next sync

    def sync(self, ports: Sequence[ServicePort]) -> RuleSetDiff:
        """Make the kernel match `ports` in one transaction; returns what changed.

        After a failure the kernel is unchanged (the transaction is atomic) and the next sync starts
        again from what the kernel really holds.
        """
        with gc_paused():
            desired = self.render([p for p in ports if p.family == self.family])
        if self._applied is None:
            current, changes = self.read_kernel(), None
        else:  # only what came from new or vanished ports can differ, plus the fixed chains
            current = self._applied if self._before is None else self._before
            changes = self._dirty
        changes = diff(current, desired, changes)
        if changes:
            try:
                with gc_paused():
                    transaction = self.transaction(current, desired, changes)
                self.commit(transaction)
            except BaseException:
                self._applied = None  # the memo already moved on: the retry must compare with the kernel
                raise
        self._applied = desired
        return changes

    @abstractmethod
    def read_kernel(self) -> RuleSet:
        """What the kernel holds now, chain contents None (unknown), objects and elements exact."""

    @abstractmethod
    def transaction(self, current: RuleSet, desired: RuleSet, changes: RuleSetDiff) -> str:
        """The text of one atomic kernel transaction turning `current` into `desired`."""

    @abstractmethod
    def commit(self, transaction: str) -> None:
        """Run the transaction; raise SyncError if the kernel refused it."""

    def run(self, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
        """Run a kernel tool here or in self.netns; a failure becomes SyncError with its stderr."""
        try:
            return run_tool(argv, netns_name=self.netns, stdin=stdin, check=check)
        except ToolError as err:
            raise SyncError(str(err)) from None
