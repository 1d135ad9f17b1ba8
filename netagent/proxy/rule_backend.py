"""What the rule backends (iptables, nftables) share: the sync loop render -> diff -> one kernel
transaction, the walk that turns a port's policy into its rules (each backend supplies the syntax of
the steps), and running their kernel tools."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from netagent.proxy.backend import Backend, NodeContext, SyncError
from netagent.proxy.chain_names import ChainNames
from netagent.proxy.gc_pause import gc_paused
from netagent.proxy.policy import Destination, Masquerade
from netagent.proxy.render_engine import Fragment, IncrementalRenderer
from netagent.proxy.ruleset import RuleSet, RuleSetDiff, diff
from netagent.proxy.service import Endpoint, ServicePort
from nodekit.tools import ToolError, run_tool

MASQUERADE_MARK = 0x4000  # the bit kube-proxy also uses: "SNAT this packet on the way out"


class RuleBackend(Backend, IncrementalRenderer):
    """Renders ServicePorts of one family into kernel rules and keeps the kernel in step."""

    names: ClassVar[ChainNames]

    def __init__(self, node: NodeContext, family: int = 4, netns: str | None = None) -> None:
        Backend.__init__(self, node, family, netns)
        IncrementalRenderer.__init__(self)
        self._applied: RuleSet | None = None  # None: unknown, read the kernel before the next sync
        self._masquerade_rules = {  # the rules of each masquerade decision, in this backend's syntax
            m: [self.jump(chain)] if (chain := self.names.masquerade_chain(m)) else [] for m in Masquerade
        }

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

    def render_port(self, p: ServicePort) -> Fragment:
        """Everything one service port needs: its policy, step by step in this backend's syntax."""
        plan, fragment = p.policy, Fragment()
        for traffic in plan.traffic:
            chain = self.names.for_traffic(p, traffic)
            if traffic.dnat:
                rules = self.cluster_path(p) if traffic.inside_takes_cluster_path else []
                rules += self._masquerade_rules[traffic.masquerade]
                rules += self.balance(fragment, p, chain, traffic.endpoints)
                fragment.chains[self.chain_key(chain)] = tuple(rules)
            for dest in traffic.destinations:
                if traffic.dnat:
                    self.dispatch(fragment, p, dest, chain)
                if traffic.rejected:
                    self.reject(fragment, p, dest)
        self.endpoint_parts(fragment, p)
        return fragment

    def chain_key(self, chain: str) -> str:
        """A service chain's key in the RuleSet."""
        return chain

    @abstractmethod
    def jump(self, chain: str) -> str:
        """The rule that runs `chain` and comes back."""

    @abstractmethod
    def cluster_path(self, p: ServicePort) -> list[str]:
        """The rules sending pods and the node itself to p's cluster chain, the node masqueraded."""

    @abstractmethod
    def balance(
        self, fragment: Fragment, p: ServicePort, chain: str, endpoints: Sequence[Endpoint]
    ) -> list[str]:
        """The rules of `chain` that DNAT to one of `endpoints` (ClientIP affinity: the client's last)."""

    @abstractmethod
    def dispatch(self, fragment: Fragment, p: ServicePort, dest: Destination, chain: str) -> None:
        """Send new connections to `dest` into `chain`."""

    @abstractmethod
    def reject(self, fragment: Fragment, p: ServicePort, dest: Destination) -> None:
        """Refuse new connections to `dest` that nothing DNATed (p.policy.reject_with)."""

    @abstractmethod
    def endpoint_parts(self, fragment: Fragment, p: ServicePort) -> None:
        """What each of p.policy.endpoints needs: hairpin masquerade, affinity bookkeeping, its DNAT
        if separate (one call per port, not per endpoint: a cold sync has 100,000 endpoints)."""

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
