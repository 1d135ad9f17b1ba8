"""How fast the lab API server serves what the agent's watches and the proxy benchmarks need.

Every figure is also given as a ratio to one bare HTTP round trip (GET /version) on the same keep-alive
connection in the same run, so the numbers mean something on a noisy shared machine.

    .venv/bin/python benchmarks/apiserver_bench.py [--services 2000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import statistics
import tempfile
import threading
import time
import urllib.parse

from kubernetes import client, config
from netns_lab.apiserver.server import LabApiServer, write_kubeconfig


def per_call(fn, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=2000, help="Services (each with one EndpointSlice)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = LabApiServer(f"{tmp}/state.json").start()
        try:
            run(server, tmp, args.services)
        finally:
            server.stop()


def run(server: LabApiServer, tmp: str, services: int) -> None:
    url = urllib.parse.urlsplit(server.url)
    tls = ssl.create_default_context(cadata=server.credentials.ca_pem)
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=tls)
    auth = {"Authorization": f"Bearer {server.token}"}

    def request(method: str, path: str, body: dict | None = None) -> bytes:
        conn.request(
            method,
            path,
            body=json.dumps(body) if body else None,
            headers={"Content-Type": "application/json", **auth},
        )
        response = conn.getresponse()
        data = response.read()
        assert response.status < 300, data
        return data

    round_trip = per_call(lambda i: request("GET", "/version"), 500)

    def create(i: int) -> None:
        name = f"svc-{i}"
        request(
            "POST",
            "/api/v1/namespaces/default/services",
            {"metadata": {"name": name}, "spec": {"ports": [{"name": "p", "port": 80}]}},
        )
        request(
            "POST",
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            {
                "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": [f"10.244.{i % 250}.{e + 1}"], "conditions": {"ready": True}}
                    for e in range(10)
                ],
                "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            },
        )

    create_each = per_call(create, services) / 2  # two writes per Service

    started = time.perf_counter()
    request("GET", "/api/v1/services")
    list_raw = time.perf_counter() - started
    kubeconfig = f"{tmp}/kubeconfig"
    write_kubeconfig(kubeconfig, server.url, server.credentials)
    core = client.CoreV1Api(config.new_client_from_config(kubeconfig))
    started = time.perf_counter()
    core.list_service_for_all_namespaces()
    list_client = time.perf_counter() - started

    request("POST", "/api/v1/nodes", {"metadata": {"name": "n1"}})
    seen: dict[str, float] = {}
    watching = threading.Event()

    def watcher() -> None:
        rv = json.loads(request_other("GET", "/api/v1/nodes"))["metadata"]["resourceVersion"]
        other.request("GET", f"/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=60", headers=auth)
        response = other.getresponse()
        watching.set()
        while len(seen) < 200:
            event = json.loads(response.readline())
            seen[event["object"]["metadata"]["annotations"]["i"]] = time.perf_counter()

    other = http.client.HTTPSConnection(url.hostname, url.port, context=tls)

    def request_other(method: str, path: str) -> bytes:
        other.request(method, path, headers=auth)
        return other.getresponse().read()

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    watching.wait(10)
    latencies = []
    for i in range(200):
        sent = time.perf_counter()
        conn.request(
            "PATCH",
            "/api/v1/nodes/n1",
            body=json.dumps({"metadata": {"annotations": {"i": str(i)}}}),
            headers={"Content-Type": "application/merge-patch+json", **auth},
        )
        conn.getresponse().read()
        while str(i) not in seen:
            time.sleep(0.0002)
        latencies.append(seen[str(i)] - sent)
    thread.join(5)

    started = time.perf_counter()
    server.stop()
    server.start()
    restart = time.perf_counter() - started

    objects = 2 * services
    print(f"lab API server, {services} Services + {services} EndpointSlices (10 endpoints each)")
    print(f"  reference: GET /version round trip        {round_trip * 1e3:8.3f} ms")
    print(
        f"  create (POST), per object                 {create_each * 1e3:8.3f} ms  "
        f"= {create_each / round_trip:6.1f} x round trip"
    )
    print(
        f"  list {services} Services, raw HTTP           {list_raw * 1e3:8.1f} ms  "
        f"= {list_raw / round_trip:6.1f} x round trip"
    )
    print(
        f"  same list through the kubernetes client   {list_client * 1e3:8.1f} ms  "
        f"= {list_client / list_raw:6.1f} x raw"
    )
    median = statistics.median(latencies)
    print(
        f"  patch -> watch event (median of 200)      {median * 1e3:8.3f} ms  "
        f"= {median / round_trip:6.1f} x round trip"
    )
    print(f"  restart with {objects} objects in the data file {restart * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
