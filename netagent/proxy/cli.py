"""`netagent proxy show`: what the proxy wants (its last snapshot) next to what the kernel holds.

Run it where the agent runs (inside the node's netns), or point it at a node netns with --netns.
Every service destination is listed with its endpoints; a destination whose kernel endpoints differ
from the desired ones is called out. Exit status 0 = in sync, 1 = differences, 2 = cannot tell.
"""

from __future__ import annotations

import json
import sys

import click

from netagent.proxy.backend import NodeContext, SyncError
from netagent.proxy.controller import desired_path
from netagent.proxy.inspection import Comparison, compare
from netagent.proxy.proxier import make_backends
from netagent.proxy.service import Snapshot
from nodekit.nodestate import DEFAULT_STATE_DIR


class CannotTellError(click.ClickException):
    """No desired state or no readable kernel state: neither "in sync" nor "differs" is true."""

    exit_code = 2


@click.group("proxy")
def proxy_group() -> None:
    """Inspect the kube-proxy replacement."""


@proxy_group.command("show")
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The agent's state directory (holds proxy-desired.json).",
)
@click.option("--netns", "netns_name", default=None, help="Read the kernel of this named netns.")
def show_cmd(state_dir: str, netns_name: str | None) -> None:
    """Desired services and endpoints vs the kernel's rules, differences called out."""
    path = desired_path(state_dir)
    try:
        with open(path) as f:
            document = json.load(f)
        snapshot = Snapshot.from_dict(document["snapshot"])
        node = NodeContext(document["node_name"], tuple(document["cluster_cidrs"]))
        backends = make_backends(document["backend"], node, tuple(document["families"]), netns_name)
    except FileNotFoundError:
        raise CannotTellError(
            f"no proxy state at {path}: is `netagent run --proxy ...` running with this --state-dir?"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CannotTellError(f"cannot read {path}: {err}") from None
    try:
        rows = compare(backends, snapshot)
    except (SyncError, OSError) as err:
        raise CannotTellError(f"cannot read the kernel's rules: {err}") from None

    names = _names_by_destination(snapshot)
    click.echo(
        f"backend {document['backend']}, node {node.node_name}: {len(snapshot.ports)} service ports, "
        f"{len(rows)} destinations"
    )
    for reason in snapshot.skipped:
        click.echo(f"  skipped (malformed): {reason}")
    for row in rows:
        click.echo(_format(row, names.get(row.destination, "?")))
    for p in snapshot.ports:
        if p.policy.cluster.rejected:
            for dest in map(str, p.policy.cluster.destinations):
                click.echo(f"  {dest:<28} {p.display_name:<32} -> (no endpoints: connections are rejected)")
    differences = [row for row in rows if not row.in_sync]
    if differences:
        click.echo(f"{len(differences)} destination(s) differ from the desired state")
        sys.exit(1)
    click.echo("in sync")


def _names_by_destination(snapshot: Snapshot) -> dict[str, str]:
    names = {}
    for p in snapshot.ports:
        for traffic in p.policy.traffic:
            names.update(dict.fromkeys(map(str, traffic.destinations), p.display_name))
    return names


def _format(row: Comparison, name: str) -> str:
    line = f"  {row.destination:<28} {name:<32} -> {', '.join(sorted(row.desired)) or '(rejected)'}"
    if row.in_sync:
        return line
    missing, extra = sorted(row.desired - row.kernel), sorted(row.kernel - row.desired)
    details = [f"missing in kernel: {', '.join(missing)}"] if missing else []
    details += [f"unexpected in kernel: {', '.join(extra)}"] if extra else []
    return f"{line}\n    DIFFERS: {'; '.join(details)}"
