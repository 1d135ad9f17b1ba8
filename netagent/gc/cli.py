"""`netagent gc`: one pass by hand, in the node's network namespace, printing what it released."""

from __future__ import annotations

import logging
import os
import socket

import click

from cni.config import DEFAULT_DATA_DIR
from cni.install import PLUGIN_NAME
from netagent.gc.collector import Collector
from netagent.gc.evidence import EvidenceUnavailable, listed_evidence
from netagent.gc.rules import DEFAULT_GRACE
from netagent.gc.state import read_state
from nodekit import nodestate


def _default_node_name(state_dir: str) -> str:
    """The node the agent wrote node.json for, else $NODE_NAME, else the hostname (as `netagent run`)."""
    try:
        return nodestate.read(nodestate.path_in(state_dir)).node_name
    except (OSError, ValueError, KeyError, TypeError):
        return os.environ.get("NODE_NAME") or socket.gethostname()


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only print what would be released.")
@click.option("--state-dir", default=nodestate.DEFAULT_STATE_DIR, show_default=True,
              help="The agent's state dir: node.json (node name) and gc.json (totals, orphan veths seen).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Kubeconfig file [default: in-cluster config, else ~/.kube/config].")
@click.option("--node-name", default=None,
              help="This node [default: from STATE/node.json, else $NODE_NAME, else the hostname].")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, help="The CNI IPAM dataDir.")
@click.option("--network-name", default=PLUGIN_NAME, show_default=True, help="The CNI network's name.")
@click.option("--grace", type=click.FloatRange(0.0), default=DEFAULT_GRACE, show_default=True,
              help="Seconds an attachment without a live pod is left alone (a pod may be being created).")
@click.option("--containerd-socket", default=None,
              help="Also keep every attachment whose container containerd still has (via ctr).")
def gc_cmd(dry_run: bool, state_dir: str, kubeconfig: str | None, node_name: str | None, data_dir: str,
           network_name: str, grace: float, containerd_socket: str | None) -> None:
    """Run one GC pass on this node (in its network namespace) and print what it released."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    node_name = node_name or _default_node_name(state_dir)
    evidence = listed_evidence(kubeconfig, node_name, containerd_socket)
    collector = Collector(network_name, data_dir, state_dir, grace, evidence)
    try:
        result = collector.run_once(dry_run=dry_run)
    except EvidenceUnavailable as exc:
        raise click.ClickException(f"GC pass on node {node_name} failed, nothing released: {exc}") from None
    except Exception as exc:  # netlink or disk failure part-way: what is done is done, a rerun finishes
        raise click.ClickException(f"GC pass on node {node_name} failed part-way ({type(exc).__name__}: "
                                   f"{exc}); run it again to finish") from None
    verb = "would release" if dry_run else "released"
    for release in result.releases:
        owner = f"container {release.owner[0]} {release.owner[1]}" if release.owner else "no allocation"
        click.echo(f"{verb} {release.kind} {release.name} ({owner}): {release.reason}")
    click.echo(f"node {node_name}, network {network_name}: {verb} {len(result.releases)}; kept "
               f"{result.waiting} inside the {grace:.0f}s grace period, {result.in_runtime} live in the "
               f"runtime, {result.foreign} outside this node's pod CIDRs, {result.held_orphans} veths while "
               "live pods lack an allocation")
    click.echo(f"totals: {read_state(state_dir).summary()}")
