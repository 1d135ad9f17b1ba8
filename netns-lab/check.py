"""`lab check`: the connectivity suite, printed as a matrix (rows: from, columns: to).

Every probe talks to a responder and checks WHO answered, so a packet delivered to the wrong pod is a
failure, not a pass:
  pod -> pod      TCP and UDP to the other pod's IP (same node and across nodes)
  node -> pod     TCP from the node's netns to the pod's IP
  pod -> node     TCP to the node's underlay IP (each node runs a responder too)
  pod -> service  TCP/UDP to each ClusterIP port with ready endpoints; the answer must be one of the
  node -> service service's backend pods. Skipped (and said so) when the lab runs without a proxy.
Probes run from one process (a socket is opened inside the source netns), several at a time.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netns_lab import probe
from netns_lab.responder import DEFAULT_PORT as RESPONDER_PORT
from netns_lab.state import Lab, LabError, LabState

if TYPE_CHECKING:  # the kubernetes client is imported only when services are checked
    from netns_lab.kube import ServiceTarget

PARALLEL_PROBES = 8


@dataclass(frozen=True)
class Probe:
    source: str  # row label
    target: str  # column label
    kind: str  # "pod->pod same node", "pod->pod across nodes", "node->pod", "pod->node", "X->service"
    protocol: str  # "tcp" or "udp"
    source_netns: str
    host: str
    port: int
    expected: frozenset[str]


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    answer: str  # the responder's name, or the error
    passed: bool


@dataclass
class Report:
    rows: list[str]
    columns: list[str]
    outcomes: list[Outcome]
    notes: list[str]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    def cell(self, row: str, column: str) -> str:
        results = [o for o in self.outcomes if o.probe.source == row and o.probe.target == column]
        if not results:
            return "-"
        failed = sorted({o.probe.protocol for o in results if not o.passed})
        if not failed:
            return "ok"
        every_protocol_failed = len(failed) == len({o.probe.protocol for o in results})
        return "FAIL" if every_protocol_failed else "FAIL:" + "+".join(failed)


def plan(state: LabState, services: list[ServiceTarget] | None) -> tuple[list[Probe], list[str], list[str]]:
    """Every probe for this lab, and the matrix's rows and columns (services None: no proxy to test)."""
    pods = sorted(state.pods.values(), key=lambda p: (p.node, p.name))
    nodes = list(state.nodes.values())
    pod_at = {ip: pod.name for pod in pods for ip in pod.ips}
    backends = {svc.label: frozenset(pod_at.get(ip, ip) for ip in svc.backends) for svc in services or []}
    probes = []
    for src in pods:
        for dst in pods:
            if dst.name != src.name:
                where = "same node" if dst.node == src.node else "across nodes"
                for protocol in ("tcp", "udp"):
                    probes.append(Probe(src.name, dst.name, f"pod->pod {where}", protocol, src.netns,
                                        dst.ips[0], RESPONDER_PORT, frozenset({dst.name})))
        for node in nodes:
            probes.append(Probe(src.name, node.name, "pod->node", "tcp", src.netns, node.ip, RESPONDER_PORT,
                                frozenset({node.name})))
        for svc in services or []:
            probes.append(Probe(src.name, svc.label, "pod->service", svc.protocol.lower(), src.netns,
                                svc.cluster_ip, svc.port, backends[svc.label]))
    for node in nodes:
        for dst in pods:
            probes.append(Probe(node.name, dst.name, "node->pod", "tcp", node.netns, dst.ips[0],
                                RESPONDER_PORT, frozenset({dst.name})))
        for svc in services or []:
            probes.append(Probe(node.name, svc.label, "node->service", svc.protocol.lower(), node.netns,
                                svc.cluster_ip, svc.port, backends[svc.label]))
    rows = [p.name for p in pods] + [n.name for n in nodes]
    columns = rows + [svc.label for svc in services or []]
    return probes, rows, columns


def run_probe(p: Probe) -> Outcome:
    ask: Callable[..., str] = probe.tcp_name if p.protocol == "tcp" else probe.udp_name
    try:
        answer = ask(p.source_netns, p.host, p.port)
    except OSError as e:
        return Outcome(p, f"{type(e).__name__}: {e.strerror or e}", False)
    return Outcome(p, answer, answer in p.expected)


def run(state: LabState, services: list[ServiceTarget] | None) -> Report:
    probes, rows, columns = plan(state, services)
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_PROBES) as pool:
        outcomes = list(pool.map(run_probe, probes))
    notes = []
    if services is None:
        notes.append(f"pod->ClusterIP checks skipped: this lab runs with --proxy {state.proxy}")
    elif not services:
        notes.append("pod->ClusterIP checks: no service with ready endpoints (see `lab apply`)")
    return Report(rows, columns, outcomes, notes)


def render(report: Report, node_of: dict[str, str]) -> str:
    """The matrix, a per-kind summary and every failure with what was answered instead."""
    def row_label(row: str) -> str:
        return f"{row} ({node_of[row]})" if row in node_of else row

    first = max([len("from \\ to")] + [len(row_label(r)) for r in report.rows])
    grid = [[report.cell(row, column) for column in report.columns] for row in report.rows]
    widths = [max([len(column)] + [len(cells[i]) for cells in grid])
              for i, column in enumerate(report.columns)]
    lines = ["from \\ to".ljust(first) + "  " + "  ".join(c.ljust(w) for c, w in zip(report.columns, widths,
                                                                                    strict=True))]
    for row, cells in zip(report.rows, grid, strict=True):
        padded = [cell.ljust(w) for cell, w in zip(cells, widths, strict=True)]
        lines.append(row_label(row).ljust(first) + "  " + "  ".join(padded).rstrip())
    lines.append("")
    kinds: dict[str, list[Outcome]] = {}
    for o in report.outcomes:
        kinds.setdefault(o.probe.kind, []).append(o)
    for kind, outs in kinds.items():
        lines.append(f"{kind:<24} {sum(o.passed for o in outs)}/{len(outs)} passed")
    lines += report.notes
    for column in report.columns:
        via_service = [o for o in report.outcomes
                       if o.probe.target == column and o.probe.kind.endswith("->service")]
        if via_service:
            answered = sorted({o.answer for o in via_service if o.passed})
            lines.append(f"{column} answered by {len(answered)} of {len(via_service[0].probe.expected)} "
                         f"backends: {', '.join(answered) or 'none'}")
    for o in report.outcomes:
        if not o.passed:
            p = o.probe
            lines.append(f"FAILED {p.kind} {p.protocol}: {p.source} -> {p.target} ({p.host}:{p.port}): "
                         f"got {o.answer!r}, expected {' or '.join(sorted(p.expected))}")
    passed = sum(o.passed for o in report.outcomes)
    lines.append(f"{'PASS' if report.passed else 'FAIL'}: {passed}/{len(report.outcomes)} checks")
    return "\n".join(lines)


def main(lab: Lab, out: Callable[[str], None]) -> bool:
    """Run the suite against lab `lab`, print the matrix; True when every check passed."""
    from netns_lab import kube

    state = lab.load()
    if state.phase != "ready":
        raise LabError(f"lab {lab.name!r} is not ready (phase {state.phase})")
    if not state.pods:
        raise LabError(f"lab {lab.name!r} has no pods: create some with `netagent lab pod`")
    services = None
    if state.proxy != "none":
        services = [t for t in kube.service_targets(kube.connect(lab.kubeconfig)).targets if t.backends]
    report = run(state, services)
    out(render(report, {pod.name: pod.node for pod in state.pods.values()}))
    return report.passed
