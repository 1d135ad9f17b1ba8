"""Fuzzing the CNI plugin: thousands of generated network configs, CNI_* environments and prevResults,
through the three ways a runtime reaches it, against a real node netns, real pod netns and a temp
IPAM dataDir. Invariants, checked for every input:

- the answer is a valid result with exit 0, or the spec's error object (an int `code`, a `msg`)
  with a non-zero exit; never a traceback (stdout or stderr), never code 999, never a hang (each
  call has a deadline; a call blocked on a FIFO is unblocked after it and counted);
- an ADD succeeds only into one of the pod namespaces (not the node's own, not a relative path);

and once every successful ADD has been deleted again:

- no allocation, owner index or temporary file anywhere; IPAM directories (lock files) only for
  networks an ADD succeeded on; nothing written relative to the working directory or under the
  default /var/lib/cni/networks;
- no link in the node netns but bridges, no address on them but the gateways of networks an ADD
  succeeded on, no nftables table; nothing but lo in the pod namespaces; no leaked descriptors;
- a valid ADD still works end to end (the pod pings its gateway) and its DEL cleans up.

Paths: `cni.plugin.handle(env, stdin)` in worker threads of a process inside the node netns (as the
agent's CNI service calls it: EXAMPLES random inputs), the exec'd plugin (`netagent-cni`, 1.3% of
EXAMPLES) and the compiled shim talking to a CniService in the node netns (10% of EXAMPLES); after
the random inputs, each listed odd value once alone in an otherwise valid call (the "corners").
Each call has a deadline of NETAGENT_FUZZ_CALL_TIMEOUT seconds (3; the exec'd plugin 4 more).

Default run (NETAGENT_FUZZ_EXAMPLES=2500): ~3,300 inputs in about a minute. A longer run:
    NETAGENT_FUZZ_EXAMPLES=20000 NETAGENT_FUZZ_SEED=$RANDOM .venv/bin/python -m pytest \\
        tests/test_fuzz_cni.py tests/test_fuzz_agent.py -s
(-s prints the tally: inputs per class, outcomes, violations with their first example;
NETAGENT_FUZZ_REPORT=FILE appends it to FILE.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pytest
from fuzz_inputs import EXAMPLES, SEED, Tally, encode, mutated, scaled, short, squeezed
from test_cni_support import FALLBACK_PLUGIN, REFERENCE_PLUGINS, compile_shim, ping, running_service

from cni import plugin
from nodekit import netns, nodestate

CALL_TIMEOUT = float(os.environ.get("NETAGENT_FUZZ_CALL_TIMEOUT", "3"))
EXEC_TIMEOUT = CALL_TIMEOUT + 4  # an exec'd plugin starts an interpreter: seconds on a loaded machine
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
COMMANDS = (("ADD", 40), ("DEL", 20), ("CHECK", 20), ("GC", 7), ("STATUS", 8), ("VERSION", 5))
IFNAMES = ("eth0", "net1", "net2")
SHIM_ENV_LIMIT = 64 * 1024  # the CNI service's frame limit for the environment (cni_service.MAX_ENV)


@dataclass(frozen=True)
class Case:
    command: str
    env: dict[str, str]
    stdin: bytes
    conf: Any  # the document before encoding (None when stdin is not derived from one)
    mutations: int

    def describe(self) -> str:
        return f"env={short(self.env, 300)} stdin={short(squeezed(self.stdin), 500)}"


@dataclass(frozen=True)
class Observed:
    code: int
    stdout: bytes
    stderr: bytes = b""
    timed_out: bool = False


@dataclass
class Attachment:
    """A successful ADD: what its DEL needs, and what it owns."""

    env: dict[str, str]
    conf: dict[str, Any]
    result: dict[str, Any]


@dataclass
class Fixtures:
    """The files and namespaces a generated CNI_NETNS, dataDir or nodeStateFile may point at."""

    root: str
    node: str
    pods: list[str]
    fifo: str = ""
    plain: str = ""
    directory: str = ""
    data_root: str = ""
    cwd: str = ""
    node_state: str = ""

    def __post_init__(self) -> None:
        self.fifo = os.path.join(self.root, "fifo")
        os.mkfifo(self.fifo)
        self.plain = os.path.join(self.root, "plain-file")
        with open(self.plain, "w") as f:
            f.write("not a namespace\n")
        self.directory = os.path.join(self.root, "a-directory")
        os.mkdir(self.directory)
        self.data_root = os.path.join(self.root, "data", "ipam")  # "../x" stays inside root
        os.makedirs(self.data_root)
        self.cwd = os.path.join(self.root, "cwd")
        os.mkdir(self.cwd)
        self.node_state = os.path.join(self.root, "node-state.json")  # network 3's pod CIDR
        nodestate.write(nodestate.NodeState("fuzz-node", ("10.79.0.0/24",), 1450, ("10.79.0.0/16",)),
                        self.node_state)

    def unblock(self) -> None:
        """Open the FIFO for writing without blocking: whoever hangs in open() on it gets to go on."""
        for _ in range(20):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                return  # ENXIO: nobody waits on it (any more)
            time.sleep(0.05)


@dataclass
class CniFuzz:
    """Generates cases against the fixtures, checks each outcome and the state left at the end."""

    rng: random.Random
    fx: Fixtures
    tally: Tally
    token: str
    live: dict[tuple[str, str], Attachment] = field(default_factory=dict)
    added: list[Attachment] = field(default_factory=list)
    names_used: set[str] = field(default_factory=set)
    counter: int = 0
    env_limit: int = 0  # the largest environment the path can carry (the shim's frame), 0: no limit
    creators: dict[str, str] = field(default_factory=dict)  # IPAM lock file -> the call that made it

    # -- generation ---------------------------------------------------------------------------
    def network(self, k: int) -> dict[str, Any]:
        subnets = [f"10.77.{k}.0/24"] + ([f"fd77:{k}::/64"] if k == 1 else [])
        return {
            "cniVersion": self.rng.choice(("1.0.0", "1.1.0")),
            "name": f"fz{self.token}{k}",
            "type": "netagent",
            "bridge": f"fzb{k}",
            "mtu": 1400,
            "ipMasq": self.rng.random() < 0.3,
            "hairpinMode": True,
            "clusterCIDR": "10.77.0.0/16",
            "nodeStateFile": self.fx.node_state,
            "ipam": {"dataDir": self.fx.data_root, "subnets": subnets} if k < 3 else {
                "dataDir": self.fx.data_root},  # network 3 takes its subnet from the node state
        }

    def special_conf_values(self) -> dict[str, tuple]:
        fx = self.fx
        return {
            "cniVersion": ("0.4.0", "1.0.0", "1.1.0", "2.0.0", "", "1.1", 1.1),
            "name": (f"fz{self.token}x", "", "../x", "a b", "x" * 300, 5, "é"),
            "type": ("bridge", "Netagent", "", "netagent "),
            "bridge": ("lo", "", "x" * 16, "a b", "a/b", "fzb9", "fzb0", None, "eth0"),
            "mtu": (0, 575, 576, 65535, 65536, 9000, -1, "1500", 1.5, True),
            "ipMasq": ("yes", 1, None, True),
            "hairpinMode": ("no", 0, None),
            "clusterCIDR": ("bad", 5, ["10.0.0.0/8", 5], "0.0.0.0/0", "10.0.0.0/8,fd00::/8", ""),
            "nodeStateFile": ("", "relative.json", "/dev/null", fx.plain, fx.directory, fx.fifo, None),
            "dataDir": ("", "relative/dir", ".", None, fx.data_root + "/../other", "/proc", "/dev/null",
                        fx.plain, os.path.join(fx.data_root, "x" * 300), fx.data_root + "\n"),
            "subnets": (["0.0.0.0/0"], ["::/0"], ["10.77.9.0/33"], [5], "10.77.9.0/24", ["10.77.9.0/30"],
                        ["127.0.0.0/24"], ["224.0.0.0/24"], ["fe80::/64"], ["300.0.0.0/24"],
                        [{"subnet": "10.77.9.0/24", "gateway": "10.77.9.0"}],
                        [{"subnet": "10.77.9.0/24", "rangeStart": "10.77.9.200", "rangeEnd": "10.77.9.100"}],
                        [{"subnet": "10.77.9.0/24", "rangeStart": 5}], ["10.77.8.0/24", "fd77:8::/64"],
                        ["10.77.9.0/24", "10.77.9.0/24"], [{}], [None], []),
            "subnet": ("0.0.0.0/0", "::/0", "fd00::1%eth0/64", "10.77.9.0/33", "x", 5, "10.77.9.1/24"),
            "cni.dev/valid-attachments": ("x", [5], [{"containerID": 5}], [{}], [{"ifname": "eth0"}], None),
            "interfaces": ("abc", [5], [{"name": 5}], [{}], None, [{"name": "eth0", "mac": 5}]),
            "ips": ([1], [{}], [{"address": "x"}], [{"address": "10.77.0.9/24", "interface": 99}],
                    [{"address": "10.77.0.9/24", "interface": -1}],
                    [{"address": "10.77.0.9/24", "interface": "2"}],
                    [{"address": "10.77.0.9/24", "interface": True}], [{"address": 5, "interface": 2}], "x"),
            "routes": ([{"dst": "bad"}], [{}], "x", [{"dst": "0.0.0.0/0", "gw": 5}], [5]),
            "mac": (5, "zz", "", None),
            "address": ("x", 5, None, "10.77.0.300/24", "10.77.0.9"),
            "interface": (99, -1, "2", True, None, 2.0),
            "dst": ("bad", 5, None),
            "gw": ("bad", 5),
            "gateway": ("bad", 5, "10.77.9.0"),
            "prevResult": ("x", [], 5, None, {}),
        }

    def env_values(self, pod: str) -> dict[str, tuple]:
        fx = self.fx
        return {
            "CNI_COMMAND": ("", "add", "ADD ", "FROB", "VERSION", "DEL", "\u202eADD", "GC"),
            "CNI_CONTAINERID": ("", "a", "ctr-x\n", "bad/id", "x" * 300, "-lead", "é", "a b", ".", "..",
                                "ctr\x7f", "ctr:1"),
            "CNI_IFNAME": ("", "eth0\n", "x" * 16, "x" * 15, ".", "..", "a/b", "a:b", "a b", "é", "lo",
                           "eth%d", "é" * 8, "eth0"),
            "CNI_NETNS": ("", "relative-netns", os.path.basename(netns.path(pod)), "/run/netns/fz-absent",
                          fx.fifo, fx.plain, fx.directory, "/proc/self/ns/net", "/proc/thread-self/ns/net",
                          "/proc/self/ns/mnt", "/dev/null", netns.path(pod) + "\n", netns.path(pod) + "/",
                          "/run/netns/" + "x" * 5000, netns.path(self.rng.choice(fx.pods))),
            "CNI_PATH": ("", "/nonexistent", "relative", REFERENCE_PLUGINS + ":/x"),
            "CNI_ARGS": ("", "IgnoreUnknown=1;K8S_POD_NAME=x", "a=b=c;;", "=", ";", "é=ü", "x" * 70000),
        }

    def case(self) -> Case:
        rng = self.rng
        self.counter += 1
        command = rng.choices([c for c, _ in COMMANDS], [w for _, w in COMMANDS])[0]
        k = rng.randrange(4)
        conf = self.network(k)
        pod, ifname, container = rng.choice(self.fx.pods), rng.choice(IFNAMES), f"fz-{self.counter}"
        if command in ("DEL", "CHECK") and self.live and rng.random() < 0.7:
            attachment = self.live[rng.choice(sorted(self.live))]
            conf = copy_json(attachment.conf)
            conf["prevResult"] = copy_json(attachment.result)
            env = dict(attachment.env, CNI_COMMAND=command)
        else:
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
                   "CNI_NETNS": netns.path(pod), "CNI_PATH": REFERENCE_PLUGINS}
            if command in ("GC", "STATUS", "VERSION"):
                env = {"CNI_COMMAND": command, "CNI_PATH": REFERENCE_PLUGINS}
        if command == "GC":
            conf["cniVersion"] = "1.1.0"
            conf["cni.dev/valid-attachments"] = [
                {"containerID": a.env.get("CNI_CONTAINERID", ""), "ifname": a.env.get("CNI_IFNAME", "")}
                for a in self.live.values()
            ]
        mode = rng.random()  # the config alone, the environment alone, or both
        conf, count = (conf, 0) if mode < 0.3 else mutated(rng, conf, self.special_conf_values(),
                                                            deep=rng.random() < 0.02)
        if mode < 0.45:
            for _ in range(rng.randint(1, 2)):
                key = rng.choice(sorted(self.env_values(pod)))
                if rng.random() < 0.2:
                    env.pop(key, None)
                else:
                    env[key] = rng.choice(self.env_values(pod)[key])
                count += 1
        if isinstance(conf, dict) and isinstance(conf.get("name"), str):
            self.names_used.add(conf["name"])
        stdin = encode(rng, conf)
        if stdin != encode(random.Random(0), conf, damage=0):
            count += 1
        self.tally.tried[f"{command} ({'valid' if count == 0 else 'mutated'})"] += 1
        return Case(env.get("CNI_COMMAND", "(none)"), env, stdin, conf, count)

    def corner_cases(self, only: tuple[str, ...] = ()) -> Iterator[Case]:
        """Every listed odd value once, alone in an otherwise valid call (the random phase may miss
        one): each environment value in an ADD, each config value in the call that reads it
        (prevResult values in a CHECK of a live attachment); `only` these environment variables."""
        for key, values in self.env_values(self.fx.pods[0]).items():
            for value in values if not only or key in only else ():
                yield self.corner("ADD", lambda conf, env, k=key, v=value: env.update({k: v}))
        if only:
            return
        for key, values in self.special_conf_values().items():
            for value in values:
                if key in ("dataDir", "subnets", "subnet"):
                    yield self.corner("ADD", lambda conf, env, k=key, v=value: conf["ipam"].update({k: v}))
                elif key == "cni.dev/valid-attachments":
                    yield self.corner("GC", lambda conf, env, k=key, v=value: conf.update({k: v}))
                elif key in PREV_RESULT_PARTS or key in ("interfaces", "ips", "routes", "prevResult"):
                    if self.live:
                        yield self.corner("CHECK", lambda conf, env, k=key, v=value: set_prev(conf, k, v))
                else:
                    yield self.corner("ADD", lambda conf, env, k=key, v=value: conf.update({k: v}))

    def corner(self, command: str, patch: Callable[[dict, dict], None]) -> Case:
        self.counter += 1
        conf = self.network(self.counter % 3)
        pod = self.fx.pods[self.counter % len(self.fx.pods)]
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"fz-c{self.counter}",
               "CNI_IFNAME": f"c{self.counter}", "CNI_NETNS": netns.path(pod), "CNI_PATH": REFERENCE_PLUGINS}
        if command == "CHECK":
            attachment = self.live[sorted(self.live)[self.counter % len(self.live)]]
            conf, env = copy_json(attachment.conf), dict(attachment.env, CNI_COMMAND="CHECK")
            conf["prevResult"] = copy_json(attachment.result)
        elif command == "GC":
            conf["cniVersion"] = "1.1.0"
        patch(conf, env)
        if isinstance(conf.get("name"), str):
            self.names_used.add(conf["name"])
        self.tally.tried[f"{command} (corner)"] += 1
        return Case(env.get("CNI_COMMAND", "(none)"), env, json.dumps(conf).encode(), conf, 1)

    # -- per-call invariants --------------------------------------------------------------------
    def check(self, case: Case, seen: Observed) -> None:
        if seen.timed_out:
            self.tally.violation(f"hang: {case.command} gave no answer within its deadline",
                                 case.describe())
            self.tally.outcomes["hang"] += 1
            return
        if b"Traceback" in seen.stdout or b"Traceback" in seen.stderr:
            output = f"stdout={short(seen.stdout)} stderr={short(seen.stderr)}"
            self.tally.violation(f"traceback from {case.command}", f"{case.describe()} -> {output}")
        if seen.code == 0:
            self.check_success(case, seen)
        else:
            self.check_error(case, seen)

    def check_error(self, case: Case, seen: Observed) -> None:
        try:
            error = json.loads(seen.stdout)
            assert isinstance(error, dict)
            code, msg = error["code"], error["msg"]
            assert isinstance(code, int) and not isinstance(code, bool) and isinstance(msg, str) and msg
        except (ValueError, KeyError, AssertionError):
            self.tally.violation(f"exit {seen.code} without a spec error object",
                                 f"{case.describe()} -> {short(seen.stdout)}")
            return
        self.tally.outcomes[f"error {code}"] += 1
        if code == 11 and self.env_limit and env_bytes(case.env) > self.env_limit:
            self.tally.violation("try again later (11) for an environment too large ever to pass",
                                 f"{env_bytes(case.env)} bytes of environment: {short(case.env, 300)}")
        if code == 999:
            self.tally.violation(f"code 999 on {case.command}: {error.get('details') or msg[:60]}",
                                 f"{case.describe()} -> {short(error)}")

    def check_success(self, case: Case, seen: Observed) -> None:
        self.tally.outcomes[f"{case.command} ok"] += 1
        try:
            body = json.loads(seen.stdout) if seen.stdout.strip() else None
        except ValueError:
            body = "undecodable"
        if case.command == "ADD":
            if not valid_add_result(body):
                self.tally.violation("ADD exit 0 without a valid result",
                                     f"{case.describe()} -> {short(body)}")
                return
            target = case.env.get("CNI_NETNS", "")
            if target not in [netns.path(p) for p in self.fx.pods]:
                self.tally.violation(f"ADD accepted CNI_NETNS={target[:60]!r}, not a pod's namespace",
                                     case.describe())
            attachment = Attachment(dict(case.env), json.loads(case.stdin), body)  # as sent, damage included
            self.added.append(attachment)
            self.live[(case.env["CNI_CONTAINERID"], case.env["CNI_IFNAME"])] = attachment
        elif case.command == "VERSION":
            if not (isinstance(body, dict) and isinstance(body.get("supportedVersions"), list)):
                self.tally.violation("VERSION exit 0 without supportedVersions",
                                     f"{case.describe()} -> {body}")
        elif body is not None:
            self.tally.violation(f"{case.command} exit 0 printed something",
                                 f"{case.describe()} -> {short(body)}")
        elif case.command == "DEL":
            self.live.pop((case.env.get("CNI_CONTAINERID", ""), case.env.get("CNI_IFNAME", "")), None)

    def note_lock_files(self, case: Case, seen: Observed) -> None:
        """Remember which call created each IPAM lock file (the report names it)."""
        candidates = [os.path.join(DEFAULT_DATA_DIR, n, "lock") for n in self.names_used if "/" not in n]
        for directory, _, files in os.walk(self.fx.root):
            candidates.extend(os.path.join(directory, name) for name in files if name == "lock")
        for path in candidates:
            if path not in self.creators and os.path.exists(path):
                self.creators[path] = f"{case.command} exit {seen.code}"

    # -- afterwards -------------------------------------------------------------------------------
    def delete_all(self, call: Callable[[Case], Observed]) -> None:
        """DEL every successful ADD exactly as it was added (DEL is idempotent: twice is fine)."""
        for attachment in self.added:
            conf = {k: v for k, v in attachment.conf.items() if k != "prevResult"}
            case = Case("DEL", dict(attachment.env, CNI_COMMAND="DEL"), json.dumps(conf).encode(), conf, 0)
            seen = call(case)
            self.tally.tried["DEL (cleanup)"] += 1
            if seen.timed_out or seen.code != 0:
                self.tally.violation("DEL of a successful ADD failed", f"{case.describe()} -> {short(seen)}")
        self.live.clear()

    def check_nothing_left(self, default_data_dir_before: set[str]) -> None:
        owners = self.ipam_dirs_of_successful_adds()
        self.check_ipam_files(self.fx.root, owners)
        for name in sorted(os.listdir(self.fx.cwd)):
            self.tally.violation("written relative to the working directory", os.path.join(self.fx.cwd, name))
        for name in sorted(self.names_used):
            path = os.path.join(DEFAULT_DATA_DIR, name)
            if "/" in name or name in ("", ".", "..") or path in default_data_dir_before:
                continue
            if os.path.lexists(path):
                if not self.add_wrote(path, owners):
                    creator = self.creators.get(os.path.join(path, "lock"), "?").split()[0]
                    self.tally.violation(f"IPAM state under the default dataDir without an ADD there, "
                                         f"made by {creator}", path)
                self.check_ipam_files(path, owners)
                shutil.rmtree(path, ignore_errors=True)
        self.check_node_netns()
        for pod in self.fx.pods:
            left = link_names(pod)
            if left != ["lo"]:
                self.tally.violation("links left in a pod netns after every DEL", f"{pod}: {left}")

    def ipam_dirs_of_successful_adds(self) -> set[str]:
        dirs = set()
        for a in self.added:
            data_dir = a.conf.get("ipam", {}).get("dataDir", DEFAULT_DATA_DIR)
            if isinstance(data_dir, str):
                dirs.add(os.path.normpath(os.path.join(self.fx.cwd, data_dir, a.conf["name"])))
        return dirs

    def add_wrote(self, directory: str, owners: set[str]) -> bool:
        """Whether an ADD made this network's IPAM store: its lock and last_reserved_ip are kept (they
        hold no address, as with host-local), even when that ADD failed after allocating."""
        directory = os.path.normpath(directory)
        return directory in owners or self.creators.get(os.path.join(directory, "lock"), "").startswith("ADD")

    def check_ipam_files(self, top: str, owners: set[str]) -> None:
        fixtures = {self.fx.fifo, self.fx.plain, self.fx.node_state}
        for directory, _, files in os.walk(top):
            for name in files:
                path = os.path.join(directory, name)
                if path in fixtures:
                    continue
                bookkeeping = name == "lock" or name.startswith("last_reserved_ip.")
                if not bookkeeping or not self.add_wrote(directory, owners):
                    with contextlib.suppress(OSError), open(path, errors="replace") as f:
                        content = f.read(200)
                    kind = kind_of_ipam_file(name)
                    if name == "lock":
                        kind += f", made by {self.creators.get(path, '?').split()[0]}"
                    self.tally.violation(f"IPAM file left after every DEL: {kind}",
                                         f"{path} content={content!r}")

    def check_node_netns(self) -> None:
        gateways = {f"{ip['gateway']}/{ip['address'].split('/')[1]}"
                    for a in self.added for ip in a.result["ips"] if "gateway" in ip}
        # a failed ADD leaves its gateway on a bridge another network's pod joined meanwhile (the
        # rollback does not take a bridge from under a port); DEL leaves bridges and gateways anyway
        bridges_in_use = {a.result["interfaces"][0]["name"] for a in self.added}
        for link in ip_json(self.fx.node, "-d", "link", "show"):
            kind = link.get("linkinfo", {}).get("info_kind", "")
            if link["ifname"] != "lo" and kind != "bridge":
                self.tally.violation("link left in the node netns after every DEL",
                                     f"{link['ifname']} ({kind})")
        for link in ip_json(self.fx.node, "addr", "show"):
            for addr in link.get("addr_info", []):
                cidr = f"{addr['local']}/{addr['prefixlen']}"
                if addr.get("scope") not in ("link", "host") and cidr not in gateways \
                        and link["ifname"] not in bridges_in_use:
                    self.tally.violation("address left on the node after every DEL (no ADD used it)",
                                         f"{link['ifname']}: {cidr}")
        tables = netns.run(self.fx.node, ["nft", "list", "tables"]).stdout.split("\n")
        for table in filter(None, tables):
            self.tally.violation("nftables table left after the last DEL of its network", table)


PREV_RESULT_PARTS = {"mac": ("interfaces", 2), "address": ("ips", 0), "interface": ("ips", 0),
                     "gateway": ("ips", 0), "dst": ("routes", 0), "gw": ("routes", 0)}


def set_prev(conf: dict[str, Any], key: str, value: Any) -> None:
    """conf's prevResult with key (a field of it, or of its first route/ip, or the pod interface) set."""
    prev = conf["prevResult"]
    if key == "prevResult":
        conf["prevResult"] = value
    elif key in PREV_RESULT_PARTS:
        listed, index = PREV_RESULT_PARTS[key]
        prev[listed][index][key] = value
    else:
        prev[key] = value


def copy_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def valid_add_result(body: Any) -> bool:
    try:
        interfaces, ips = body["interfaces"], body["ips"]
        assert isinstance(body["cniVersion"], str) and ips and isinstance(interfaces, list)
        for ip in ips:
            ipaddress.ip_interface(ip["address"])
            assert 0 <= ip["interface"] < len(interfaces)
        return True
    except (TypeError, KeyError, ValueError, AssertionError):
        return False


def kind_of_ipam_file(name: str) -> str:
    if name.startswith(".tmp-"):
        return "temporary file"
    if name.startswith("owner-"):
        return "owner index"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return "allocation"
    if name == "lock" or name.startswith("last_reserved_ip."):
        return f"{name.split('.')[0]} file of a network no ADD succeeded on"
    return f"other ({name})"


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(netns.run(ns, ["ip", "-j", *args]).stdout or "[]")


def link_names(ns: str) -> list[str]:
    return sorted(link["ifname"] for link in ip_json(ns, "link", "show"))


def env_bytes(env: dict[str, str]) -> int:
    return sum(len(f"{k}={v}".encode()) + 1 for k, v in env.items())


def exec_safe(env: dict[str, str]) -> dict[str, str]:
    """An environment a process can really be given: no NUL (the generator makes none anyway)."""
    return {k: v.replace("\0", "") for k, v in env.items()}


# -- the three paths -----------------------------------------------------------------------------
def exec_runner(node: str, argv: list[str], fx: Fixtures, timeout: float) -> Callable[[Case], Observed]:
    """Run the plugin (or the shim) inside the node netns as a runtime does, with a deadline."""

    def call(case: Case) -> Observed:
        env = {"PATH": os.environ["PATH"], **exec_safe(case.env)}
        try:
            done = subprocess.run(netns.exec_argv(node, argv), input=case.stdin, env=env, capture_output=True,
                                  timeout=timeout, check=False, cwd=fx.cwd)
        except subprocess.TimeoutExpired as e:
            fx.unblock()
            return Observed(-1, e.stdout or b"", e.stderr or b"", timed_out=True)
        return Observed(done.returncode, done.stdout, done.stderr)

    return call


@contextlib.contextmanager
def in_process_runner(fx: Fixtures) -> Iterator[Callable[[Case], Observed]]:
    """plugin.handle in long-lived worker threads of this process, moved into the node netns first
    (so /proc/self/ns/net is the node's, as in the agent), with the cwd in the fixtures."""
    with netns.entered(netns.path(fx.node)):
        # threads started from here inherit the node netns, as the CNI service's workers have it
        workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fuzz-cni")

        def call(case: Case) -> Observed:
            future = workers.submit(plugin.handle, exec_safe(case.env), case.stdin)
            try:
                code, out = future.result(timeout=CALL_TIMEOUT)
            except FutureTimeout:
                fx.unblock()
                with contextlib.suppress(FutureTimeout, Exception):
                    future.result(timeout=CALL_TIMEOUT)
                return Observed(-1, b"", timed_out=True)
            return Observed(code, out)

        try:
            yield call
        finally:
            fx.unblock()
            workers.shutdown(wait=True)


# -- the tests ------------------------------------------------------------------------------------
@pytest.fixture
def fixtures(make_netns, tmp_path) -> Fixtures:
    node, root = make_netns("node"), tmp_path / "fuzz"
    root.mkdir()
    return Fixtures(str(root), node, [make_netns(f"p{i}") for i in range(3)])


def run_fuzz(name: str, fx: Fixtures, call: Callable[[Case], Observed], count: int, make_netns,
             env_limit: int = 0, corners: tuple[str, ...] = ()) -> Tally:
    """count random cases, then the corner cases, then the checks of what is left behind."""
    tally = Tally(name)
    fuzz = CniFuzz(random.Random(f"{SEED}-{name}"), fx, tally, fx.node.split("-")[0][2:], env_limit=env_limit)
    before = set(os.path.join(DEFAULT_DATA_DIR, n) for n in _listdir(DEFAULT_DATA_DIR))
    cases = itertools.chain((fuzz.case() for _ in range(count)), fuzz.corner_cases(corners))
    for case in cases:
        seen = call(case)
        fuzz.check(case, seen)
        fuzz.note_lock_files(case, seen)
    fuzz.delete_all(call)
    fuzz.check_nothing_left(before)
    check_a_valid_add_works_end_to_end(fuzz, call, make_netns("fresh"))
    assert tally.outcomes["ADD ok"] > 0, "the generator never made a valid ADD"
    return tally


def _listdir(path: str) -> list[str]:
    with contextlib.suppress(OSError):
        return os.listdir(path)
    return []


def check_a_valid_add_works_end_to_end(fuzz: CniFuzz, call: Callable[[Case], Observed], pod: str) -> None:
    conf = fuzz.network(0)
    conf["ipam"] = {"dataDir": fuzz.fx.data_root, "subnets": ["10.78.0.0/24"]}
    conf["bridge"], conf["name"] = "fzok", "fzok"
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "fz-final", "CNI_IFNAME": "eth0",
           "CNI_NETNS": netns.path(pod), "CNI_PATH": REFERENCE_PLUGINS}
    seen = call(Case("ADD", env, json.dumps(conf).encode(), conf, 0))
    if seen.code != 0:
        fuzz.tally.violation("a valid ADD after the fuzzing failed", short(seen))
        return
    gateway = json.loads(seen.stdout)["ips"][0]["gateway"]
    if not ping(pod, gateway):
        fuzz.tally.violation("a valid ADD after the fuzzing gives a pod that cannot reach its gateway",
                             gateway)
    deleted = call(Case("DEL", dict(env, CNI_COMMAND="DEL"), json.dumps(conf).encode(), conf, 0))
    if deleted.code != 0 or link_names(pod) != ["lo"]:
        fuzz.tally.violation("the DEL of the valid ADD after the fuzzing did not clean up", short(deleted))


def test_in_process_plugin_answers_every_generated_input_by_the_spec_and_leaves_nothing_behind(
    fixtures, make_netns, monkeypatch
):
    monkeypatch.chdir(fixtures.cwd)
    descriptors = len(os.listdir("/proc/self/fd"))
    with in_process_runner(fixtures) as call:
        tally = run_fuzz("cni in-process", fixtures, call, EXAMPLES, make_netns)
        leaked = len(os.listdir("/proc/self/fd")) - descriptors
    if leaked > 16:  # each worker thread keeps its node netlink socket; more is a leak per call
        tally.violation("file descriptors leaked by the in-process plugin", f"{leaked} more than before")
    tally.finish()


def test_exec_plugin_answers_every_generated_input_by_the_spec_and_leaves_nothing_behind(
    fixtures, make_netns
):
    call = exec_runner(fixtures.node, [FALLBACK_PLUGIN], fixtures, EXEC_TIMEOUT)
    # each call starts an interpreter: a small random sample, and the corners where a process differs
    # from a thread of the agent (namespace paths, the size of the environment)
    tally = run_fuzz("cni exec'd plugin", fixtures, call, scaled(0.013, 40), make_netns,
                     corners=("CNI_NETNS", "CNI_ARGS"))
    tally.finish()


def test_shim_and_agent_service_answer_every_generated_input_by_the_spec_and_leave_nothing_behind(
    fixtures, make_netns, tmp_path
):
    socket_path = str(tmp_path / "state" / "cni.sock")
    shim = compile_shim(str(tmp_path), socket_path)
    call = exec_runner(fixtures.node, [shim], fixtures, CALL_TIMEOUT)
    with running_service(fixtures.node, socket_path, cwd=fixtures.cwd) as service:
        tally = run_fuzz("cni shim + agent service", fixtures, call, scaled(0.1, 120), make_netns,
                         env_limit=SHIM_ENV_LIMIT)
        if service.process.poll() is not None:
            tally.violation("the CNI service process died", f"exit {service.process.returncode}")
    tally.finish()

