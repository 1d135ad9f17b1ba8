"""The node state file: the contract between the agent (writer) and the CNI plugin (reader).

The agent learns the node's pod CIDRs from its Node object and the usable MTU from the overlay it
programs; the plugin, which runs without API access, reads both from here. Written atomically so a
plugin never reads half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from nodekit.files import atomic_write

DEFAULT_STATE_DIR = "/run/netagent"
FILE_NAME = "node.json"


def path_in(state_dir: str) -> str:
    """Where the agent with this state directory writes the node state (the one definition)."""
    return os.path.join(state_dir, FILE_NAME)


DEFAULT_PATH = path_in(DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class NodeState:
    node_name: str
    pod_cidrs: tuple[str, ...]
    mtu: int
    cluster_cidrs: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        data = asdict(self)
        data["pod_cidrs"] = list(self.pod_cidrs)
        data["cluster_cidrs"] = list(self.cluster_cidrs)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeState:
        data = json.loads(text)
        return cls(
            node_name=data["node_name"],
            pod_cidrs=tuple(data["pod_cidrs"]),
            mtu=int(data["mtu"]),
            cluster_cidrs=tuple(data.get("cluster_cidrs", ())),
        )


def read(path: str = DEFAULT_PATH) -> NodeState:
    """Raises FileNotFoundError when the agent has not written the node state yet."""
    with open(path) as f:
        return NodeState.from_json(f.read())


def write(state: NodeState, path: str = DEFAULT_PATH) -> None:
    atomic_write(path, state.to_json() + "\n")
