"""Every failure reaches the runtime as the spec's error object on stdout with a non-zero exit, and
the code says what went wrong. Driven through the exec'd plugin, as a runtime would see it."""

from __future__ import annotations

import json

import pytest
from test_cni_support import CniNode, make_node

from cni import attachment, plugin

# every case below fails before IPAM; should one not, it fails on this directory instead of writing
UNREACHABLE_DATA_DIR = "/nonexistent/netagent-test-ipam"
GOOD = {
    "cniVersion": "1.1.0",
    "name": "testnet",
    "type": "netagent",
    "ipam": {"subnet": "10.76.0.0/24", "dataDir": UNREACHABLE_DATA_DIR},
}


@pytest.fixture
def exec_node(make_netns, tmp_path) -> CniNode:
    return make_node(make_netns, tmp_path)


def assert_cni_error(outcome, code: int) -> dict:
    assert outcome.code != 0
    assert b"Traceback" not in outcome.stdout
    error = json.loads(outcome.stdout)
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert error["code"] == code, error
    assert error["msg"]
    return error


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"CNI_COMMAND": ""}, 4),
        ({"CNI_COMMAND": "FROB"}, 4),
        ({"CNI_CONTAINERID": ""}, 4),
        ({"CNI_CONTAINERID": "bad/id"}, 4),
        ({"CNI_IFNAME": "a-name-longer-than-15"}, 4),
        ({"CNI_IFNAME": "eth/0"}, 4),
        ({"CNI_NETNS": ""}, 4),
        ({"CNI_NETNS": "/run/netns/this-netns-does-not-exist"}, 3),
        ({"CNI_NETNS": "/etc/hostname"}, 3),
    ],
    ids=[
        "missing-command",
        "unknown-command",
        "missing-container-id",
        "invalid-container-id",
        "ifname-too-long",
        "ifname-with-slash",
        "missing-netns",
        "netns-does-not-exist",
        "netns-not-a-namespace",
    ],
)
def test_bad_cni_environment_is_reported_with_its_code(exec_node, make_netns, env, code):
    outcome = exec_node.call("ADD", GOOD, "ctr-a", make_netns("a"), env=env)
    assert_cni_error(outcome, code)
    assert exec_node.links() == ["lo"]


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"{not json", 6),
        (b"[1, 2]", 6),
        (b"\xff\xfe", 6),
        (json.dumps({**GOOD, "cniVersion": "0.4.0"}).encode(), 1),
        (json.dumps({**GOOD, "cniVersion": None}).encode(), 1),
        (json.dumps({**GOOD, "type": "bridge"}).encode(), 7),
        (json.dumps({**GOOD, "name": "../escape"}).encode(), 7),
        (json.dumps({**GOOD, "mtu": "big"}).encode(), 7),
        (json.dumps({**GOOD, "ipam": {"subnet": "10.76.0.0/33"}}).encode(), 7),
        (json.dumps({**GOOD, "ipam": {"subnets": ["10.1.0.0/24", "10.2.0.0/24"]}}).encode(), 7),
        (json.dumps({**GOOD, "ipam": {"subnet": "10.76.0.0/24", "rangeStart": "10.9.0.1"}}).encode(), 7),
        (json.dumps({**GOOD, "ipam": {"type": "host-local", "subnet": "10.76.0.0/24"}}).encode(), 2),
    ],
    ids=[
        "undecodable",
        "not-an-object",
        "not-utf8",
        "unsupported-version",
        "missing-version",
        "wrong-type",
        "path-in-name",
        "mtu-not-int",
        "bad-subnet",
        "two-ipv4-subnets",
        "range-outside-subnet",
        "foreign-ipam",
    ],
)
def test_bad_network_config_is_reported_with_its_code(exec_node, make_netns, stdin, code):
    assert_cni_error(exec_node.call("ADD", stdin, "ctr-a", make_netns("a")), code)


def test_unsupported_version_error_names_the_supported_ones(exec_node, make_netns):
    error = assert_cni_error(exec_node.call("ADD", {**GOOD, "cniVersion": "0.3.1"}, "c", make_netns("a")), 1)
    assert "1.0.0" in error["details"] and "1.1.0" in error["details"]


def test_gc_and_status_need_cni_version_1_1(exec_node):
    for command in ("GC", "STATUS"):
        assert_cni_error(exec_node.call(command, {**GOOD, "cniVersion": "1.0.0"}), 1)


def test_gc_without_valid_attachments_refuses_rather_than_deleting_everything(exec_node):
    assert_cni_error(exec_node.call("GC", GOOD), 7)


def test_unwritable_ipam_dir_is_an_io_failure(exec_node, make_netns, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    conf = {**GOOD, "ipam": {"subnet": "10.76.0.0/24", "dataDir": str(blocker)}}
    assert_cni_error(exec_node.call("ADD", conf, "ctr-a", make_netns("a")), 5)


def test_version_lists_the_supported_versions(exec_node):
    outcome = exec_node.call("VERSION", {"cniVersion": "1.0.0"})
    assert outcome.code == 0
    assert outcome.result == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]}


def test_an_unexpected_exception_becomes_an_error_object_not_a_traceback(monkeypatch):
    def explode(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(attachment, "delete", explode)
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    code, stdout = plugin.handle(env, json.dumps(GOOD).encode())

    assert code != 0
    error = json.loads(stdout)
    assert error["code"] == 999 and "boom" in error["msg"]
    assert "Traceback" not in stdout.decode()
