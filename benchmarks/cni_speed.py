"""CNI ADD/DEL wall time: netagent (shim -> running agent, and the Python fallback) side by side with
Debian's reference bridge + host-local, on the same kind of netns, in the same run.

    sudo .venv/bin/python benchmarks/cni_speed.py [--pods 30] [--masq]

Everything happens in network namespaces this script creates (prefix "nb", removed at the end): a
"node" netns where a `netagent run --standalone` agent listens, and one pod netns per ADD. The
timing loop itself runs inside the node netns, like a container runtime does, and interleaves the
three plugins pod by pod so machine noise hits them alike. Reported per call: wall time (median,
p90) and the ratio of each netagent median to the reference median (<= 1.0 means as fast or
faster); and CPU time (mean; the plugin processes and their children, plus for the shim the agent's
own CPU), which a busy shared machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nodekit import netns  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
REFERENCE_DIR = "/usr/lib/cni"
VARIANTS = ("reference", "netagent-shim", "netagent-fallback")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=30, help="ADDs (then DELs) per plugin")
    parser.add_argument("--masq", action="store_true", help="ipMasq on for every plugin")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # JSON plan: the timing loop, run in the node
    args = parser.parse_args()
    if args.inner:
        inner(json.loads(args.inner))
    else:
        outer(args.pods, args.masq)


def outer(pods: int, masq: bool) -> None:
    prefix = f"nb{secrets.token_hex(3)}"
    work = tempfile.mkdtemp(prefix="cni-speed-")
    node = f"{prefix}-node"
    agent = None
    try:
        netns.create(node)
        pod_names = {v: [f"{prefix}-{v[-3:]}{i}" for i in range(pods)] for v in VARIANTS}
        for names in pod_names.values():
            for name in names:
                netns.create(name)
        state_dir = os.path.join(work, "state")
        subprocess.run(
            [os.path.join(VENV_BIN, "netagent"), "install-cni", "--bin-dir", os.path.join(work, "bin"),
             "--conf-dir", os.path.join(work, "conf"), "--state-dir", state_dir,
             "--data-dir", os.path.join(work, "ipam")],
            check=True, capture_output=True,
        )
        agent = subprocess.Popen(
            netns.exec_argv(node, [
                os.path.join(VENV_BIN, "netagent"), "run", "--node-name", "bench", "--standalone",
                "--pod-cidr", "10.66.0.0/22", "--state-dir", state_dir, "--network", "none",
                "--healthz-bind", "", "--metrics-bind", "", "--log-level", "warning",
            ]),
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(state_dir, "ready")):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the agent did not become ready")
            time.sleep(0.05)
        plan = {"work": work, "state_dir": state_dir, "pods": pod_names, "masq": masq, "agent_pid": agent.pid}
        inner_argv = [sys.executable, os.path.abspath(__file__), "--inner", json.dumps(plan)]
        subprocess.run(netns.exec_argv(node, inner_argv), check=True)
        print(f"\ncommand: .venv/bin/python benchmarks/cni_speed.py --pods {pods}{' --masq' if masq else ''}")
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        for name in netns.names(prefix):
            netns.delete(name)
        shutil.rmtree(work, ignore_errors=True)


def inner(plan: dict) -> None:
    work, masq = plan["work"], plan["masq"]
    confs = {
        "reference": {
            "cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni-ref0", "isGateway": True,
            "hairpinMode": True, "ipMasq": masq,
            "ipam": {
                "type": "host-local", "subnet": "10.67.0.0/22", "dataDir": os.path.join(work, "ref-ipam"),
            },
        },
        "netagent-shim": {
            "cniVersion": "1.0.0", "name": "na-shim", "type": "netagent", "bridge": "na0", "ipMasq": masq,
            "clusterCIDR": "10.64.0.0/12", "nodeStateFile": os.path.join(plan["state_dir"], "node.json"),
            "ipam": {"dataDir": os.path.join(work, "ipam")},
        },
        "netagent-fallback": {
            "cniVersion": "1.0.0", "name": "na-fallback", "type": "netagent", "bridge": "na1", "ipMasq": masq,
            "clusterCIDR": "10.64.0.0/12",
            "ipam": {"subnet": "10.68.0.0/22", "dataDir": os.path.join(work, "ipam")},
        },
    }
    plugins = {
        "reference": os.path.join(REFERENCE_DIR, "bridge"),
        "netagent-shim": os.path.join(work, "bin", "netagent"),
        "netagent-fallback": os.path.join(VENV_BIN, "netagent-cni"),
    }
    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    for command in ("ADD", "DEL"):
        for i in range(len(plan["pods"]["reference"])):
            for variant in VARIANTS:
                pod = plan["pods"][variant][i]
                served_by = plan["agent_pid"] if variant == "netagent-shim" else None
                children_before, agent_before = _children_cpu(), _process_cpu(served_by)
                wall = call(plugins[variant], command, confs[variant], f"bench-{pod}", netns.path(pod))
                cpu = _children_cpu() - children_before + _process_cpu(served_by) - agent_before
                walls.setdefault((variant, command), []).append(wall)
                cpus.setdefault((variant, command), []).append(cpu)
    report(walls, cpus, masq)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int | None) -> float:
    """User+system CPU seconds of a running process (all its threads); 0 for None."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def call(plugin: str, command: str, conf: dict, container_id: str, netns_path: str) -> float:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path,
        "CNI_IFNAME": "eth0", "CNI_PATH": REFERENCE_DIR,
    }
    stdin = json.dumps(conf).encode()
    started = time.perf_counter()
    done = subprocess.run([plugin], input=stdin, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{plugin} {command} failed: {done.stdout.decode()} {done.stderr.decode()}")
    return elapsed


Samples = dict[tuple[str, str], list[float]]  # (variant, command) -> seconds per call
COLUMNS = ("ADD wall", "p90", "DEL wall", "p90", "ADD ratio", "DEL ratio", "ADD cpu", "DEL cpu", "ADD ratio",
           "DEL ratio")


def report(walls: Samples, cpus: Samples, masq: bool) -> None:
    pods = len(walls[("reference", "ADD")])
    masq_state = "on" if masq else "off"
    print(f"CNI time per call, {pods} pods per plugin, ipMasq={masq_state} (ms; ratio = x / reference)")
    print(f"{'plugin':<19}" + "".join(f"{c:>10}" for c in COLUMNS))
    commands = ("ADD", "DEL")
    ref_wall = {cmd: statistics.median(walls[("reference", cmd)]) for cmd in commands}
    ref_cpu = {cmd: statistics.mean(cpus[("reference", cmd)]) for cmd in commands}
    for variant in VARIANTS:
        cells = []
        for cmd in commands:
            samples = sorted(walls[(variant, cmd)])
            cells += [statistics.median(samples) * 1000, samples[int(0.9 * (len(samples) - 1))] * 1000]
        cells += [statistics.median(walls[(variant, cmd)]) / ref_wall[cmd] for cmd in commands]
        cells += [statistics.mean(cpus[(variant, cmd)]) * 1000 for cmd in commands]
        cells += [statistics.mean(cpus[(variant, cmd)]) / ref_cpu[cmd] for cmd in commands]
        print(f"{variant:<19}" + "".join(f"{cell:>10.2f}" for cell in cells))


if __name__ == "__main__":
    main()
