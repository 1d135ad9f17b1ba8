"""`netagent install-cni` installs a working plugin and conflist; with `netagent run --standalone`
in the node netns, the installed plugin serves pods from the agent's node state via the shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from test_cni_support import CniNode, ping, tcp_reaches, wait_for

from cni.install import install_cni_cmd
from nodekit import netns

NETAGENT = os.path.join(os.path.dirname(sys.executable), "netagent")


def install(tmp_path, *extra: str, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    bin_dir, conf_dir, state_dir = (str(tmp_path / d) for d in ("bin", "conf", "state"))
    args = ["--bin-dir", bin_dir, "--conf-dir", conf_dir, "--state-dir", state_dir]
    args += ["--data-dir", str(tmp_path / "ipam"), *extra]
    outcome = CliRunner().invoke(install_cni_cmd, args, env=env, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    return bin_dir, conf_dir, state_dir


def test_install_writes_the_plugin_and_a_conflist_chaining_portmap(tmp_path):
    bin_dir, conf_dir, state_dir = install(tmp_path, "--cluster-cidr", "10.70.0.0/16", "--mtu", "1450")

    with open(os.path.join(conf_dir, "10-netagent.conflist")) as f:
        conflist = json.load(f)
    assert conflist["cniVersions"] == ["1.0.0", "1.1.0"]
    assert [p["type"] for p in conflist["plugins"]] == ["netagent", "portmap"]
    assert conflist["plugins"][1]["capabilities"] == {"portMappings": True}
    plugin = conflist["plugins"][0]
    assert plugin["nodeStateFile"] == os.path.join(state_dir, "node.json")
    assert (plugin["clusterCIDR"], plugin["mtu"]) == ("10.70.0.0/16", 1450)
    assert [n for n in os.listdir(conf_dir) if n.startswith(".tmp")] == []  # written via rename
    executable = os.path.join(bin_dir, "netagent")
    assert os.access(executable, os.X_OK)
    with open(executable, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the compiled shim


def test_install_without_a_c_compiler_installs_a_python_launcher(tmp_path):
    bin_dir, _, _ = install(tmp_path, env={"CC": "no-such-cc", "PATH": str(tmp_path / "empty")})
    executable = os.path.join(bin_dir, "netagent")

    done = subprocess.run(
        [executable], input=b'{"cniVersion": "1.1.0"}', env={"CNI_COMMAND": "VERSION"}, capture_output=True
    )
    assert done.returncode == 0
    assert json.loads(done.stdout)["supportedVersions"] == ["1.0.0", "1.1.0"]


@contextmanager
def standalone_agent(node: str, state_dir: str, pod_cidr: str):
    argv = [NETAGENT, "run", "--node-name", "n1", "--standalone", "--pod-cidr", pod_cidr]
    argv += ["--state-dir", state_dir, "--network", "none", "--healthz-bind", "", "--metrics-bind", ""]
    agent = subprocess.Popen(netns.exec_argv(node, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: os.path.exists(os.path.join(state_dir, "ready")) or agent.poll() is not None)
        assert agent.poll() is None, agent.stderr.read().decode()
        yield agent
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def test_installed_plugin_with_the_standalone_agent_serves_pods(make_netns, tmp_path):
    bin_dir, conf_dir, state_dir = install(tmp_path)
    with open(os.path.join(conf_dir, "10-netagent.conflist")) as f:
        conflist = json.load(f)
    conf = {"cniVersion": "1.1.0", "name": conflist["name"], **conflist["plugins"][0]}
    node = CniNode(make_netns("node"), str(tmp_path / "ipam"), [os.path.join(bin_dir, "netagent")])
    pod_a, pod_b = make_netns("a"), make_netns("b")

    with standalone_agent(node.name, state_dir, "10.71.5.0/24"):
        result_a = node.add(conf, "ctr-a", pod_a)
        result_b = node.add(conf, "ctr-b", pod_b)
        ip_b = result_b["ips"][0]["address"].split("/")[0]
        assert result_a["ips"][0]["address"] == "10.71.5.2/24"  # from the agent's node state
        assert ping(pod_a, ip_b) and tcp_reaches(pod_a, pod_b, ip_b)
        assert node.call("DEL", conf, "ctr-a", pod_a).code == 0

    # the agent is gone: the same executable now runs the Python fallback, and state is intact
    assert node.call("DEL", conf, "ctr-b", pod_b).code == 0
    assert node.allocations("netagent") == {}


@pytest.mark.parametrize("bad", [["--cluster-cidr", "10.0.0.0/33"], ["--bridge", "a/bridge"]])
def test_install_refuses_bad_options_and_writes_nothing(tmp_path, bad):
    args = ["--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "conf"), *bad]
    outcome = CliRunner().invoke(install_cni_cmd, args)
    assert outcome.exit_code == 2 and "Invalid value" in outcome.output
    assert not (tmp_path / "bin").exists() and not (tmp_path / "conf").exists()
