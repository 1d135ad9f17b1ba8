"""Where a lab lives and what it remembers: names, directories and the persisted lab.json.

Layout of lab NAME:
  netns NAME-ul      the underlay: bridge br0 holding 172.18.0.1/24, where the API server listens
  netns NAME-nI      node I: eth0 = 172.18.0.(10+I)/24 on br0; runs `netagent run`
  netns NAME-p-POD   one per pod
  /run/netagent-lab/NAME/         lab.json, the API server's data, log, token, certificate and the
                                  host kubeconfig
  /run/netagent-lab/NAME/nI/      the node's agent state dir, CNI bin/conf dirs, IPAM dir, logs, and
                                  the agent's supervisor status (agent.status.json)
Directories are 0700 and files 0600: they hold the API token and name every pod.

Lab names are short lowercase alphanumerics without '-', so "NAME-ul", "NAME-n<digits>" and
"NAME-p-*" belong to exactly one lab: `lab down` relies on that to sweep what a killed `up` left
behind without any record. lab.json is rewritten atomically under a lock, so concurrent `lab pod`
commands never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from netns_lab.processes import ProcRef

from nodekit.files import atomic_write

LAB_ROOT = "/run/netagent-lab"
DEFAULT_NAME = "netagent"
_LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_NODE_NETNS_RE = re.compile(r"^n[0-9]+$")
# A DNS-1123 label, like a Kubernetes pod name, but short enough for names derived from it.
_POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def private_dir(path: str) -> str:
    """`path` and its missing parents, made (or left) 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class LabError(Exception):
    """A failure to report to the user as one clear line (never a traceback)."""


def check_pod_name(name: str) -> str:
    if not _POD_NAME_RE.fullmatch(name):
        raise LabError(f"invalid pod name {name!r}: lowercase letters, digits and '-', at most 40 chars")
    return name


@dataclass
class NodeInfo:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    dir: str
    supervisor: ProcRef | None = None  # restarts the agent when it dies (supervisor.py)
    responder: ProcRef | None = None

    @property
    def state_dir(self) -> str:
        return os.path.join(self.dir, "state")

    @property
    def cni_bin_dir(self) -> str:
        return os.path.join(self.dir, "cni-bin")

    @property
    def cni_conf_dir(self) -> str:
        return os.path.join(self.dir, "cni-conf")

    @property
    def ipam_dir(self) -> str:
        return os.path.join(self.dir, "ipam")

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.dir, "kubeconfig")

    @property
    def agent_log(self) -> str:
        return os.path.join(self.dir, "agent.log")

    @property
    def agent_status(self) -> str:
        return os.path.join(self.dir, "agent.status.json")

    @property
    def supervisor_log(self) -> str:
        return os.path.join(self.dir, "supervisor.log")

    @property
    def ready_marker(self) -> str:
        """The agent writes it (holding its pid) once its first sync is done."""
        return os.path.join(self.state_dir, "ready")


@dataclass
class PodInfo:
    name: str
    node: str
    netns: str
    container_id: str
    ips: list[str]
    labels: dict[str, str]
    cni_result: dict
    server: ProcRef | None = None


@dataclass
class LabState:
    name: str
    network: str
    proxy: str
    fast_path: bool = False
    phase: str = "starting"  # "starting" until every agent reported ready, then "ready"
    api_url: str = ""  # for tools on the host (127.0.0.1)
    api_internal_url: str = ""  # for agents, on the underlay
    apiserver: ProcRef | None = None
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    pods: dict[str, PodInfo] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        data["apiserver"] = _proc(data["apiserver"])
        data["nodes"] = {name: NodeInfo(**{**node, "supervisor": _proc(node["supervisor"]),
                                            "responder": _proc(node["responder"])})
                         for name, node in data["nodes"].items()}
        data["pods"] = {name: PodInfo(**{**pod, "server": _proc(pod["server"])})
                        for name, pod in data["pods"].items()}
        return cls(**data)


def _proc(data: dict | None) -> ProcRef | None:
    return None if data is None else ProcRef.from_json(data)


class Lab:
    """One lab's names and paths, and access to its persisted state."""

    def __init__(self, name: str = DEFAULT_NAME) -> None:
        if not _LAB_NAME_RE.fullmatch(name):
            raise LabError(
                f"invalid lab name {name!r}: 1-12 lowercase letters and digits, starting with a letter"
            )
        self.name = name
        self.dir = os.path.join(LAB_ROOT, name)
        self.state_path = os.path.join(self.dir, "lab.json")
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        self.api_data = os.path.join(self.dir, "apiserver.json")
        self.api_log = os.path.join(self.dir, "apiserver.log")
        self.api_ready = os.path.join(self.dir, "apiserver.ready")
        self.api_token = os.path.join(self.dir, "apiserver.token")
        self.underlay_netns = f"{name}-ul"

    def node_netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def pod_netns(self, pod: str) -> str:
        return f"{self.name}-p-{pod}"

    def node_dir(self, node: str) -> str:
        return os.path.join(self.dir, node)

    def owns_netns(self, netns_name: str) -> bool:
        head, sep, rest = netns_name.partition("-")
        if head != self.name or not sep:
            return False
        return rest == "ul" or bool(_NODE_NETNS_RE.fullmatch(rest)) or rest.startswith("p-")

    def load(self) -> LabState:
        try:
            with open(self.state_path) as f:
                return LabState.from_json(f.read())
        except FileNotFoundError:
            raise LabError(f"no lab named {self.name!r} (start one with `netagent lab up`)") from None

    def save(self, state: LabState) -> None:
        atomic_write(self.state_path, state.to_json() + "\n", mode=0o600)

    @contextlib.contextmanager
    def update(self) -> Iterator[LabState]:
        """Read-modify-write lab.json under an exclusive lock; saved when the block succeeds."""
        self.load()  # a clear error when there is no such lab
        with self.locked():
            state = self.load()
            yield state
            self.save(state)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.dir, "lab.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
