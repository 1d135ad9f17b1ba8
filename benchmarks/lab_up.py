"""Time `netagent lab up` (3 nodes) from the command to every agent ready, phase by phase.

Runs the real CLI (interpreter start and imports included, as a user sees it) and timestamps each
progress line as it arrives, then `lab down`. Target (issue 3): under 15 s on this 2-core machine.
The reference in the same run is a bare `python -c "from kubernetes.client import CoreV1Api"`, the
import every agent and the CLI pay, to show how much of the total is interpreter/import cost here.

    .venv/bin/python benchmarks/lab_up.py [--runs 3] [--nodes 3] [--network vxlan]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 15.0
NETAGENT = [sys.executable, "-m", "netagent.cli"]


def timed_up(name: str, nodes: int, network: str) -> tuple[float, list[tuple[float, str]]]:
    """Seconds from start to exit of `lab up`, and each progress line with its time offset."""
    started = time.monotonic()
    argv = [*NETAGENT, "lab", "up", "--name", name, "--nodes", str(nodes), "--network", network]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [(time.monotonic() - started, line.rstrip()) for line in proc.stderr]
    if proc.wait() != 0:
        raise SystemExit("lab up failed:\n" + "\n".join(text for _, text in lines))
    return time.monotonic() - started, lines


def import_reference() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "from kubernetes.client import CoreV1Api"], check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--network", default="vxlan")
    args = parser.parse_args()
    totals, downs = [], []
    for run in range(args.runs):
        name = f"benchup{run}"
        subprocess.run([*NETAGENT, "lab", "down", "--name", name], capture_output=True)
        total, lines = timed_up(name, args.nodes, args.network)
        totals.append(total)
        print(f"run {run + 1}: lab up {total:.1f}s")
        for offset, text in lines:
            print(f"  {offset:6.2f}s  {text}")
        started = time.monotonic()
        subprocess.run([*NETAGENT, "lab", "down", "--name", name], check=True, capture_output=True)
        downs.append(time.monotonic() - started)
    reference = statistics.median(import_reference() for _ in range(3))
    median = statistics.median(totals)
    print(f"\nlab up, {args.nodes} nodes, {args.network}: median {median:.1f}s over {args.runs} runs "
          f"(target < {TARGET_SECONDS:.0f}s: {'ok' if median < TARGET_SECONDS else 'MISSED'}); "
          f"lab down median {statistics.median(downs):.1f}s")
    print(f"reference: `from kubernetes.client import CoreV1Api` in a fresh interpreter {reference:.2f}s "
          f"(lab up = {median / reference:.1f}x that)")


if __name__ == "__main__":
    main()
