"""Every failure reaches the runtime as the spec's error object on stdout with a non-zero exit, and
the code says what went wrong. Driven through the exec'd plugin, as a runtime would see it."""

from __future__ import annotations

import json
import os
import threading

import pytest
from test_cni_support import CniNode, Outcome, make_node

from cni import attachment, errors, plugin

# every case below fails before IPAM; should one not, it fails on this directory instead of writing
# (under a file: even root cannot create it)
UNREACHABLE_DATA_DIR = "/dev/null/netagent-test-ipam"
GOOD = {
    "cniVersion": "1.1.0",
    "name": "testnet",
    "type": "netagent",
    "ipam": {"subnet": "10.76.0.0/24", "dataDir": UNREACHABLE_DATA_DIR},
}


@pytest.fixture
def exec_node(make_netns, tmp_path) -> CniNode:
    return make_node(make_netns, tmp_path)


ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


def assert_cni_error(outcome, code: int) -> dict:
    assert outcome.code != 0
    assert b"Traceback" not in outcome.stdout
    error = json.loads(outcome.stdout)
    assert set(error) == ERROR_KEYS
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
        (json.dumps({**GOOD, "name": "n" * 201}).encode(), 7),
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
        "name-too-long-for-a-directory",
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


# --- issue 11: bad input is refused with the spec's code, by the exec'd plugin and by handle() ---

NOWHERE_NETNS = "/nonexistent/netagent-test-netns"  # handle() in this process must never reach the kernel


@pytest.fixture(params=["exec", "handle"])
def call(request, exec_node, make_netns):
    """Invoke one command the two ways a runtime reaches the plugin: the exec'd plugin in a node
    netns, and `plugin.handle` as the agent's CNI service calls it (here with a netns that cannot be
    opened, so a config that wrongly passed would fail with code 3 instead of touching this netns)."""
    pod = make_netns("a")

    def invoke(command: str, stdin: bytes | dict, container_id: str = "ctr-a", ifname: str = "eth0"):
        stdin = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
        if request.param == "exec":
            return exec_node.call(command, stdin, container_id, pod, ifname)
        env = {"CNI_COMMAND": command, "CNI_PATH": "/x", "CNI_NETNS": NOWHERE_NETNS}
        env.update(CNI_CONTAINERID=container_id, CNI_IFNAME=ifname)
        code, stdout = plugin.handle(env, stdin)
        return Outcome(code, stdout, b"")

    return invoke


def nested(depth: int) -> bytes:
    return (
        b'{"cniVersion": "1.1.0", "name": "testnet", "type": "netagent", "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


def with_ipam(**fields) -> dict:
    return {**GOOD, "ipam": {**GOOD["ipam"], **fields}}


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (json.dumps({**GOOD, "bridge": None}).encode(), 7),
        (json.dumps({**GOOD, "ipam": None}).encode(), 7),
        (json.dumps(with_ipam(dataDir=None)).encode(), 7),
        (json.dumps(with_ipam(type=None)).encode(), 7),
        (json.dumps({**GOOD, "hairpinMode": None}).encode(), 7),
        (json.dumps({**GOOD, "bridge": "\ud800"}).encode(), 6),  # json.dumps writes the escape "\ud800"
        (json.dumps({**GOOD, "name": "testnet", "note": {"\udfff": 1}}).encode(), 6),
        (nested(100_000), 6),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 6),
        (b'{"cniVersion": "1.1.0", "mtu": 1' + b"0" * 5000 + b"}", 6),  # beyond Python's int digits
        (json.dumps(with_ipam(subnet=5)).encode(), 7),  # ipaddress would read 5 as 0.0.0.5
        (json.dumps(with_ipam(gateway=167_772_161)).encode(), 7),
        (json.dumps(with_ipam(subnet="fd00::%eth0/64")).encode(), 7),
        (json.dumps({**GOOD, "clusterCIDR": [10]}).encode(), 7),
        (
            json.dumps(
                {**GOOD, "cni.dev/valid-attachments": [{"containerID": 1, "ifname": "eth0"}]}
            ).encode(),
            7,
        ),
    ],
    ids=[
        "bridge-null",
        "ipam-null",
        "data-dir-null",
        "ipam-type-null",
        "hairpin-null",
        "lone-surrogate-value",
        "lone-surrogate-key",
        "100000-deep-array",
        "100000-deep-object",
        "huge-integer",
        "subnet-a-number",
        "gateway-a-number",
        "subnet-with-zone",
        "cluster-cidr-a-number",
        "valid-attachment-id-a-number",
    ],
)
def test_malformed_values_are_a_decoding_or_config_error_not_an_internal_one(call, stdin, code):
    assert_cni_error(call("ADD", stdin), code)


@pytest.mark.parametrize(
    "prev_result",
    [
        {"interfaces": "abc"},
        {"ips": [1]},
        {"interfaces": [{"name": "eth0"}], "ips": [{"interface": 0}]},
        {"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.76.0.2/24", "interface": "0"}]},
        {"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.76.0.2/24", "interface": True}]},
        {"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.76.0.2/24", "interface": 7}]},
        {"ips": [{"address": "not-an-ip"}]},
        {"interfaces": [{"mac": "02:00:00:00:00:01"}]},
        {"routes": [{"gw": "10.76.0.1"}]},
        {"routes": [{"dst": "0.0.0.0/0", "gw": 5}]},
        {"routes": "none"},
    ],
    ids=[
        "interfaces-a-string",
        "ip-a-number",
        "ip-without-address",
        "interface-index-a-string",
        "interface-index-a-boolean",
        "interface-index-out-of-range",
        "address-not-an-ip",
        "interface-without-name",
        "route-without-dst",
        "route-gateway-a-number",
        "routes-a-string",
    ],
)
def test_check_with_a_malformed_prev_result_is_an_invalid_config(call, prev_result):
    assert_cni_error(call("CHECK", {**GOOD, "prevResult": prev_result}), 7)


@pytest.mark.parametrize(
    "container_id",
    ["ctr-a\n", "ctr-a\r\n", "-ctr", ".ctr", "_ctr", "ctr a", "ctr/a", "ctr:a", "ctré"],
    ids=[
        "newline",
        "crlf",
        "leading-hyphen",
        "leading-dot",
        "leading-underscore",
        "space",
        "slash",
        "colon",
        "non-ascii",
    ],
)
def test_container_ids_outside_the_spec_character_set_are_refused(call, container_id):
    for command in ("ADD", "DEL", "CHECK"):
        assert_cni_error(call(command, {**GOOD, "prevResult": {}}, container_id=container_id), 4)


@pytest.mark.parametrize(
    "ifname",
    ["eth0\n", "\teth0", ".", "..", "eth:0", "é" * 8, "a" * 16, "eth%d"],
    ids=["newline", "tab", "dot", "dot-dot", "colon", "16-utf8-bytes", "16-chars", "kernel-pattern"],
)
def test_interface_names_the_kernel_would_refuse_are_refused(call, ifname):
    assert_cni_error(call("ADD", GOOD, ifname=ifname), 4)


def test_an_interface_name_of_fifteen_bytes_is_accepted(call):
    outcome = call("ADD", GOOD, ifname="é" * 7 + "x")  # 15 bytes: fails later, at the netns or the IPAM
    assert json.loads(outcome.stdout)["code"] != 4


def test_a_network_name_with_a_trailing_newline_is_refused(call):
    assert_cni_error(call("ADD", {**GOOD, "name": "testnet\n"}), 7)


def test_container_id_with_a_trailing_newline_allocates_nothing(exec_node, make_netns):
    """Before: ADD succeeded, and DEL/GC (given the id without its newline) never found the owner."""
    pod = make_netns("a")
    outcome = exec_node.call("ADD", exec_node.conf(["10.76.0.0/24"]), "ctr-a\n", pod)

    assert_cni_error(outcome, 4)
    assert exec_node.allocations() == {}
    assert exec_node.links() == ["lo"]


def test_a_node_state_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "node.json")
    os.mkfifo(fifo)
    conf = {**GOOD, "ipam": {"dataDir": UNREACHABLE_DATA_DIR}, "nodeStateFile": fifo}  # no subnet: read it
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    env["CNI_NETNS"] = NOWHERE_NETNS
    outcomes = []
    caller = threading.Thread(target=lambda: outcomes.append(plugin.handle(env, json.dumps(conf).encode())))
    caller.start()
    caller.join(timeout=10)
    if caller.is_alive():  # blocked in open(): a writer that closes at once lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        caller.join()
        pytest.fail("reading the node state blocked on a FIFO")
    code, stdout = outcomes[0]
    assert_cni_error(Outcome(code, stdout, b""), 7)


@pytest.mark.parametrize(
    "data_dir", ["", "ipam", "./ipam", "ipam/../x"], ids=["empty", "bare", "dot", "dotdot"]
)
def test_a_relative_data_dir_is_refused_and_nothing_is_written_in_the_working_directory(
    exec_node, make_netns, tmp_path, monkeypatch, data_dir
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the exec'd plugin inherits it
    outcome = exec_node.call(
        "ADD", exec_node.conf(["10.76.0.0/24"], ipam={"dataDir": data_dir}), "ctr-a", make_netns("a")
    )

    assert_cni_error(outcome, 7)
    assert list(cwd.iterdir()) == []
    assert exec_node.links() == ["lo"]


@pytest.mark.parametrize(
    "subnet",
    [
        "0.0.0.0/0",
        "::/0",
        "0.0.0.0/1",
        "128.0.0.0/1",
        "127.0.0.0/24",
        "224.0.0.0/24",
        "169.254.0.0/24",
        "fe80::/64",
        "10.0.0.0/31",
        "fd00::/127",
    ],
)
def test_subnets_that_cannot_hold_pods_are_refused_before_anything_is_made(exec_node, make_netns, subnet):
    outcome = exec_node.call("ADD", exec_node.conf([subnet]), "ctr-a", make_netns("a"))

    assert_cni_error(outcome, 7)
    assert exec_node.links() == ["lo"]
    assert exec_node.allocations() == {}


def test_a_range_holding_only_the_gateway_is_refused(exec_node, make_netns):
    ipam = {"subnet": "10.76.0.0/24", "rangeStart": "10.76.0.1", "rangeEnd": "10.76.0.1"}
    assert_cni_error(exec_node.call("ADD", exec_node.conf(ipam=ipam), "ctr-a", make_netns("a")), 7)


@pytest.mark.parametrize("command", ["DEL", "STATUS", "GC", "CHECK"])
def test_calls_about_a_network_never_added_create_nothing(exec_node, make_netns, command):
    """Only ADD writes a network's IPAM store: DEL, STATUS and GC of a network without one succeed and
    CHECK reports the missing attachment, all without leaving a directory or lock file behind."""
    conf = exec_node.conf(["10.76.0.0/24"])
    conf["cni.dev/valid-attachments"] = []
    conf["prevResult"] = {"cniVersion": conf["cniVersion"], "interfaces": [{"name": "eth0"}],
                          "ips": [{"address": "10.76.0.5/24", "interface": 0}]}
    container = "" if command in ("STATUS", "GC") else "ctr-a"
    outcome = exec_node.call(command, conf, container, make_netns("a"))

    if command == "CHECK":
        assert_cni_error(outcome, errors.CHECK_FAILED)
    else:
        assert outcome.code == 0, outcome
    assert not os.path.exists(exec_node.data_dir)


def test_an_ipam_store_that_cannot_be_read_is_an_io_failure_not_an_internal_error(exec_node):
    conf = exec_node.conf(["10.76.0.0/24"], ipam={"dataDir": "/tmp/" + "d" * 300})  # ENAMETOOLONG
    outcome = exec_node.call("GC", {**conf, "cni.dev/valid-attachments": []})
    assert_cni_error(outcome, errors.IO_FAILURE)
