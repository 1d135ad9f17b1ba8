"""Talking to the API server: client loading, a generic list+watch informer, and a coalescing sync loop.

The informer keeps a local cache of one kind of object in step with the API server, the way
client-go's reflector does: list, then watch from the list's resourceVersion (with bookmarks so a
quiet watch can still resume cheaply), relist on `410 Gone` or a broken stream (exponential backoff
with jitter, so a restarted API server is not stampeded by every node at once), and relist
periodically, turning the difference into synthesized ADDED/MODIFIED/DELETED events so a missed
event can never leave a consumer wrong for long.

Consumers (node controller, service proxy) do not act per event: their handler calls
SyncLoop.request(), which coalesces a burst of changes into one sync at most every min_interval
(kube-proxy's minSyncPeriod) and retries a failed sync with backoff.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

log = logging.getLogger("netagent.kube")

LIST_TIMEOUT = 120  # seconds a list may take before it counts as failed (a hung server must not stall us)

# Handler(event_type, new_object, old_object): event_type is ADDED, MODIFIED or DELETED; old_object is
# None for ADDED; for DELETED new_object is the last state seen.
Handler = Callable[[str, Any, Any], None]


class KubeConfigError(ValueError):
    """No usable API server configuration (message says which source was tried)."""


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """kubeconfig if given; else in-cluster config inside a pod; else ~/.kube/config."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            source = kubeconfig
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            source = "in-cluster service account"
            config.load_incluster_config(client_configuration=configuration)
        else:
            source = os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=source, client_configuration=configuration)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        raise KubeConfigError(f"cannot load API server config from {source}: {exc}") from None
    return client.ApiClient(configuration)


def object_key(obj: Any) -> str:
    """namespace/name, or name for cluster-scoped objects (client-go's MetaNamespaceKeyFunc)."""
    meta = obj.metadata
    return f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name


class WatchClosedEarlyError(RuntimeError):
    """The server ended a watch long before its timeout with nothing sent: treat as a broken stream
    (relist after backoff) instead of re-watching in a tight loop."""


class InformerCache:
    """Thread-safe cache of the informer's objects keyed by object_key()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._items.get(key)

    def list(self) -> list[Any]:
        with self._lock:
            return list(self._items.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def _put(self, obj: Any) -> Any | None:
        with self._lock:
            key = object_key(obj)
            old = self._items.get(key)
            self._items[key] = obj
            return old

    def _delete(self, key: str) -> Any | None:
        with self._lock:
            return self._items.pop(key, None)

    def _replace(self, objects: list[Any]) -> list[tuple[str, Any, Any]]:
        """Swap in a fresh list; returns the events that turn the old content into the new."""
        fresh = {object_key(o): o for o in objects}
        with self._lock:
            old_items, self._items = self._items, fresh
        events = [("DELETED", old, None) for key, old in old_items.items() if key not in fresh]
        for key, obj in fresh.items():
            old = old_items.get(key)
            if old is None:
                events.append(("ADDED", obj, None))
            elif old.metadata.resource_version != obj.metadata.resource_version:
                events.append(("MODIFIED", obj, old))
        return events


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Informer:
    """A local, continuously updated cache of one kind of object.

    list_func is an official-client list call (e.g. CoreV1Api(api).list_node, or
    DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces); list_kwargs (label_selector,
    field_selector, ...) apply to both the list and the watch.
    """

    def __init__(self, kind: str, list_func: Callable[..., Any], *, resync_period: float = 300.0,
                 watch_timeout: int = 240, backoff: Backoff | None = None, **list_kwargs: Any) -> None:
        self.kind = kind
        self.store = InformerCache()
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.relists = 0
        self._list_func = list_func
        self._list_kwargs = list_kwargs
        self._backoff = backoff or Backoff()
        self._handlers: list[Handler] = []
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)

    def add_handler(self, handler: Handler) -> None:
        """Register before start(); called from the informer thread, one event at a time."""
        self._handlers.append(handler)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout)

    @property
    def synced(self) -> bool:
        """True once the first list has been stored and handed to the handlers (the cache, and any
        consumer fed by events, is then a usable view)."""
        return self._synced.is_set()

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                resource_version = self._relist()
                self._watch_until_resync(resource_version)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    log.info("%s: watch expired (410 Gone), relisting", self.kind)
                    continue
                self._pause(f"API error {exc.status} {exc.reason}")
            except Exception as exc:  # dropped stream, refused connection, timeout: relist after backoff
                if self._stopping.is_set():
                    break
                self._pause(f"{type(exc).__name__}: {exc}")

    def _pause(self, reason: str) -> None:
        delay = self._backoff.next_delay()
        log.warning("%s: list/watch failed (%s); relisting in %.1fs", self.kind, reason, delay)
        self._stopping.wait(delay)

    def _relist(self) -> str:
        result = self._list_func(_request_timeout=(10, LIST_TIMEOUT), **self._list_kwargs)
        events = self.store._replace(list(result.items))
        self.relists += 1
        log.debug("%s: listed %d objects at resourceVersion %s", self.kind, len(result.items),
                  result.metadata.resource_version)
        for event_type, obj, old in events:
            self._notify(event_type, obj, old)
        self._synced.set()  # after the handlers: a consumer fed by events has then seen the whole list
        return result.metadata.resource_version

    def _watch_until_resync(self, resource_version: str) -> None:
        """Watch from resource_version, resuming after server-side timeouts, until a resync is due."""
        deadline = time.monotonic() + self.resync_period
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            timeout = max(1, int(min(self.watch_timeout, remaining)))
            self._watch = watch.Watch()
            stream = self._watch.stream(
                self._list_func, resource_version=resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _request_timeout=(10, self.watch_timeout + 30), **self._list_kwargs,
            )
            opened, events = time.monotonic(), 0
            for event in stream:
                if self._stopping.is_set():
                    return
                events += 1
                self._backoff.reset()  # only a watch that works proves the connection healthy again
                resource_version = self._watch.resource_version or resource_version
                self._apply(event["type"], event["object"])
            if not events and time.monotonic() - opened < timeout / 2:
                raise WatchClosedEarlyError(f"watch closed after {time.monotonic() - opened:.1f}s "
                                            f"of {timeout}s without an event")
            self._backoff.reset()

    def _apply(self, event_type: str, obj: Any) -> None:
        if event_type == "BOOKMARK":
            return
        if event_type == "DELETED":
            old = self.store._delete(object_key(obj))
            self._notify("DELETED", obj, old)
        elif event_type in ("ADDED", "MODIFIED"):
            old = self.store._put(obj)
            self._notify("MODIFIED" if old is not None else "ADDED", obj, old)

    def _notify(self, event_type: str, obj: Any, old: Any) -> None:
        for handler in self._handlers:
            try:
                handler(event_type, obj, old)
            except Exception:  # one consumer's bug must not stop the cache or other consumers
                log.exception("%s: handler failed on %s %s", self.kind, event_type, object_key(obj))


class SyncLoop:
    """Runs sync() in its own thread when requested, coalescing bursts (kube-proxy's
    BoundedFrequencyRunner): at most one run per min_interval, a failed run retried with backoff,
    and a periodic run every max_interval even without requests (self-healing of drift)."""

    def __init__(self, name: str, sync: Callable[[], None], min_interval: float = 1.0,
                 max_interval: float = 300.0, backoff: Backoff | None = None) -> None:
        self.name = name
        self.runs = 0
        self._sync = sync
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._backoff = backoff or Backoff(initial=1.0, maximum=60.0)
        self._requested = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sync-{name}", daemon=True)

    def request(self) -> None:
        self._requested.set()

    def start(self) -> SyncLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._requested.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        last_start = float("-inf")
        while not self._stopping.is_set():
            self._requested.wait(self.max_interval)
            if self._stopping.is_set():
                return
            wait = last_start + self.min_interval - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                return
            self._requested.clear()  # changes arriving from here on trigger another run
            last_start = time.monotonic()
            self.runs += 1
            try:
                self._sync()
            except Exception as exc:
                delay = self._backoff.next_delay()
                log.error("%s sync failed (%s); retrying in %.1fs", self.name, exc, delay,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                if self._stopping.wait(delay):
                    return
                self._requested.set()
            else:
                self._backoff.reset()
