"""Fault injection figures: the CNI plugin SIGKILLed at random points of ADD and DEL, then one GC pass.

    sudo .venv/bin/python benchmarks/faults.py [--iterations 50] [--seed 1]

The scenario is the one tests/test_faults.py checks (`plugin_kill_rounds`), run longer: a node netns
(prefix "nf", removed at the end) with the lab API server listening inside, two live pods with an
established TCP connection each, then ITERATIONS ADDs and ITERATIONS DELs each killed after a random
delay within the time a whole call takes, every other killed pod also losing its netns, then
`netagent gc --grace 0`. Printed: iterations run, faults injected (kills that hit a plugin at work),
what they left behind before GC, leaks found after GC (target 0), connections dropped (target 0).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import secrets
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from netns_lab.apiserver import LabApiServer  # noqa: E402
from test_faults import FaultFigures, plugin_kill_rounds  # noqa: E402
from test_gc import API_ADDRESS, Node  # noqa: E402

from netagent import netns  # noqa: E402


def run(iterations: int, seed: int) -> FaultFigures:
    node_ns = f"nf{secrets.token_hex(3)}-node"
    work = pathlib.Path(tempfile.mkdtemp(prefix="netagent-faults-"))
    netns.create(node_ns)
    node = server = None
    try:
        server = LabApiServer(str(work / "api.json"), netns_listen={node_ns: API_ADDRESS}).start()
        node = Node(node_ns, work, server)
        return plugin_kill_rounds(node, iterations, random.Random(seed))
    finally:
        if node is not None:
            node.close()
        if server is not None:
            server.stop()
        netns.delete(node_ns)
        shutil.rmtree(work, ignore_errors=True)


def report(figures: FaultFigures, iterations: int, seed: int, seconds: float) -> None:
    print(f"netagent fault injection, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"seed {seed}, {seconds:.0f}s")
    print("command: sudo .venv/bin/python benchmarks/faults.py " + " ".join(sys.argv[1:]))
    print("CNI plugin SIGKILLed at a random point of ADD / DEL, then one `netagent gc --grace 0` pass")
    rows = [
        ("iterations run", f"{figures.iterations} ({iterations} ADD + {iterations} DEL)"),
        ("faults injected", f"{figures.faults_injected} (kills that hit a plugin still at work)"),
        ("leftovers before GC", f"{figures.leftovers_before_gc} (allocations + veths of no live pod)"),
        ("leaks after GC", f"{figures.leaks_after_gc} (target 0)"),
        ("connections dropped", f"{figures.connections_dropped} (target 0; 2 long-lived + 2 fresh checked)"),
    ]
    for label, value in rows:
        print(f"  {label:<20} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50, help="killed ADDs, and as many killed DELs")
    parser.add_argument("--seed", type=int, default=1, help="random kill points are reproducible per seed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    started = time.monotonic()
    figures = run(args.iterations, args.seed)
    report(figures, args.iterations, args.seed, time.monotonic() - started)
    if figures.leaks_after_gc or figures.connections_dropped:
        sys.exit(1)


if __name__ == "__main__":
    main()
