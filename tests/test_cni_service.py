"""The fast path: the compiled shim hands requests to a CniService over a root-only unix socket,
and runs the Python plugin itself whenever the agent provably does not run the request: no agent,
an agent that never greets, a busy one. No call ever blocks the runtime for ever, and none runs
twice."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from test_cni_support import (
    CniNode,
    Outcome,
    compile_shim,
    make_node,
    ping,
    running_service,
    wait_for,
)

from cni import ipam
from netagent.cni_service import (
    DECLINED,
    MAGIC,
    MAX_CONNECTIONS,
    MAX_ENV,
    MAX_STDIN,
    encode_request,
    read_request,
)
from nodekit import netns

V4 = "10.72.0.0/24"
PROMPTLY = 30.0  # seconds: a call that takes longer is taken as hanging


def test_shim_without_an_agent_falls_back_to_the_python_plugin(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    node.plugin = [compile_shim(str(tmp_path), str(tmp_path / "nobody-listens.sock"))]
    pod = make_netns("a")

    result = node.add(node.conf([V4]), "ctr-a", pod)

    assert ping(pod, result["ips"][0]["gateway"])
    assert node.call("DEL", node.conf([V4]), "ctr-a", pod).code == 0
    assert node.allocations() == {}


def test_shim_passes_the_agents_error_object_and_exit_code_through(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "state" / "cni.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]

    with running_service(node.name, socket_path):
        outcome = node.call("ADD", b"{broken", "ctr-a", make_netns("a"))

    assert outcome.code == 1
    assert outcome.result["code"] == 6


def test_socket_is_root_only_a_dead_agent_means_fallback_and_a_restart_replaces_the_socket(
    make_netns, tmp_path
):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "state" / "cni.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]

    with running_service(node.name, socket_path) as first:
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700
        first.process.send_signal(signal.SIGKILL)  # crash: the socket file stays behind
        first.process.wait(timeout=30)
    assert os.path.exists(socket_path)
    refused = node.call("VERSION", {"cniVersion": "1.1.0"})  # connect() refused: the Python plugin answers
    assert refused.code == 0 and refused.result["cniVersion"] == "1.1.0"

    with running_service(node.name, socket_path):
        outcome = node.call("VERSION", {"cniVersion": "1.1.0"})
    assert outcome.code == 0 and outcome.result["supportedVersions"] == ["1.0.0", "1.1.0"]


def test_service_drops_garbage_and_half_requests_and_keeps_serving(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "state" / "cni.sock")

    with running_service(node.name, socket_path):
        for junk in (b"GET / HTTP/1.0\r\n\r\n", encode_request({"CNI_COMMAND": "VERSION"}, b"{}")[:9]):
            assert exchange(socket_path, junk) == b""  # closed without an answer

        reply = exchange(socket_path, encode_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}'))
    assert reply[:4] == b"\0\0\0\0"
    assert b'"supportedVersions"' in reply


def exchange(socket_path: str, payload: bytes) -> bytes:
    """Send `payload` after the service's greeting; whatever comes back until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(PROMPTLY)
        client.connect(socket_path)
        greeting = client.recv(8, socket.MSG_WAITALL)
        assert greeting[:4] == MAGIC and len(greeting) == 8
        with contextlib.suppress(BrokenPipeError):  # the service may answer before reading it all
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # it closed with our bytes unread
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)




# ---------------------------------------------------------------- who runs a request, and deadlines


@contextlib.contextmanager
def fake_agent(socket_path: str, behaviour: str) -> Iterator[None]:
    """A listener on the shim's socket that serves one connection the way `behaviour` says."""
    release = threading.Event()

    def serve(listener: socket.socket) -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            if behaviour == "closes-before-greeting":
                return
            deadline_ms = 500 if behaviour == "takes-and-hangs" else 5000
            conn.sendall(MAGIC + struct.pack(">I", deadline_ms))
            read_request(conn)
            if behaviour == "declines":
                conn.sendall(struct.pack(">I", DECLINED))
            elif behaviour == "takes-and-hangs":
                release.wait(PROMPTLY)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(socket_path)
        listener.listen(1)
        if behaviour != "never-accepts":
            threading.Thread(target=serve, args=(listener,), daemon=True).start()
        try:
            yield
        finally:
            release.set()


@pytest.mark.parametrize("agent", ["closes-before-greeting", "never-accepts", "declines"])
def test_an_agent_that_does_not_take_the_request_leaves_it_to_the_shims_own_plugin(
    make_netns, tmp_path, agent
):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "agent.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]
    pod = make_netns("a")

    with fake_agent(socket_path, agent):
        outcome = node.call("ADD", node.conf([V4]), "ctr-a", pod, timeout=PROMPTLY)

    assert outcome.code == 0, outcome
    assert ping(pod, outcome.result["ips"][0]["gateway"])


@pytest.mark.parametrize("agent", ["takes-and-dies", "takes-and-hangs"])
def test_an_agent_that_took_the_request_but_gives_no_answer_fails_the_call_and_it_is_not_run_again(
    make_netns, tmp_path, agent
):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "agent.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]

    with fake_agent(socket_path, agent):
        outcome = node.call("ADD", node.conf([V4]), "ctr-a", make_netns("a"), timeout=PROMPTLY)

    assert outcome.code == 1
    assert outcome.result["code"] == 11  # the agent may be running it: try again later, not a second run
    assert node.allocations() == {} and node.links() == ["lo"]


def shim_node(make_netns, tmp_path) -> tuple[CniNode, str]:
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "state" / "cni.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]
    return node, socket_path


@contextlib.contextmanager
def sixteen_stuck_adds(node: CniNode, make_netns) -> Iterator[list[Future[Outcome]]]:
    """Sixteen ADDs through the shim, each stuck for real on the network's IPAM lock (an flock held
    here until the block ends): every kernel worker of the service is taken."""
    pods = [make_netns(f"p{i}") for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool, ipam.AllocationStore(node.data_dir, "testnet").locked():
        yield [
            pool.submit(node.call, "ADD", node.conf([V4]), f"ctr-{i}", pods[i], timeout=3 * PROMPTLY)
            for i in range(16)
        ]


def test_while_every_kernel_worker_is_stuck_version_answers_and_a_new_call_goes_to_the_shims_plugin(
    make_netns, tmp_path
):
    node, socket_path = shim_node(make_netns, tmp_path)

    with running_service(node.name, socket_path, queue_wait=0.5) as service:
        with sixteen_stuck_adds(node, make_netns) as adds:
            assert wait_for(lambda: 'netagent_cni_workers_busy{pool="kernel"} 16.0' in service.metrics())
            version = node.call("VERSION", {"cniVersion": "1.1.0"}, timeout=PROMPTLY)
            # a CHECK without prevResult fails before touching anything: answered by the shim's own
            # plugin, since no worker of the agent can take it
            check = node.call("CHECK", node.conf([V4]), "ctr-x", make_netns("x"), timeout=PROMPTLY)
        added = [add.result() for add in adds]  # once the lock is free, the stuck calls complete

    assert version.code == 0 and version.result["cniVersion"] == "1.1.0"
    assert check.code == 1 and check.result["code"] == 7
    assert [a.code for a in added] == [0] * 16
    assert len(node.allocations()) == 16


def test_calls_stuck_past_their_deadline_are_answered_timed_out_and_fail_healthz_until_they_return(
    make_netns, tmp_path
):
    node, socket_path = shim_node(make_netns, tmp_path)

    with running_service(node.name, socket_path, call_deadline=2.0) as service:
        assert service.healthz()[0] == 200
        with sixteen_stuck_adds(node, make_netns) as adds:
            timed_out = [add.result() for add in adds]  # the lock is still held
            status, body = service.healthz()
            metrics = service.metrics()
        assert wait_for(lambda: service.healthz()[0] == 200)  # the calls returned: no worker is lost
        # the runtime was told they failed, and DELs what a timed-out ADD may have done
        deleted = [node.call("DEL", node.conf([V4]), f"ctr-{i}", timeout=PROMPTLY) for i in range(16)]

    assert [json.loads(t.stdout)["code"] for t in timed_out] == [103] * 16
    assert "may still complete" in json.loads(timed_out[0].stdout)["details"]
    assert status == 503 and body["cniCallsOverdue"] == 16
    assert "netagent_cni_calls_overdue 16.0" in metrics
    assert [d.code for d in deleted] == [0] * 16
    assert node.allocations() == {} and node.links() == ["lo", "na0"]


def test_a_flood_of_stalled_clients_cannot_keep_a_call_from_being_served(make_netns, tmp_path):
    node, socket_path = shim_node(make_netns, tmp_path)
    pod = make_netns("a")

    with running_service(node.name, socket_path), contextlib.ExitStack() as stalled:
        for _ in range(MAX_CONNECTIONS + 8):  # connect and never send a request
            client = stalled.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            with netns.entered(netns.path(node.name)):
                client.connect(socket_path)
        outcome = node.call("ADD", node.conf([V4]), "ctr-a", pod, timeout=PROMPTLY)

    assert outcome.code == 0, outcome
    assert ping(pod, outcome.result["ips"][0]["gateway"])


# ---------------------------------------------------------------- frames over the agent's limits


@pytest.mark.parametrize(("what", "code"), [("environment", 4), ("network-config", 6)])
def test_a_request_over_the_agents_frame_limit_gets_a_permanent_error_not_try_again(
    make_netns, tmp_path, what, code
):
    node, socket_path = shim_node(make_netns, tmp_path)
    conf, env = node.conf([V4]), {}
    if what == "environment":
        env["CNI_ARGS"] = "K8S_POD_NAME=" + "x" * MAX_ENV
    else:
        conf["padding"] = "x" * MAX_STDIN

    with running_service(node.name, socket_path):
        outcome = node.call("ADD", conf, "ctr-a", make_netns("a"), env=env, timeout=PROMPTLY)
        after = node.call("VERSION", {"cniVersion": "1.1.0"}, timeout=PROMPTLY)

    assert outcome.code == 1
    assert outcome.result["code"] == code
    assert re.search(r"is \d+ bytes, over the \d+ the agent accepts", outcome.result["msg"])
    assert node.allocations() == {}
    assert after.code == 0
