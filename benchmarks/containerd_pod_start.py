"""Whole pod lifecycle through a real runtime: `ctr run --rm --cni <busybox> ID true`, per CNI network.

    sudo .venv/bin/python benchmarks/containerd_pod_start.py [--runs 15]

One `ctr run --rm --cni` is create + CNI ADD + start + exit + CNI DEL + delete, timed as one wall
time (no polling). Modes, interleaved run by run in the same containerd so machine noise hits them
alike:
  no-cni             `ctr run` without --cni: the runtime's own cost, the floor for every mode
  reference          Debian's bridge + host-local, then portmap (netagent's conflist chains portmap too)
  netagent-agent     netagent's shim answered by `netagent run --standalone` (fallback /bin/false)
  netagent-fallback  netagent's shim with no agent: it execs the Python plugin
Reported: median and p90 per pod (ms), each median's ratio to the reference median, and the CNI
share (median minus the no-cni median) with its ratio to the reference's CNI share.

Everything runs in a netns named "nb<hex>-node" and a ContainerdNode's temp dir, removed at the end;
the host's root namespace and its CNI/containerd directories are never touched.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from netns_lab.containerd import oci_image  # noqa: E402
from netns_lab.containerd.networks import install_netagent, install_reference, standalone_agent  # noqa: E402
from netns_lab.containerd.node import ContainerdError, ContainerdNode  # noqa: E402

from nodekit import netns, nodestate  # noqa: E402

POD_CIDR = "10.89.1.0/24"
CLUSTER_CIDR = "10.89.0.0/16"
MODES = ("no-cni", "reference", "netagent-agent", "netagent-fallback")


class Staging:
    """Each mode's plugin executable and conflist, staged aside and swapped in before its runs.

    ctr uses the first conflist in /etc/cni/net.d and one `netagent` executable (whose agent socket is
    compiled in), so the modes cannot be installed side by side; swapping files is instant and
    happens outside the timed call.
    """

    def __init__(self, node: ContainerdNode) -> None:
        self.node = node
        self.root = node.path("stage")

    def dirs(self, mode: str) -> tuple[str, str]:
        bin_dir, conf_dir = os.path.join(self.root, mode, "bin"), os.path.join(self.root, mode, "conf")
        os.makedirs(bin_dir, exist_ok=True)
        os.makedirs(conf_dir, exist_ok=True)
        return bin_dir, conf_dir

    def activate(self, mode: str) -> None:
        for name in os.listdir(self.node.conf_dir):
            os.unlink(os.path.join(self.node.conf_dir, name))
        if mode == "no-cni":
            return
        bin_dir, conf_dir = self.dirs(mode)
        for name in os.listdir(conf_dir):
            shutil.copy(os.path.join(conf_dir, name), self.node.conf_dir)
        staged_plugin = os.path.join(bin_dir, "netagent")
        if os.path.exists(staged_plugin):
            installed = os.path.join(self.node.bin_dir, "netagent")
            shutil.copy2(staged_plugin, installed + ".new")
            os.replace(installed + ".new", installed)


def measure(node: ContainerdNode, image: str, runs: int) -> dict[str, list[float]]:
    staging = Staging(node)
    reference_conf = os.path.join(staging.dirs("reference")[1], "10-reference.conflist")
    install_reference(node, chain_portmap=True)
    os.replace(os.path.join(node.conf_dir, "10-reference.conflist"), reference_conf)

    agent_state, plain_state = node.path("agent-state"), node.path("plain-state")
    nodestate.write(
        nodestate.NodeState(node.node_netns, (POD_CIDR,), 1500, (CLUSTER_CIDR,)),
        os.path.join(plain_state, "node.json"),
    )
    for mode, state_dir, fallback in (
        ("netagent-agent", agent_state, "/bin/false"),
        ("netagent-fallback", plain_state, None),
    ):
        bin_dir, conf_dir = staging.dirs(mode)
        install_netagent(bin_dir, conf_dir, state_dir, node.path(f"ipam-{mode}"), CLUSTER_CIDR, fallback)

    timings: dict[str, list[float]] = {mode: [] for mode in MODES}
    agent_log = node.path("agent.log")
    with standalone_agent(node.node_netns, agent_state, POD_CIDR, CLUSTER_CIDR, agent_log):
        for round_number in range(runs + 1):  # round 0 warms up (first bridge, page cache), not counted
            for mode in MODES:
                staging.activate(mode)
                name = f"{mode}-{round_number}"
                started = time.perf_counter()
                node.run_once(image, name, ["true"], cni=mode != "no-cni")
                elapsed_ms = (time.perf_counter() - started) * 1000
                if round_number:
                    timings[mode].append(elapsed_ms)
    return timings


def leaked_allocations(node: ContainerdNode) -> int:
    """Addresses still allocated after every pod was removed (should be 0 for every mode)."""
    leaked = 0
    for root, _dirs, files in os.walk(node.workdir):
        if "ipam" in root or "host-local" in root:
            leaked += sum(1 for f in files if f.replace(".", "").isdigit())
    return leaked


def report(timings: dict[str, list[float]], runs: int, leaks: int) -> None:
    medians = {mode: statistics.median(values) for mode, values in timings.items()}
    floor = medians["no-cni"]
    reference_share = medians["reference"] - floor
    print(f"ctr run --rm --cni busybox true: {runs} pods per mode, interleaved (ms)")
    print(f"{'mode':<18} {'median':>8} {'p90':>8} {'ratio':>6} {'cni share':>10} {'share ratio':>12}")
    for mode, values in timings.items():
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        share = medians[mode] - floor
        ratio = medians[mode] / medians["reference"]
        share_ratio = (
            f"{share / reference_share:12.2f}" if mode != "no-cni" and reference_share > 0 else " " * 12
        )
        print(f"{mode:<18} {medians[mode]:8.1f} {p90:8.1f} {ratio:6.2f} {share:10.1f} {share_ratio}")
    print(f"allocations left after all pods were removed: {leaks}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="timed pods per mode (after one warm-up round)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.exit(1, "run as root: it creates network namespaces and runs containerd\n")
    node_netns = f"nb{secrets.token_hex(3)}-node"
    image_dir = tempfile.mkdtemp(prefix="nbimg-")
    try:
        netns.create(node_netns)
        image = oci_image.build(os.path.join(image_dir, "busybox.tar"))
        with ContainerdNode(node_netns) as node:
            node.import_image(image.path)
            timings = measure(node, image.ref, args.runs)
            leaks = leaked_allocations(node)
        report(timings, args.runs, leaks)
    except ContainerdError as error:
        parser.exit(1, f"benchmark failed: {error}\n")
    finally:
        netns.delete(node_netns)
        shutil.rmtree(image_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
