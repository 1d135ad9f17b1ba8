"""The proxy backend interface: what the Proxier drives, whatever the backend programs (iptables or
nftables rules, BPF maps).

A backend handles ONE IP family; dual-stack nodes run one per family. It runs its kernel tools in the
current netns, or in the named netns when given one (tests, tooling).
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from netagent.proxy.inspection import KernelView
from netagent.proxy.service import ServicePort


class SyncError(RuntimeError):
    """The kernel could not be made to match (a refused transaction, a missing tool or kernel
    feature). A rule backend's transaction is atomic: nothing of a refused one was applied."""


@dataclass(frozen=True)
class NodeContext:
    node_name: str
    cluster_cidrs: tuple[str, ...] = ()  # traffic from outside these is masqueraded to cluster IPs

    def cidrs(self, family: int) -> tuple[str, ...]:
        return tuple(c for c in self.cluster_cidrs if ipaddress.ip_network(c, strict=False).version == family)


class Changes(Protocol):
    """What a sync wrote, in the backend's own terms; false when the kernel already matched."""

    def __bool__(self) -> bool: ...


class Backend(ABC):
    """Keeps one IP family's service ports programmed in the kernel."""

    kind: ClassVar[str]  # the --proxy name

    def __init__(self, node: NodeContext, family: int = 4, netns: str | None = None) -> None:
        self.node = node
        self.family = family
        self.netns = netns

    @abstractmethod
    def sync(self, ports: Sequence[ServicePort]) -> Changes:
        """Make the kernel hold exactly `ports` (of this backend's family); returns what changed.
        Raises SyncError when the kernel refused; the next sync starts again from what it holds."""

    @abstractmethod
    def kernel_view(self) -> KernelView:
        """The service destinations programmed in the kernel, for `netagent proxy show`."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove everything this backend ever created (tests, switching backends)."""
