"""Fault injection figures: the CNI plugin and the agent SIGKILLed at random instants.

    sudo .venv/bin/python benchmarks/faults.py [--iterations 50] [--agent-kills 10] [--seed 1]

The scenarios are the ones tests/test_faults.py checks, run longer; every netns (prefix "nf") and
file is removed at the end.
1. `plugin_kill_rounds`: a node netns with the lab API server listening inside, two live pods with an
   established TCP connection each, then ITERATIONS ADDs and ITERATIONS DELs each killed after a
   random delay within the time a whole call takes, every other killed pod also losing its netns,
   then `netagent gc --grace 0`. Printed: iterations run, faults injected (kills that hit a plugin
   at work), what they left behind before GC, leaks found after GC (target 0), connections dropped
   (target 0).
2. `agent_kill_rounds`: three vxlan nodes, a long-lived pod-to-pod TCP connection across nodes, node
   changes with node1's agent killed right after each. Printed: kills, connections dropped (target
   0), kernel changes made by a further restart once converged (target 0).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from netns_lab.apiserver.server import LabApiServer  # noqa: E402
from test_agent import NODE_IPS, AgentProcess, Cluster  # noqa: E402
from test_faults import AgentFaultFigures, FaultFigures, agent_kill_rounds, plugin_kill_rounds  # noqa: E402
from test_gc import API_ADDRESS, Node  # noqa: E402
from test_node_network import build_cluster  # noqa: E402

from nodekit import netns  # noqa: E402


class Scratch:
    """Network namespaces and a work dir for one scenario, all removed by close()."""

    def __init__(self) -> None:
        self.prefix = f"nf{secrets.token_hex(3)}"
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="netagent-faults-"))
        self.created: list[str] = []

    def make_netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        netns.create(name)
        self.created.append(name)
        return name

    def close(self) -> None:
        for name in reversed(self.created):
            netns.delete(name)
        shutil.rmtree(self.work, ignore_errors=True)


def run_plugin_kills(iterations: int, seed: int) -> FaultFigures:
    scratch = Scratch()
    node = server = None
    try:
        node_ns = scratch.make_netns("node")
        server = LabApiServer(str(scratch.work / "api.json"), netns_listen={node_ns: API_ADDRESS}).start()
        node = Node(node_ns, scratch.work, server)
        return plugin_kill_rounds(node, iterations, random.Random(seed))
    finally:
        if node is not None:
            node.close()
        if server is not None:
            server.stop()
        scratch.close()


def run_agent_kills(kills: int, seed: int) -> AgentFaultFigures:
    scratch = Scratch()
    agents: list[AgentProcess] = []
    server = None
    try:
        nodes = build_cluster(scratch.make_netns, scratch.prefix, NODE_IPS)
        server = LabApiServer(str(scratch.work / "api.json"),
                              netns_listen={n.ns: API_ADDRESS for n in nodes}).start()
        return agent_kill_rounds(Cluster(nodes, server, scratch.work, agents), kills, random.Random(seed))
    finally:
        for agent in agents:
            agent.stop(signal.SIGKILL)
        if server is not None:
            server.stop()
        scratch.close()


def report(figures: FaultFigures, agent_figures: AgentFaultFigures, iterations: int, seed: int,
           seconds: float) -> None:
    print(f"netagent fault injection, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"seed {seed}, {seconds:.0f}s")
    print("command: sudo .venv/bin/python benchmarks/faults.py " + " ".join(sys.argv[1:]))
    print("1. CNI plugin SIGKILLed at a random point of ADD / DEL, then one `netagent gc --grace 0` pass")
    rows = [
        ("iterations run", f"{figures.iterations} ({iterations} ADD + {iterations} DEL)"),
        ("faults injected", f"{figures.faults_injected} (kills that hit a plugin still at work)"),
        ("leftovers before GC", f"{figures.leftovers_before_gc} (allocations + veths of no live pod)"),
        ("leaks after GC", f"{len(figures.leaks_after_gc)} (target 0) {' '.join(figures.leaks_after_gc)}"),
        ("connections dropped", f"{figures.connections_dropped} (target 0; 2 long-lived + 2 fresh checked)"),
        ("GC pass", f"{figures.gc_seconds:.2f}s for all of it (`netagent gc` process, Python start incl.)"),
    ]
    for label, value in rows:
        print(f"  {label:<20} {value}")
    print("2. agent SIGKILLed right after a node change (3 vxlan nodes), restarted each time")
    rows = [
        ("kills", str(agent_figures.kills)),
        ("connections dropped", f"{agent_figures.connections_dropped} (target 0; 1 long-lived cross-node)"),
        ("converged", f"{len(agent_figures.changes_on_a_further_restart)} kernel changes by a further "
                      "restart (target 0)"),
    ]
    for label, value in rows:
        print(f"  {label:<20} {value}")
    for change in agent_figures.changes_on_a_further_restart:
        print(f"    {change}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50, help="killed ADDs, and as many killed DELs")
    parser.add_argument("--agent-kills", type=int, default=10, help="agent SIGKILLs after node changes")
    parser.add_argument("--seed", type=int, default=1, help="random kill points are reproducible per seed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    started = time.monotonic()
    figures = run_plugin_kills(args.iterations, args.seed)
    agent_figures = run_agent_kills(args.agent_kills, args.seed)
    report(figures, agent_figures, args.iterations, args.seed, time.monotonic() - started)
    failed = len(figures.leaks_after_gc) + figures.connections_dropped + agent_figures.connections_dropped
    if failed or agent_figures.changes_on_a_further_restart:
        sys.exit(1)


if __name__ == "__main__":
    main()
