"""The agent's collector: a pass at start (once the pods of this node are listed) and every interval.

The pod list comes from an informer, so an API server outage leaves the last known pods in force.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cni.install import PLUGIN_NAME
from netagent.gc.collector import Collector
from netagent.gc.evidence import Evidence, node_pod_cidrs, node_selector, pod_ips, sandboxes_or_none

if TYPE_CHECKING:
    from netagent.config import AgentConfig
    from netagent.health import SyncTracker

log = logging.getLogger("netagent.gc")

DEFAULT_INTERVAL = 60.0


class GcController:
    """Collects the netagent network's leftovers with the config's --gc-interval, --gc-grace,
    --cni-data-dir and --containerd-socket."""

    def __init__(self, api_client: Any, config: AgentConfig, tracker: SyncTracker | None = None) -> None:
        from kubernetes import client

        from netagent.kube import Informer, SyncLoop

        self.pods = Informer("pods", client.CoreV1Api(api_client).list_pod_for_all_namespaces,
                             field_selector=node_selector(config.node_name))
        if tracker:
            tracker.watch_informer(self.pods)
        self.containerd_socket = config.containerd_socket
        self.collector = Collector(PLUGIN_NAME, config.cni_data_dir, config.state_dir, config.gc_grace,
                                   self._evidence)
        self.loop = SyncLoop("gc", self._pass, min_interval=min(config.gc_interval, 1.0),
                             max_interval=config.gc_interval)

    def start(self) -> None:
        self.pods.start()
        self.loop.start()
        self.loop.request()

    def stop(self) -> None:
        self.loop.stop()
        self.pods.stop()

    def _evidence(self) -> Evidence:
        if not self.pods.wait_for_sync(timeout=30):
            raise RuntimeError("the pods of this node are not listed yet: collecting nothing without them")
        if node_pod_cidrs(self.collector.state_dir) is None:  # the CIDR guard must be in force
            raise RuntimeError("this node's pod CIDRs are not known yet (no node.json): collecting nothing")
        return Evidence(pod_ips(self.pods.store.list()), sandboxes_or_none(self.containerd_socket))

    def _pass(self) -> None:
        result = self.collector.run_once()
        log.info("GC pass: released %d; kept %d inside the grace period, %d live in the runtime",
                 len(result.releases), result.waiting, result.in_runtime)


def start_collector(api_client: Any, config: AgentConfig, tracker: SyncTracker | None = None) -> GcController:
    """What `netagent run` calls: the collector for the netagent network, already running."""
    controller = GcController(api_client, config, tracker)
    controller.start()
    log.info("GC every %.0fs (grace %.0fs) of %s/%s", config.gc_interval, config.gc_grace,
             config.cni_data_dir, PLUGIN_NAME)
    return controller
