"""The lab's Kubernetes API server stand-in.

No kube-apiserver binary exists on this machine, so the lab runs this: a small HTTP server speaking enough
of the Kubernetes API (core/v1 Namespaces, Nodes, Pods, Services, Events; discovery.k8s.io/v1
EndpointSlices) that the official `kubernetes` client and kubectl work against it unchanged, over plain
https through a kubeconfig. The agent therefore runs the same code path as against a real cluster.

What it does as the real control plane does:
- list with resourceVersion, labelSelector and fieldSelector (any dotted field path); watch as a chunked
  stream of ADDED/MODIFIED/DELETED (+ BOOKMARK with allowWatchBookmarks), resumable from a resourceVersion
  inside a bounded history window; older -> an ERROR event with a 410 `Expired` Status; timeoutSeconds.
- create/update/patch (merge, strategic-merge, JSON patch)/delete with Status objects, 404/409/422 codes,
  a body first decoded into the API's types as the real server does (a wrong JSON type or a timestamp
  not RFC 3339 is 400; nulls are zero values), then Services and EndpointSlices validated to the real
  rules (validation.py; 422 naming each field), a deletionTimestamp sent on create dropped,
  uid/creationTimestamp/resourceVersion/generation filled in, optimistic locking on resourceVersion,
  `/status` subresources (the main resource ignores status changes; create keeps the status given, a lab
  convenience since no kubelet fills it in).
- Services: ClusterIPs allocated from --service-cidr (comma-separated for dual-stack), nodePorts from
  30000-32767 for NodePort/LoadBalancer, healthCheckNodePort for LoadBalancer with
  externalTrafficPolicy Local (the real rule), kept across updates, released on delete.
- Pods: deleted at once, unless DeleteOptions/query ask for gracePeriodSeconds > 0: then the pod is
  terminating (deletionTimestamp set) for that long, then removed.
- The endpoints controller (endpoints_controller.py) keeps EndpointSlices of selector Services.
- State lives in the data file (store.py; JSON lines, appended and flushed before each write is
  answered, so even a SIGKILL loses nothing acknowledged): a restart keeps every object and the
  resourceVersion keeps increasing, so a watch resuming from before the restart gets 410 and relists.
- For kubectl: discovery (/api, /apis, /version), Table output for `get` (also -o wide, --watch) and a
  minimal OpenAPI v3 so `kubectl apply` validates server-side (the server accepts any fields).

Authentication: https with a self-signed certificate kept beside the data file (tls.py), and a bearer
token (random, or read from --token-file); kubeconfigs carry both (client-go sends no credentials over
plain http). A request without the token gets 401 Unauthorized, except health (/healthz, /readyz,
/livez) and /version, which the real apiserver also shows anyone.

Not served (clear errors or ignored): limit/continue (lists come whole), dryRun (400, rather than a
write the caller did not want), server-side apply (415), deletecollection (405), admission webhooks,
authorization (whoever has the token may do anything).

The package, one concept a module: server.py (the HTTP layer: routing, responses, watch streams;
LabApiServer, write_kubeconfig) and __main__.py (the process), resources.py (what is served) and
discovery.py (its discovery/OpenAPI documents), api.py (the API's rules, independent of HTTP),
store.py (the object store), object_selectors.py, patches.py, validation.py, allocator.py
(ClusterIPs, nodePorts), endpoints_controller.py, tables.py (kubectl's Table output), api_errors.py
(Status bodies).

Usage, as a process (SIGTERM/SIGINT stop it cleanly):

    python -m netns_lab.apiserver --data STATE.json --listen 127.0.0.1:0 \\
        [--listen-netns NETNS=10.0.0.1:6443 ...] [--service-cidr 10.96.0.0/16[,fd00:96::/112]] \\
        [--ready-file READY.json] [--kubeconfig KUBECONFIG] [--token-file TOKEN]

  The ready file is written once every listener is up: {"url": "https://127.0.0.1:PORT", "port": PORT,
  "pid": PID, "ca": CERTIFICATE_PATH}. Each --listen-netns socket is bound inside that named netns
  (agents in node namespaces reach the server over the lab underlay; host-side tools use loopback).

In-process (tests):

    from netns_lab.apiserver.server import LabApiServer, write_kubeconfig
    server = LabApiServer(data_path, listen="127.0.0.1:0", netns_listen={"NETNS": "10.0.0.1:6443"},
                          service_cidrs=["10.96.0.0/16"], history_size=5000, bookmark_interval=30.0).start()
    write_kubeconfig(path, server.url, server.credentials); ...; server.stop()   # or: with ...:

`server.stop()` then `server.start()` again restarts it from the same data file (as a process restart);
with port 0 it gets a new port, so pass the old address as `listen` to keep the URL.
"""
