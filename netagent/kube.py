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

import inspect
import json
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


def object_key(meta: Any) -> str | None:
    """namespace/name, or name for cluster-scoped objects (client-go's MetaNamespaceKeyFunc), from an
    object's JSON metadata; None when the metadata cannot name an object at all."""
    if not isinstance(meta, dict):
        return None
    name, namespace = meta.get("name"), meta.get("namespace") or ""
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return f"{namespace}/{name}" if namespace else name


# Turns one object's JSON into what the informer's consumers handle; raises for an object it cannot
# represent, which the informer then skips (that one object, not the list or the watch).
Decoder = Callable[[dict[str, Any]], Any]


def as_json(raw: dict[str, Any]) -> dict[str, Any]:
    """For consumers that validate the JSON themselves (the service proxy): nothing to decode."""
    return raw


def as_client_models(list_func: Callable[..., Any]) -> Decoder:
    """The official client's model object for each item (a V1Node for list_node), decoded one object at
    a time with the client's own deserializer, so one object it cannot represent is skipped alone."""
    api = _bound_api(list_func)
    list_type = inspect.signature(list_func).return_annotation
    item_type = (list_type if isinstance(list_type, str) else list_type.__name__).removesuffix("List")
    api_client = api.api_client

    def decode(raw: dict[str, Any]) -> Any:
        return api_client.deserialize(json.dumps(raw), item_type, "application/json")

    return decode


def _bound_api(func: Callable[..., Any]) -> Any:
    """The client API object (CoreV1Api, ...) a list method is bound to, through any wrappers."""
    while func is not None:
        api = getattr(func, "__self__", None)
        if api is not None and hasattr(api, "api_client"):
            return api
        func = getattr(func, "__wrapped__", None)
    raise TypeError("an Informer's list_func must be (a wrapper of) an official-client list method")


class WatchClosedEarlyError(RuntimeError):
    """The server ended a watch long before its timeout with nothing sent: treat as a broken stream
    (relist after backoff) instead of re-watching in a tight loop."""


class _JsonWatch(watch.Watch):
    """The client's watch stream with each event's object left as JSON: the informer decodes objects
    one by one, where the client would fail the whole stream on the first one it cannot model."""

    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None


class InformerCache:
    """Thread-safe cache of the informer's objects (decoded) keyed by object_key(), with the
    resourceVersion each was decoded from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}
        self._versions: dict[str, str] = {}

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._items.get(key)

    def list(self) -> list[Any]:
        with self._lock:
            return list(self._items.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def _put(self, key: str, version: str, obj: Any) -> Any | None:
        with self._lock:
            old = self._items.get(key)
            self._items[key], self._versions[key] = obj, version
            return old

    def _delete(self, key: str) -> Any | None:
        with self._lock:
            self._versions.pop(key, None)
            return self._items.pop(key, None)

    def _replace(self, fresh: dict[str, tuple[str, Any]]) -> list[tuple[str, Any, Any]]:
        """Swap in a fresh list (key -> (resourceVersion, object)); returns the events that turn the
        old content into the new."""
        with self._lock:
            old_items, old_versions = self._items, self._versions
            self._items = {key: obj for key, (_, obj) in fresh.items()}
            self._versions = {key: version for key, (version, _) in fresh.items()}
        events = [("DELETED", old, None) for key, old in old_items.items() if key not in fresh]
        for key, (version, obj) in fresh.items():
            old = old_items.get(key)
            if old is None:
                events.append(("ADDED", obj, None))
            elif old_versions.get(key) != version:
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
    field_selector, ...) apply to both the list and the watch. decode turns each object's JSON into
    what the handlers get (default: the client's model objects). Lists and watches are read as JSON
    and decoded object by object: an object that cannot be decoded (a malformed one, or one the
    client's models reject) is logged once, listed in `invalid`, and left out; if an earlier version
    of it was in the cache, consumers see it deleted. Everything else keeps flowing.

    `failing_since` says since when list/watch has failed without a success in between (None while
    it works), and `failure_is_ours` whether the server's answer blames this client (a 4xx such as
    403, an undecodable list) rather than an outage or a server error, which the agent reports but
    waits out: see netagent.health.
    """

    def __init__(self, kind: str, list_func: Callable[..., Any], *, decode: Decoder | None = None,
                 resync_period: float = 300.0, watch_timeout: int = 240, backoff: Backoff | None = None,
                 **list_kwargs: Any) -> None:
        self.kind = kind
        self.store = InformerCache()
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.relists = 0
        self.invalid: dict[str, str] = {}  # key -> why, for the objects left out now
        self.failing_since: float | None = None
        self.failure_is_ours = False
        self.last_error = ""
        self._decode = decode or as_client_models(list_func)
        self._list_func = list_func
        self._list_kwargs = list_kwargs
        self._backoff = backoff or Backoff()
        self._handlers: list[Handler] = []
        self._logged_invalid: dict[str, str] = {}  # key -> the resourceVersion whose rejection was logged
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
                self._pause(f"API error {exc.status} {exc.reason}", _blames_client(exc.status))
            except ValueError as exc:  # an answer that is not a list/watch document
                if self._stopping.is_set():
                    break
                self._pause(f"{type(exc).__name__}: {exc}", True)
            except Exception as exc:  # dropped stream, refused connection, timeout: relist after backoff
                if self._stopping.is_set():
                    break
                self._pause(f"{type(exc).__name__}: {exc}", False)

    def _pause(self, reason: str, ours: bool) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
        self.failure_is_ours, self.last_error = ours, reason
        delay = self._backoff.next_delay()
        log.warning("%s: list/watch failed (%s); relisting in %.1fs", self.kind, reason, delay)
        self._stopping.wait(delay)

    def _progressed(self) -> None:
        self.failing_since = None
        self._backoff.reset()  # only a list or watch that works proves the connection healthy again

    def _relist(self) -> str:
        response = self._list_func(_request_timeout=(10, LIST_TIMEOUT), _preload_content=False,
                                   **self._list_kwargs)
        document = json_body(response, f"the {self.kind} list")
        items, resource_version = document.get("items"), _path(document, "metadata", "resourceVersion")
        if not isinstance(items, list) or not isinstance(resource_version, str):
            raise ValueError(f"the {self.kind} list has no items or no resourceVersion")
        fresh: dict[str, tuple[str, Any]] = {}
        for raw in items:
            decoded = self._decoded(raw)
            if decoded is not None:
                fresh[decoded[0]] = decoded[1:]
        events = self.store._replace(fresh)
        self.relists += 1
        self._progressed()
        log.debug("%s: listed %d objects (%d invalid) at resourceVersion %s", self.kind, len(items),
                  len(self.invalid), resource_version)
        for event_type, obj, old in events:
            self._notify(event_type, obj, old)
        self._synced.set()  # after the handlers: a consumer fed by events has then seen the whole list
        return resource_version

    def _watch_until_resync(self, resource_version: str) -> None:
        """Watch from resource_version, resuming after server-side timeouts, until a resync is due."""
        deadline = time.monotonic() + self.resync_period
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            timeout = max(1, int(min(self.watch_timeout, remaining)))
            self._watch = _JsonWatch()
            stream = self._watch.stream(
                self._list_func, resource_version=resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _request_timeout=(10, self.watch_timeout + 30), **self._list_kwargs,
            )
            opened, events = time.monotonic(), 0
            for event in stream:
                if self._stopping.is_set():
                    return
                events += 1
                self._progressed()
                raw = event.get("object") if isinstance(event, dict) else None
                resource_version = _path(raw, "metadata", "resourceVersion") or resource_version
                self._apply(event.get("type") if isinstance(event, dict) else None, raw)
            if not events and time.monotonic() - opened < timeout / 2:
                raise WatchClosedEarlyError(f"watch closed after {time.monotonic() - opened:.1f}s "
                                            f"of {timeout}s without an event")
            self._progressed()

    def _apply(self, event_type: Any, raw: Any) -> None:
        if event_type == "BOOKMARK":
            return
        if event_type == "DELETED":
            key = object_key(_path(raw, "metadata"))
            if key is not None:
                self.invalid.pop(key, None)
                old = self.store._delete(key)
                if old is not None:
                    self._notify("DELETED", old, old)
        elif event_type in ("ADDED", "MODIFIED"):
            decoded = self._decoded(raw)
            if decoded is not None:
                key, version, obj = decoded
                old = self.store._put(key, version, obj)
                self._notify("MODIFIED" if old is not None else "ADDED", obj, old)
        else:
            log.warning("%s: ignoring a watch event of unknown type %r", self.kind, event_type)

    def _decoded(self, raw: Any) -> tuple[str, str, Any] | None:
        """(key, resourceVersion, decoded object), or None for an object that is left out: logged
        once per version, and taken out of the cache (a DELETED event) if an older version was in it."""
        meta = _path(raw, "metadata")
        key, version = object_key(meta), _path(meta, "resourceVersion")
        try:
            if key is None:
                raise ValueError("metadata names no object")
            obj = self._decode(raw)
        except Exception as exc:  # whatever the decoder raises, only this object is affected
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            if key is None:
                log.warning("%s: skipping an object without a usable name: %s", self.kind, reason)
                return None
            self.invalid[key] = reason
            if self._logged_invalid.get(key) != version:
                self._logged_invalid[key] = version
                log.warning("%s %s (resourceVersion %s) cannot be decoded, skipping it: %s",
                            self.kind, key, version, reason)
            old = self.store._delete(key)
            if old is not None:
                self._notify("DELETED", old, old)
            return None
        self.invalid.pop(key, None)
        self._logged_invalid.pop(key, None)
        return key, version if isinstance(version, str) else "", obj

    def _notify(self, event_type: str, obj: Any, old: Any) -> None:
        for handler in self._handlers:
            try:
                handler(event_type, obj, old)
            except Exception:  # one consumer's bug must not stop the cache or other consumers
                log.exception("%s: handler failed on %s", self.kind, event_type)


def _blames_client(status: int | None) -> bool:
    """An HTTP error that retrying the same request will not cure: the request or this client's
    rights are wrong (400, 401, 403, 404, ...), unlike a timeout, throttling or a server error."""
    return status is not None and 400 <= status < 500 and status not in (408, 410, 429)


def _path(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... through JSON dicts; None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def json_body(response: Any, what: str) -> dict[str, Any]:
    """The JSON object of an undecoded client response (_preload_content=False); ApiException for an
    error status, as the client would raise."""
    try:
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason, http_resp=response)
        document = json.loads(response.data)
    finally:
        response.release_conn()
    if not isinstance(document, dict):
        raise ValueError(f"{what} is not a JSON object")
    return document


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
