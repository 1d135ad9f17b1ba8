"""Garbage collection of one network's attachments (CNI 1.1 GC), shared by the plugin and the agent.

Everything this network owns is findable without the pods: allocations live under the network's
IPAM directory and every host veth carries the network's alias. Whatever is not in the valid set is
released; anything that belongs to another network or to no network is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from cni import ipam, links
from cni.config import IPAddress

Attachment = tuple[str, str]  # (container id, ifname)


@dataclass(frozen=True)
class GcReport:
    released: tuple[IPAddress, ...]
    deleted_links: tuple[str, ...]


def collect(network_name: str, data_dir: str, valid: frozenset[Attachment]) -> GcReport:
    """Release allocations and delete host veths of `network_name` not named in `valid`.

    Host veths are looked up in the calling thread's netns, which must be the node's.
    """
    released = ipam.Store(data_dir, network_name).release_all_except(valid)
    keep = {links.host_veth_name(container_id, ifname) for container_id, ifname in valid}
    deleted = []
    with links.node_iproute() as ipr:
        for name in links.veths_of_network(ipr, network_name):
            if name not in keep and links.delete(ipr, name):
                deleted.append(name)
    return GcReport(tuple(sorted(released)), tuple(sorted(deleted)))
