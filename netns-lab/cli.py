"""`netagent lab ...`: a whole cluster on this machine, nodes and pods as network namespaces.

Each command is a thin layer over cluster.py / pods.py / check.py; what they raise as LabError is
printed as one "error:" line with exit status 1, never as a traceback.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
from netns_lab import cluster
from netns_lab.state import DEFAULT_NAME, Lab, LabError

name_option = click.option("--name", default=DEFAULT_NAME, show_default=True, help="Which lab.")


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LabError (and any other failure) into one line on stderr and exit status 1."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LabError as e:
            raise click.ClickException(str(e)) from None
        except BrokenPipeError as e:
            if _stdout_open():
                raise click.ClickException(f"unexpected {type(e).__name__}: {e}") from None
            # the reader left (`lab status | head`): stop quietly, as other Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as e:  # a bug or an unexpected environment: still one line, not a traceback
            raise click.ClickException(f"unexpected {type(e).__name__}: {e}") from None
    return wrapper


def _stdout_open() -> bool:
    """False once the reader of a piped stdout has gone (the kernel reports POLLERR on the write end)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return not any(events & select.POLLERR for _, events in poller.poll(0))


def interrupt_on_sigterm() -> None:
    """A long command stopped with SIGTERM cleans up as on Ctrl-C (KeyboardInterrupt)."""
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def say(message: str) -> None:
    click.echo(f"[lab] {message}", err=True)


@click.group("lab")
def lab_group() -> None:
    """A multi-node cluster in network namespaces, with the real agent and CNI plugin.

    \b
    netagent lab up --nodes 3              underlay + 3 nodes + API server + agents
    netagent lab pod a --node n1           a pod, wired by the node's CNI plugin
    netagent lab check                     connectivity matrix
    netagent lab down                      remove everything
    Each pod and node runs a responder on port 8080 (TCP: HTTP, UDP: echo) answering its name.
    """


@lab_group.command("up")
@name_option
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--network", type=click.Choice(cluster.NETWORKS), default="vxlan", show_default=True)
@click.option("--proxy", type=click.Choice(cluster.PROXIES), default="none", show_default=True)
@click.option("--fast-path", is_flag=True,
              help="Run the agents with --fast-path (pod-to-pod traffic forwarded by tc BPF).")
@click.option("--timeout", type=float, default=cluster.DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for the API server and every agent to be ready.")
@friendly
def up_cmd(name: str, nodes: int, network: str, proxy: str, fast_path: bool, timeout: float) -> None:
    """Create the lab and wait until every node's agent is ready."""
    interrupt_on_sigterm()
    cluster.up(name, nodes=nodes, network=network, proxy=proxy, timeout=timeout, progress=say,
               fast_path=fast_path)


@lab_group.command("down")
@name_option
@friendly
def down_cmd(name: str) -> None:
    """Remove every namespace, process and file of the lab (also after a failed or killed `up`)."""
    cluster.down(name, progress=say)


@lab_group.command("status")
@name_option
@friendly
def status_cmd(name: str) -> None:
    """Nodes, agent health, pods and services."""
    from netns_lab import kube

    lab = Lab(name)
    state = lab.load()
    fast_path = ", fast path" if state.fast_path else ""
    click.echo(f"lab {name}: {state.phase}, network {state.network}{fast_path}, proxy {state.proxy}, "
               f"API server {state.api_url or '(not started)'}")
    health = {h.node: h for h in cluster.agent_health(state)}
    rows = [("NODE", "NETNS", "IP", "POD CIDR", "AGENT", "RESTARTS", "HEALTHZ")]
    for node in state.nodes.values():
        h = health[node.name]
        restarts = f"{h.restarts} ({h.detail})" if h.detail else str(h.restarts)
        rows.append((node.name, node.netns, node.ip, node.pod_cidr, h.state, restarts, h.healthz))
    click.echo(_table(rows))
    from netagent.gc.state import read_state

    rows = [("NODE", "GC OF LEAKED CNI STATE")]
    rows += [(node.name, read_state(node.state_dir).summary()) for node in state.nodes.values()]
    click.echo("\n" + _table(rows))
    rows = [("POD", "NODE", "IP", "LABELS", "RESPONDER")]
    for pod in state.pods.values():
        labels = ",".join(f"{k}={v}" for k, v in sorted(pod.labels.items())) or "-"
        server = "running" if pod.server and pod.server.alive() else "STOPPED"
        rows.append((pod.name, pod.node, " ".join(pod.ips), labels, server))
    click.echo("\n" + _table(rows))
    if state.api_url:
        try:
            view = kube.service_targets(kube.connect(lab.kubeconfig))
        except LabError as e:
            click.echo(f"\nservices: {e}")
            sys.exit(1)
        rows = [("SERVICE", "CLUSTER-IP", "PORTS", "BACKENDS")]
        pod_at = {ip: pod.name for pod in state.pods.values() for ip in pod.ips}
        rows += [(t.service, t.cluster_ip, f"{t.port}/{t.protocol}",
                  ",".join(sorted(pod_at.get(ip, ip) for ip in t.backends)) or "-") for t in view.targets]
        click.echo("\n" + _table(rows))
        for skipped in view.skipped:
            click.echo(f"malformed, not shown: {skipped}")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


@lab_group.command("pod")
@name_option
@click.argument("pod")
@click.option("--node", required=True, help="Node name, e.g. n1.")
@click.option("--labels", default="", help="k=v,k2=v2")
@friendly
def pod_cmd(name: str, pod: str, node: str, labels: str) -> None:
    """Create POD on NODE through the node's CNI plugin and register it."""
    from netns_lab import pods

    info = pods.create(Lab(name), pod, node, pods.parse_labels(labels))
    click.echo(f"pod/{info.name} on {info.node}: {' '.join(info.ips)} (netns {info.netns})")


@lab_group.command("rm")
@name_option
@click.argument("pod")
@friendly
def rm_cmd(name: str, pod: str) -> None:
    """Delete POD: CNI DEL, netns and Pod object."""
    from netns_lab import pods

    pods.remove(Lab(name), pod)
    click.echo(f"pod/{pod} deleted")


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("pod")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@friendly
def exec_cmd(name: str, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD's network namespace: lab exec POD -- CMD [ARGS...]."""
    from netns_lab import pods

    argv = pods.exec_argv(Lab(name), pod, list(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@lab_group.command("apply")
@name_option
@click.argument("file", type=click.File("r"))
@friendly
def apply_cmd(name: str, file: Any) -> None:
    """Create or update Services and EndpointSlices from FILE (YAML or JSON, several documents; - = stdin)."""
    import yaml
    from netns_lab import kube

    lab = Lab(name)
    lab.load()
    try:
        docs = [doc for doc in yaml.safe_load_all(file) if doc is not None]
    except yaml.YAMLError as e:
        raise LabError(f"{file.name}: not valid YAML/JSON: {e}") from None
    for line in kube.apply(kube.connect(lab.kubeconfig), docs):
        click.echo(line)


@lab_group.command("kubeconfig")
@name_option
@friendly
def kubeconfig_cmd(name: str) -> None:
    """Print the path of a kubeconfig for the lab's API server (for kubectl or the kubernetes client)."""
    lab = Lab(name)
    lab.load()
    click.echo(lab.kubeconfig)


@lab_group.command("check")
@name_option
@friendly
def check_cmd(name: str) -> None:
    """Connectivity matrix: pod<->pod, node->pod, pod->node, pod->ClusterIP. Exit 0 only if all pass."""
    from netns_lab import check

    if not check.main(Lab(name), click.echo):
        sys.exit(1)


@lab_group.command("demo")
@name_option
@click.option("--network", type=click.Choice(cluster.NETWORKS), default="vxlan", show_default=True)
@click.option("--proxy", type=click.Choice(cluster.PROXIES), default=None,
              help="Service proxy backend [default: iptables if available, else none].")
@friendly
def demo_cmd(name: str, network: str, proxy: str | None) -> None:
    """The main job: 3 nodes, 2 pods each, a Service, the connectivity matrix, then what next."""
    from netns_lab import demo

    interrupt_on_sigterm()
    if not demo.run(name, network=network, proxy=proxy, progress=say, out=click.echo):
        sys.exit(1)
