"""`netagent run`: the per-node agent process (what a DaemonSet pod runs).

Startup order matters: the node lock first (a second agent must not touch anything), then the
health/metrics endpoints, the CNI service (pods on this node need it even before the first sync),
then the controllers. STATE_DIR/ready appears once every controller finished its first sync.
Stopping (SIGTERM/SIGINT) stops the controllers and removes only the ready marker: kernel state is
left in place on purpose, so a restarting agent never blips traffic.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from typing import Any

import click

from netagent.config import NETWORK_MODES, PROXY_BACKENDS, UNAVAILABLE_PROXIES, AgentConfig
from netagent.health import HealthServer, MetricsServer, SyncTracker
from netagent.lock import AgentLock, LockHeldError
from nodekit import nodestate
from nodekit.files import atomic_write

log = logging.getLogger("netagent.agent")

class Agent:
    """Owns the agent's parts and their lifetime; run() blocks until stop() or a signal."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = threading.Event()
        self._lock = AgentLock(config.lock_path)
        self._registry = _new_registry()
        self.tracker = SyncTracker(self._registry)
        self._stoppables: list[Any] = []  # started parts, stopped in reverse order

    def run(self) -> None:
        """Raises LockHeldError / OSError / ValueError with a user-facing message on startup failure."""
        cfg = self.config
        self._lock.acquire()
        log.info("node %s: holding %s (pid %d)", cfg.node_name, cfg.lock_path, os.getpid())
        try:
            self._remove_ready_marker()
            self._start_endpoints()
            self._start_cni_service()
            if cfg.standalone:
                self._write_standalone_node_state()
            else:
                from netagent.kube import load_api_client

                api_client = load_api_client(cfg.kubeconfig)
                self._start_controllers(api_client)
                self._start_gc(api_client)
            self._wait_until_ready()
            self.stopping.wait()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stopping.set()

    def _start_endpoints(self) -> None:
        cfg = self.config
        if cfg.healthz_bind:
            server = HealthServer(cfg.healthz_bind, self.tracker)
            server.start()
            self._stoppables.append(server)
            log.info("healthz listening on %s", cfg.healthz_bind)
        if cfg.metrics_bind:
            metrics = MetricsServer(cfg.metrics_bind, self._registry)
            metrics.start()
            self._stoppables.append(metrics)
            log.info("metrics listening on %s", cfg.metrics_bind)

    def _start_cni_service(self) -> None:
        from netagent.cni_service import CniService

        service = CniService(self.config.cni_socket_path)
        service.start()
        self.tracker.watch_cni_service(service)
        self._stoppables.append(service)
        log.info("CNI service listening on %s", self.config.cni_socket_path)

    def _start_gc(self, api_client: Any) -> None:
        """Release CNI state leaked by pods gone from this node: at start, then every --gc-interval."""
        from netagent.gc.controller import start_collector

        if self.config.gc_interval > 0:
            self._stoppables.append(start_collector(api_client, self.config, self.tracker))

    def _write_standalone_node_state(self) -> None:
        """No API server: pod CIDRs come from flags, no other nodes to reach, MTU = underlay MTU."""
        cfg = self.config
        self.tracker.expect("node")
        state = nodestate.NodeState(
            node_name=cfg.node_name,
            pod_cidrs=cfg.pod_cidrs,
            mtu=_standalone_mtu(cfg.underlay_iface),
            cluster_cidrs=cfg.cluster_cidrs,
        )
        nodestate.write(state, cfg.node_state_path)
        self.tracker.synced("node", 0.0)
        log.info("standalone: wrote %s (pod CIDRs %s, MTU %d)", cfg.node_state_path,
                 ",".join(state.pod_cidrs), state.mtu)

    def _start_controllers(self, api_client: Any) -> None:
        from netagent.node_controller import NodeController

        cfg = self.config
        nodes = NodeController(api_client, cfg, tracker=self.tracker, registry=self._registry)
        nodes.start()
        self._stoppables.append(nodes)
        log.info("node controller started (network %s)", cfg.network)
        if cfg.fast_path:
            self._start_fast_path()
        else:
            self._remove_fast_path()
        if cfg.proxy != "none":
            self._start_proxy(api_client)

    def _remove_fast_path(self) -> None:
        """A node restarted with --no-fast-path: take away filters an earlier agent attached."""
        from netagent import fastpath

        try:
            fastpath.remove(self.config.state_dir)
        except Exception:  # leftovers are worth a warning, not a dead agent
            log.warning("could not remove the fast path of an earlier agent", exc_info=True)

    def _start_fast_path(self) -> None:
        """Attach once the node state (our pod CIDRs) exists; see netagent.fastpath."""
        from netagent.fastpath import FastPath, FastPathAttacher
        from netagent.node_network import find_underlay, vxlan_device_name

        cfg = self.config
        if cfg.network == "vxlan":
            uplink = vxlan_device_name(cfg.vxlan_vni)
        else:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                uplink = find_underlay(ipr, cfg.underlay_iface).name
        cluster_v4 = [c for c in cfg.cluster_cidrs if ":" not in c]
        if not cluster_v4:
            log.warning("--fast-path needs an IPv4 cluster CIDR; fast path off")
            return

        def local_pod_cidrs() -> list[str]:
            try:
                return list(nodestate.read(cfg.node_state_path).pod_cidrs)
            except (OSError, ValueError):
                return []  # not written yet: the attacher retries

        fast_path = FastPath(cluster_v4[0], uplink, local_pod_cidrs, cfg.state_dir)
        self._stoppables.append(FastPathAttacher(fast_path, self._registry).start())
        log.info("fast path enabled (uplink %s, cluster %s)", uplink, cluster_v4[0])

    def _start_proxy(self, api_client: Any) -> None:
        from netagent.proxy.controller import ProxyController

        cfg = self.config
        proxy = ProxyController(api_client, cfg, tracker=self.tracker)
        proxy.start()
        self._stoppables.append(proxy)
        log.info("service proxy started (backend %s)", cfg.proxy)

    def _wait_until_ready(self) -> None:
        while not self.stopping.is_set():
            if self.tracker.ready():
                atomic_write(self.config.ready_path, f"{os.getpid()}\n")
                log.info("ready: first sync done, wrote %s", self.config.ready_path)
                return
            self.stopping.wait(0.05)

    def _remove_ready_marker(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.ready_path)

    def _shutdown(self) -> None:
        self._remove_ready_marker()
        for part in reversed(self._stoppables):
            try:
                part.stop()
            except Exception:  # one part failing to stop must not keep the others running
                log.exception("stopping %s failed", type(part).__name__)
        self._stoppables.clear()
        self._lock.release()
        log.info("stopped; kernel state left in place")


def _new_registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _standalone_mtu(underlay_iface: str | None) -> int:
    from netagent.node_network import underlay_mtu

    return underlay_mtu(underlay_iface)


def _parse_pod_cidrs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    networks = [_parse_cidr(value, param) for value in values]
    families = [net.version for net in networks]
    if len(families) != len(set(families)):
        raise click.BadParameter("give at most one IPv4 and one IPv6 pod CIDR", param=param)
    return tuple(str(net) for net in networks)


def _parse_cidrs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(_parse_cidr(value, param)) for value in values)


def _parse_cidr(value: str, param: click.Parameter) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a network CIDR ({exc})", param=param) from None


def _default(field: str) -> Any:
    """AgentConfig's default for a field: each flag's default is written once, in the config."""
    return AgentConfig.__dataclass_fields__[field].default


def _default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


@click.command("run")
@click.option("--node-name", default=_default_node_name, show_default="$NODE_NAME or hostname",
              help="This node's name (its Node object).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="Kubeconfig file [default: in-cluster config when KUBERNETES_SERVICE_HOST is set, "
                   "else ~/.kube/config].")
@click.option("--standalone", is_flag=True, help="Run without an API server (node state from flags).")
@click.option("--pod-cidr", "pod_cidrs", multiple=True, callback=_parse_pod_cidrs,
              help="Pod CIDR of this node in --standalone mode (repeat for dual-stack).")
@click.option("--state-dir", default=_default("state_dir"), show_default=True,
              help="Holds node.json, cni.sock, agent.lock and the ready marker.")
@click.option("--network", type=click.Choice(NETWORK_MODES), default=_default("network"), show_default=True,
              help="How pods on other nodes are reached.")
@click.option("--underlay-iface", default=None,
              help="Interface towards other nodes [default: the one holding the node IP / default route].")
@click.option("--vxlan-vni", type=click.IntRange(1, 2**24 - 1), default=_default("vxlan_vni"),
              show_default=True)
@click.option("--vxlan-port", type=click.IntRange(1, 65535), default=_default("vxlan_port"),
              show_default=True)
@click.option("--cluster-cidr", "cluster_cidrs", multiple=True, callback=_parse_cidrs,
              default=_default("cluster_cidrs"), show_default=True,
              help="Pod network of the cluster (repeatable).")
@click.option("--proxy", type=click.Choice(PROXY_BACKENDS), default=_default("proxy"), show_default=True,
              help="kube-proxy replacement backend.")
@click.option("--fast-path/--no-fast-path", default=_default("fast_path"), show_default=True,
              help="Forward pod-to-pod traffic between nodes with tc BPF, skipping the node's stack "
                   "(IPv4 TCP/UDP; NATed flows still take the stack). Needs bcc.")
@click.option("--healthz-bind", default=_default("healthz_bind"), show_default=True,
              help="HOST:PORT for /healthz ('' disables).")
@click.option("--metrics-bind", default=_default("metrics_bind"), show_default=True,
              help="HOST:PORT for /metrics ('' disables).")
@click.option("--min-sync-period", type=click.FloatRange(0.0), default=_default("min_sync_period"),
              show_default=True,
              help="Seconds between two syncs of one controller (bursts are coalesced).")
@click.option("--gc-interval", type=click.FloatRange(0.0), default=_default("gc_interval"), show_default=True,
              help="Seconds between GC passes over leaked CNI state (0 disables GC).")
@click.option("--gc-grace", type=click.FloatRange(0.0), default=_default("gc_grace"), show_default=True,
              help="Seconds an attachment without a live pod is left alone (it may be being created).")
@click.option("--cni-data-dir", default=_default("cni_data_dir"), show_default=True,
              help="The CNI plugin's IPAM dataDir, which GC sweeps.")
@click.option("--containerd-socket", default=None,
              help="GC also keeps every attachment whose container containerd still has.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def run_cmd(log_level: str, **options: Any) -> None:
    """Run the node agent: node networking, CNI service and (optionally) the service proxy."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = AgentConfig(**options)  # every other option is named as the AgentConfig field it sets
    if config.standalone and not config.pod_cidrs:
        raise click.UsageError("--standalone needs at least one --pod-cidr")
    if not config.standalone and config.pod_cidrs:
        raise click.UsageError("--pod-cidr is only used with --standalone (otherwise the Node's podCIDRs)")
    if config.proxy in UNAVAILABLE_PROXIES:
        raise click.ClickException(f"--proxy {config.proxy}: {UNAVAILABLE_PROXIES[config.proxy]}")
    agent = Agent(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop())
    try:
        agent.run()
    except LockHeldError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError) as exc:
        log.debug("startup failed", exc_info=True)
        raise click.ClickException(f"agent failed: {exc}") from None
