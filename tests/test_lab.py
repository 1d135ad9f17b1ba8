"""The netns lab, end to end: `netagent lab ...` as a user runs it, with real agents, the real CNI
plugin and real packets between pod namespaces. Every lab is named after the test's unique prefix and
is torn down even when the test fails; "zero residue" is checked by looking, not assumed."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml
from netns_lab import cluster, probe, processes
from netns_lab.pods import parse_labels
from netns_lab.processes import ProcRef
from netns_lab.responder import DEFAULT_PORT
from netns_lab.state import Lab, LabError, LabState, NodeInfo, PodInfo, check_pod_name
from netns_lab.supervisor import RESET_AFTER, Backoff, read_status

from nodekit import netns

NETAGENT = [sys.executable, "-m", "netagent.cli"]


def lab_cmd(name: str, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `netagent lab SUBCOMMAND --name NAME ARGS...` and return what it printed."""
    proc = subprocess.run([*NETAGENT, "lab", args[0], "--name", name, *args[1:]],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def lab_name(prefix: str) -> Iterator[str]:
    """A lab name unique to this test; the lab is removed afterwards whatever happened."""
    yield prefix
    cluster.down(prefix, progress=lambda _msg: None)


def residue(name: str) -> list[str]:
    """Everything of lab `name` still on the machine: namespaces, processes, files."""
    lab = Lab(name)
    left = [f"netns {n}" for n in netns.names(f"{name}-")]
    left += [f"process {p.pid}: {' '.join(processes.cmdline(p.pid))}"
             for p in processes.find(lambda pid: any(lab.dir in arg for arg in processes.cmdline(pid)))]
    if os.path.exists(lab.dir):
        left.append(f"directory {lab.dir}")
    return left


@pytest.mark.parametrize("network", ["vxlan", "routes"])
def test_pods_reach_each_other_across_nodes_by_tcp_and_udp_and_down_leaves_nothing(lab_name, network):
    lab_cmd(lab_name, "up", "--nodes", "2", "--network", network)
    lab_cmd(lab_name, "pod", "a1", "--node", "n1", "--labels", "app=t")
    lab_cmd(lab_name, "pod", "a2", "--node", "n1")
    lab_cmd(lab_name, "pod", "b1", "--node", "n2")
    state = Lab(lab_name).load()
    a1, b1 = state.pods["a1"], state.pods["b1"]

    assert probe.tcp_name(a1.netns, b1.ips[0], DEFAULT_PORT) == "b1"
    assert probe.udp_name(a1.netns, b1.ips[0], DEFAULT_PORT) == "b1"
    assert probe.tcp_name(b1.netns, a1.ips[0], DEFAULT_PORT) == "a1"
    assert probe.udp_name(b1.netns, a1.ips[0], DEFAULT_PORT) == "a1"

    matrix = lab_cmd(lab_name, "check").stdout
    assert "pod->pod across nodes" in matrix and "PASS" in matrix.splitlines()[-1]

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def test_pods_reach_services_through_their_cluster_ip_with_the_iptables_proxy(lab_name: str, tmp_path):
    lab_cmd(lab_name, "up", "--nodes", "2", "--network", "routes", "--proxy", "iptables")
    lab_cmd(lab_name, "pod", "web-1", "--node", "n1", "--labels", "app=web")
    lab_cmd(lab_name, "pod", "web-2", "--node", "n2", "--labels", "app=web")
    lab_cmd(lab_name, "apply", os.path.join(os.path.dirname(cluster.__file__), "manifests", "demo.yaml"))

    deadline = time.monotonic() + 60  # endpoints published and rules programmed take a moment
    while (result := lab_cmd(lab_name, "check", check=False)).returncode != 0:
        assert time.monotonic() < deadline, f"lab check never passed:\n{result.stdout}"
        time.sleep(1)
    assert "svc/web:80/tcp" in result.stdout and "svc/web:8080/udp" in result.stdout
    assert "pod->service" in result.stdout

    # A Service without selector, its endpoints given by an applied EndpointSlice (JSON this time).
    web_2_ip = Lab(lab_name).load().pods["web-2"].ips[0]
    manual = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"},
         "spec": {"ports": [{"port": 90, "targetPort": 8080, "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "manual-1", "labels": {"kubernetes.io/service-name": "manual"}},
         "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": [web_2_ip], "conditions": {"ready": True}}]},
    ]
    manifest = tmp_path / "manual.json"
    manifest.write_text("\n---\n".join(json.dumps(doc) for doc in manual))
    lab_cmd(lab_name, "apply", str(manifest))
    deadline = time.monotonic() + 60
    while "svc/manual:90/tcp answered by 1 of 1 backends: web-2" not in (
            result := lab_cmd(lab_name, "check", check=False)).stdout or result.returncode != 0:
        assert time.monotonic() < deadline, f"the manual service never answered:\n{result.stdout}"
        time.sleep(1)


def test_rm_releases_the_pod_and_its_address(lab_name: str):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    first_ip = lab_cmd(lab_name, "pod", "p1", "--node", "n1").stdout.split()[3]
    lab_cmd(lab_name, "rm", "p1")

    assert not netns.exists(f"{lab_name}-p-p1")
    assert "p1" not in Lab(lab_name).load().pods
    ipam_dir = Lab(lab_name).load().nodes["n1"].ipam_dir
    assert not [name for _, _, files in os.walk(ipam_dir) for name in files if first_ip in name]


def test_lab_exec_runs_the_command_in_the_pod_namespace(lab_name: str):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    lab_cmd(lab_name, "pod", "p1", "--node", "n1")
    pod_ip = Lab(lab_name).load().pods["p1"].ips[0]

    addresses = lab_cmd(lab_name, "exec", "p1", "--", "ip", "-br", "-4", "addr", "show", "eth0").stdout
    assert pod_ip in addresses


def test_lab_status_piped_into_a_reader_that_stops_early_says_nothing_on_stderr(lab_name: str):
    """`lab status | head -1` is what operators type: the reader leaving is not an error to report."""
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    lab_cmd(lab_name, "pod", "p1", "--node", "n1")
    status = subprocess.Popen([*NETAGENT, "lab", "status", "--name", lab_name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert status.stdout is not None and status.stdout.read(10)
    status.stdout.close()  # the reader leaves before the command has written everything
    _, stderr = status.communicate(timeout=60)
    assert stderr == b""


def test_down_after_an_up_killed_half_way_leaves_nothing(lab_name: str):
    lab = Lab(lab_name)
    up = subprocess.Popen([*NETAGENT, "lab", "up", "--name", lab_name, "--nodes", "3"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # Kill it once every agent was started, while they are still coming up.
    while not os.path.exists(os.path.join(lab.node_dir("n3"), "agent.log")):
        assert up.poll() is None, "lab up ended before it could be killed"
        assert time.monotonic() < deadline, "lab up made no progress"
        time.sleep(0.05)
    up.send_signal(signal.SIGKILL)
    up.wait()
    assert residue(lab_name) != []  # something to clean up
    os.unlink(lab.state_path)  # as if killed before its record was written: down must find it all anyway

    lab_cmd(lab_name, "down")
    assert residue(lab_name) == []


def test_an_up_that_times_out_says_why_and_leaves_nothing(lab_name: str):
    result = lab_cmd(lab_name, "up", "--nodes", "2", "--timeout", "0.5", check=False)

    assert result.returncode == 1
    assert "not ready within" in result.stderr and "Traceback" not in result.stderr
    assert residue(lab_name) == []


def test_a_second_up_of_the_same_lab_is_refused_and_harms_nothing(lab_name: str):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    again = lab_cmd(lab_name, "up", "--nodes", "1", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert Lab(lab_name).load().phase == "ready"


def test_commands_on_a_missing_lab_or_pod_fail_with_one_clear_line(lab_name: str):
    for args in (["status"], ["check"], ["kubeconfig"], ["rm", "nopod"], ["exec", "nopod", "--", "true"]):
        result = lab_cmd(lab_name, *args, check=False)
        assert result.returncode == 1
        assert f"no lab named {lab_name!r}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["", "Upper", "with-dash", "a" * 13, "9lives", "demo\n"])
def test_lab_names_that_could_collide_or_overflow_are_rejected(name: str):
    with pytest.raises(LabError):
        Lab(name)


@pytest.mark.parametrize("name", ["", "Web", "web_1", "web\n", "-web", "a" * 41])
def test_pod_names_outside_a_dns_label_are_rejected(name: str):
    with pytest.raises(LabError):
        check_pod_name(name)


def test_a_lab_owns_only_its_own_namespaces():
    lab = Lab("demo")
    assert all(lab.owns_netns(n) for n in ("demo-ul", "demo-n1", "demo-n12", "demo-p-web-1"))
    assert not any(lab.owns_netns(n) for n in ("demo2-ul", "demox-n1", "demo-other", "demo-nx", "ddemo-ul",
                                                "demo-n1\n"))


def test_lab_state_reads_back_exactly_what_was_written():
    state = LabState("demo", "vxlan", "iptables", phase="ready", apiserver=ProcRef(10, 99),
                     nodes={"n1": NodeInfo("n1", "demo-n1", "172.18.0.11", "10.244.1.0/24", "/x/n1",
                                           supervisor=ProcRef(11, 100))},
                     pods={"a": PodInfo("a", "n1", "demo-p-a", "c0ffee", ["10.244.1.2"], {"app": "web"},
                                        {"cniVersion": "1.0.0"}, server=ProcRef(12, 101))})
    assert LabState.from_json(state.to_json()) == state


def test_pod_labels_are_parsed_from_k_v_lists_and_malformed_ones_rejected():
    assert parse_labels("app=web, tier=front,") == {"app": "web", "tier": "front"}
    for bad in ("app", "=web", "app=web,oops"):
        with pytest.raises(LabError):
            parse_labels(bad)


def agent_row(name: str) -> dict[str, str]:
    """n1's row of `lab status`: AGENT, RESTARTS and HEALTHZ as printed."""
    header, row = lab_cmd(name, "status").stdout.splitlines()[1:3]
    titles = ("AGENT", "RESTARTS", "HEALTHZ")
    columns = [header.index(title) for title in titles] + [len(row)]
    spans = zip(titles, columns, columns[1:], strict=False)
    return {title: row[start:end].strip() for title, start, end in spans}


def running_agent(node: NodeInfo) -> int:
    """The pid of the node's agent process now (from its supervisor's status file)."""
    with open(node.agent_status) as f:
        return json.load(f)["pid"]


def wait_until(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)
    return result


def test_an_agent_killed_with_sigkill_comes_back_as_a_daemonset_pod_would_and_status_says_so(lab_name):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    n1 = Lab(lab_name).load().nodes["n1"]
    first = running_agent(n1)

    os.kill(first, signal.SIGKILL)
    row = wait_until(lambda: (r := agent_row(lab_name))["AGENT"] == "ready" and r, "the agent ready again")
    assert row["RESTARTS"] == "1 (killed by SIGKILL)" and row["HEALTHZ"] == "200 OK"
    second = running_agent(n1)
    assert second != first

    os.kill(second, signal.SIGKILL)  # dying again: the kubelet's back-off (10 s) before the next start
    row = wait_until(lambda: (r := agent_row(lab_name))["AGENT"] == "restarting" and r, "a back-off shown")
    assert row["RESTARTS"].startswith("2 (killed by SIGKILL; starts again in ")
    wait_until(lambda: agent_row(lab_name)["AGENT"] == "ready", "the agent ready after its back-off", 60)

    supervisor = Lab(lab_name).load().nodes["n1"].supervisor
    os.kill(supervisor.pid, signal.SIGKILL)  # as a node whose kubelet died: the agent runs on, unguarded
    wait_until(lambda: not supervisor.alive(), "the supervisor gone")
    row = agent_row(lab_name)
    assert row["AGENT"] == "ready" and "no supervisor: not restarted if it dies" in row["RESTARTS"]

    lab_cmd(lab_name, "down")  # supervisors first, so none starts an agent while they are stopped
    assert residue(lab_name) == []


def test_restart_agent_returns_once_the_new_agent_is_ready_not_on_a_dead_ones_marker(lab_name):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    n1 = Lab(lab_name).load().nodes["n1"]
    os.kill(running_agent(n1), signal.SIGKILL)  # dies without removing its ready marker

    cluster.restart_agent(lab_name, "n1")

    agent = running_agent(n1)
    with open(n1.ready_marker) as f:
        assert f.read().strip() == str(agent)  # the marker is the new agent's
    assert probe.http_get(n1.netns, n1.ip, cluster.HEALTHZ_PORT, "/healthz", timeout=5) == "200 OK"
    assert agent_row(lab_name)["RESTARTS"] == "0"  # a new pod, as a rollout makes


def test_lab_state_is_readable_by_root_only_and_its_api_refuses_anonymous_clients(lab_name):
    lab_cmd(lab_name, "up", "--nodes", "1", "--network", "routes")
    lab_cmd(lab_name, "pod", "p1", "--node", "n1")
    lab = Lab(lab_name)
    state = lab.load()

    n1 = state.nodes["n1"]
    for directory in (lab.dir, n1.dir, n1.state_dir, os.path.join(lab.dir, "pods")):
        assert os.stat(directory).st_mode & 0o777 == 0o700, directory
    for directory in (lab.dir, n1.dir, os.path.join(lab.dir, "pods")):
        for entry in os.scandir(directory):
            if entry.is_file():
                assert entry.stat().st_mode & 0o777 == 0o600, entry.path

    host, port = state.api_url.removeprefix("https://").rsplit(":", 1)
    with open(lab.kubeconfig) as f:
        cluster_entry = yaml.safe_load(f)["clusters"][0]["cluster"]
    ca = base64.b64decode(cluster_entry["certificate-authority-data"]).decode()
    connection = http.client.HTTPSConnection(host, int(port), timeout=10,
                                             context=ssl.create_default_context(cadata=ca))
    connection.request("GET", "/api/v1/namespaces/default/pods")
    response = connection.getresponse()
    assert response.status == 401 and json.loads(response.read())["reason"] == "Unauthorized"
    assert "p1" in lab_cmd(lab_name, "status").stdout  # the lab's own commands get in


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def test_restart_back_off_is_the_kubelets_immediate_then_doubling_from_10s_to_5min_reset_by_a_long_run():
    backoff = Backoff()
    assert [backoff.after_run(1.0) for _ in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]
    assert [backoff.after_run(RESET_AFTER), backoff.after_run(1.0)] == [0, 10]


def test_a_stopped_supervisor_stops_its_agent_and_no_ready_marker_outlives_it(tmp_path):
    marker, status_file, log = (str(tmp_path / name) for name in ("ready", "status.json", "agent.log"))
    with open(marker, "w") as f:
        f.write("1\n")  # stale: an agent before this one died without removing it
    agent = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
             f"open({marker!r}, 'w').write(f'{{os.getpid()}}\\n')\n"
             "time.sleep(600)\n")
    supervisor = subprocess.Popen([sys.executable, "-m", "netns_lab.supervisor", "--status", status_file,
                                   "--ready-marker", marker, "--log", log, "--", sys.executable, "-c", agent])
    try:
        status = wait_until(lambda: (s := read_status(status_file)) and s.state == "running" and s, "a start")
        wait_until(lambda: read_text(marker) == f"{status.pid}\n", "the new agent's marker")
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(15) == 0
    finally:
        supervisor.kill()
    final = read_status(status_file)
    assert (final.state, final.restarts, final.last_exit, final.pid) == ("stopped", 0, "exit code 0", None)
    assert not os.path.exists(marker) and not ProcRef(status.pid, status.start_time).alive()
    assert os.stat(status_file).st_mode & 0o777 == 0o600


OF_WEB = {"kubernetes.io/service-name": "web"}
MALFORMED_FOR_THE_CLIENTS_MODELS = [
    ("endpointslices", {"metadata": {"name": "no-address-type", "labels": OF_WEB},
                        "endpoints": [{"addresses": ["10.244.1.9"]}]}),
    ("endpointslices", {"metadata": {"name": "numbers", "labels": OF_WEB},
                        "addressType": "IPv4", "endpoints": [{"addresses": [5]}]}),
    ("endpointslices", {"metadata": {"name": "yes", "labels": OF_WEB},
                        "addressType": "IPv4",
                        "endpoints": [{"addresses": ["10.244.1.8"], "conditions": {"ready": "yes"}}]}),
    ("services", {"metadata": {"name": "odd"},
                  "spec": {"clusterIP": "10.96.0.50", "ports": [{"port": "80"}]}}),
    ("services", {"metadata": {"name": "odder"}, "spec": "x"}),
]


def test_lab_status_shows_every_service_it_can_read_and_names_the_malformed_ones(api_server, core):
    """One object the client's typed models refuse (issue 11 item 1) no longer fails the whole listing
    behind `lab status`, `lab check` and the demo."""
    from netns_lab import kube

    core.create_namespaced_service("default", {
        "metadata": {"name": "web"}, "spec": {"clusterIP": "10.96.0.40", "ports": [{"port": 80}]}})
    api_server.store.create("endpointslices", {
        "metadata": {"name": "web-1", "namespace": "default", "labels": OF_WEB},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": True}}]})
    for resource, body in MALFORMED_FOR_THE_CLIENTS_MODELS:
        api_server.store.create(resource, {**body, "metadata": {**body["metadata"], "namespace": "default"}})

    view = kube.service_targets(core.api_client)

    assert [(t.service, t.cluster_ip, t.port, t.backends) for t in view.targets] == [
        ("web", "10.96.0.40", 80, frozenset({"10.244.1.7", "10.244.1.9"}))]
    assert sorted(s.split(":")[0] for s in view.skipped) == [
        "endpointslice/numbers", "endpointslice/yes", "service/odd", "service/odder"]
