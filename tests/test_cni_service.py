"""The fast path: the compiled shim hands requests to a CniService over a root-only unix socket,
and falls back to exec'ing the Python plugin when no agent answers."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading

from test_cni_support import compile_shim, make_node, ping, running_service

from netagent.cni_service import encode_request

V4 = "10.72.0.0/24"


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
        first.send_signal(signal.SIGKILL)  # crash: the socket file stays behind
        first.wait(timeout=30)
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
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(30)
                client.connect(socket_path)
                client.sendall(junk)
                client.shutdown(socket.SHUT_WR)
                assert answer_or_reset(client) == b""  # closed without an answer

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(socket_path)
            client.sendall(encode_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}'))
            reply = b"".join(iter(lambda: client.recv(4096), b""))
    assert reply[:4] == b"\0\0\0\0"
    assert b'"supportedVersions"' in reply


def answer_or_reset(client: socket.socket) -> bytes:
    try:
        return client.recv(16)
    except ConnectionResetError:  # the service closed with our bytes unread
        return b""


def test_an_agent_that_accepts_but_dies_mid_request_makes_the_shim_ask_to_try_again(make_netns, tmp_path):
    node = make_node(make_netns, tmp_path)
    socket_path = str(tmp_path / "dying.sock")
    node.plugin = [compile_shim(str(tmp_path), socket_path)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(socket_path)
        listener.listen(1)
        hang_up = threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True)
        hang_up.start()
        outcome = node.call("ADD", node.conf([V4]), "ctr-a", make_netns("a"))
        hang_up.join(timeout=30)

    assert outcome.code == 1
    assert outcome.result["code"] == 11  # not a fallback: the agent may have done part of the work
