"""CNI networks for a ContainerdNode: netagent (installed as a real node installs it) and the reference.

Shared by the containerd tests and the pod start benchmark, so both measure exactly what they test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

from netns_lab.containerd.node import ContainerdError, ContainerdNode, wait_until

from nodekit import netns

REFERENCE_PLUGINS = "/usr/lib/cni"  # Debian's containernetworking-plugins
REFERENCE_NETWORK = "reference"
REFERENCE_SUBNET = "10.77.0.0/24"
NETAGENT_CLI = os.path.join(os.path.dirname(sys.executable), "netagent")


def _link_reference_plugin(bin_dir: str, plugin: str) -> None:
    link = os.path.join(bin_dir, plugin)
    if not os.path.lexists(link):
        os.symlink(os.path.join(REFERENCE_PLUGINS, plugin), link)


def install_reference(
    node: ContainerdNode, subnet: str = REFERENCE_SUBNET, chain_portmap: bool = False
) -> str:
    """Debian's bridge + host-local as the node's network; returns host-local's data dir.

    chain_portmap puts portmap after bridge, as netagent's conflist does, for like-for-like timings.
    """
    for plugin in ("bridge", "host-local", "portmap"):
        _link_reference_plugin(node.bin_dir, plugin)
    ipam_dir = node.path("host-local")
    ipam = {"type": "host-local", "subnet": REFERENCE_SUBNET, "dataDir": ipam_dir}
    plugins: list[dict] = [{"type": "bridge", "bridge": "cni-ref0", "isGateway": True, "ipam": ipam}]
    if chain_portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    conflist = {"cniVersion": "1.0.0", "name": REFERENCE_NETWORK, "plugins": plugins}
    with open(os.path.join(node.conf_dir, "10-reference.conflist"), "w") as f:
        json.dump(conflist, f)
    return ipam_dir


def install_netagent(
    bin_dir: str, conf_dir: str, state_dir: str, data_dir: str, cluster_cidr: str, fallback: str | None = None
) -> str:
    """`netagent install-cni` into a node's CNI dirs (the reference portmap beside it, as netagent's
    conflist chains it); returns the network name. `fallback` replaces the Python plugin the shim
    runs when no agent answers."""
    argv = [NETAGENT_CLI, "install-cni", "--bin-dir", bin_dir, "--conf-dir", conf_dir,
            "--state-dir", state_dir, "--data-dir", data_dir, "--cluster-cidr", cluster_cidr]  # fmt: skip
    if fallback is not None:
        argv += ["--fallback", fallback]
    installed = subprocess.run(argv, capture_output=True, text=True)
    if installed.returncode != 0:
        raise ContainerdError(f"netagent install-cni failed: {installed.stderr.strip()}")
    _link_reference_plugin(bin_dir, "portmap")
    with open(os.path.join(conf_dir, "10-netagent.conflist")) as f:
        return json.load(f)["name"]


@contextlib.contextmanager
def standalone_agent(
    node_netns: str, state_dir: str, pod_cidr: str, cluster_cidr: str, log_path: str
) -> Iterator[subprocess.Popen]:
    """`netagent run --standalone` in the node netns (serving CNI on STATE/cni.sock) until the block ends.

    Keep it running until the node's containers are gone: their CNI DEL goes through it too.
    """
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            netns.exec_argv(node_netns, [NETAGENT_CLI, "run", "--standalone", "--node-name", node_netns,
                                         "--pod-cidr", pod_cidr, "--cluster-cidr", cluster_cidr,
                                         "--state-dir", state_dir, "--network", "none",
                                         "--healthz-bind", "", "--metrics-bind", ""]),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )  # fmt: skip
    try:

        def ready() -> bool:
            if agent.poll() is not None:
                with open(log_path, errors="replace") as f:
                    raise ContainerdError(f"netagent run exited with {agent.returncode}:\n{f.read()}")
            return os.path.exists(os.path.join(state_dir, "ready"))

        wait_until(ready, 60, "the netagent agent to be ready")
        yield agent
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
