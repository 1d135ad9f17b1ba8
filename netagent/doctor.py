"""`netagent doctor`: which kernel and userland features this node has, and what a missing one costs.

Every probe that needs the kernel runs inside a scratch network namespace created for the purpose and
removed afterwards, so the doctor never changes the host's own network configuration. Probes try the
real thing (create a vxlan device, load a BPF program) rather than trusting config files, because a
kernel can advertise a feature it cannot deliver (modules missing, as with IPVS here).
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import click

from nodekit import netns


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    disables: str  # what stops working when the feature is missing
    probe: Callable[[str], str]  # takes the scratch netns name, returns a detail or raises


@dataclass(frozen=True)
class Outcome:
    check: Check
    ok: bool
    detail: str


VXLAN_PORT = 4789  # IANA's


class Missing(Exception):
    """A probe's way of saying the feature is absent (the message says why)."""


def _run(ns: str, argv: list[str], stdin: str | None = None) -> str:
    try:
        done = netns.run(ns, argv, check=False, input=stdin, timeout=30)
    except FileNotFoundError as exc:
        raise Missing(f"{argv[0]} not installed") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        errors = [line for line in output if "rror" in line] or output
        raise Missing(errors[0].strip() if errors else f"{argv[0]} exited {done.returncode}")
    return done.stdout


def _ip(ns: str, *args: str) -> str:
    return _run(ns, ["ip", *args])


def probe_netns(ns: str) -> str:
    return f"scratch namespace {ns} created"


def probe_veth(ns: str) -> str:
    _ip(ns, "link", "add", "dr-a", "type", "veth", "peer", "name", "dr-b")
    return "veth pair created"


def probe_bridge(ns: str) -> str:
    _ip(ns, "link", "add", "dr-br", "type", "bridge")
    _ip(ns, "link", "set", "dr-br", "up")
    nf_call = _run(ns, ["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"]).strip()
    return f"bridge created; bridge-nf-call-iptables={nf_call}"


def probe_vxlan(ns: str) -> str:
    _ip(ns, "link", "add", "dr-vx", "type", "vxlan", "id", "42", "dstport", str(VXLAN_PORT), "nolearning")
    return "vxlan device created"


def probe_iptables(ns: str) -> str:
    version = _run(ns, ["iptables", "--version"]).strip()
    _run(ns, ["iptables-restore", "--noflush"], stdin="*nat\n:DR-TEST - [0:0]\n-A DR-TEST -m statistic "
         "--mode random --probability 0.5 -j RETURN\nCOMMIT\n")
    return f"{version}; nat + statistic match usable"


def probe_nftables(ns: str) -> str:
    _run(ns, ["nft", "-f", "-"], stdin=(
        "table ip dr {\n"
        "  map m { type ipv4_addr . inet_service : verdict; }\n"
        "  chain c {\n"
        "    type nat hook prerouting priority -100;\n"
        "    ip daddr . tcp dport vmap @m\n"
        "    numgen random mod 2 vmap { 0 : accept, 1 : accept }\n"
        "  }\n"
        "}\n"))
    return "nat chain, verdict map and numgen usable"


def probe_conntrack(ns: str) -> str:
    _run(ns, ["conntrack", "-L"])
    return "conntrack table readable"


def probe_ipvs(ns: str) -> str:
    try:
        _run(ns, ["cat", "/proc/net/ip_vs"])
    except Missing as exc:
        raise Missing("kernel has no IP Virtual Server (no /proc/net/ip_vs; CONFIG_IP_VS not set)") from exc
    return "IPVS available"


def probe_tc_bpf(ns: str) -> str:
    _ip(ns, "link", "add", "dr-tc", "type", "veth", "peer", "name", "dr-tc2")
    _run(ns, ["tc", "qdisc", "add", "dev", "dr-tc", "clsact"])
    return "clsact qdisc attached (cls_bpf direct-action needs it)"


def probe_bpf_syscall(ns: str) -> str:
    out = _run(ns, ["bpftool", "feature", "probe", "kernel"])
    wanted = ("sched_cls", "cgroup_sock_addr")
    missing = [p for p in wanted if f"eBPF program_type {p} is available" not in out]
    if missing:
        raise Missing(f"program types unavailable: {', '.join(missing)}")
    return "bpf() works; sched_cls and cgroup_sock_addr program types available"


def probe_cgroup2(ns: str) -> str:
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(mount, "cgroup.controllers")):
            return f"cgroup v2 at {mount}"
    raise Missing("no cgroup v2 hierarchy mounted")


def probe_bcc(ns: str) -> str:
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(os.path.join(build, "include")):
        raise Missing(f"{build} has no kernel headers (run ./bootstrap setup to link Debian's)")
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc, exposed to the venv by bootstrap)
    except ImportError as exc:
        raise Missing(f"python module bcc not importable: {exc}") from exc
    return f"bcc importable, headers at {os.path.realpath(build)}"


DECAP_PROBE = "decap_probe.c"


def probe_tunnel_gso_reset(ns: str) -> str:
    """Runs ebpf/decap_probe.c on one VXLAN frame sent across a veth pair in the scratch namespace:
    the kernel either accepts the decapsulation flag or says why not."""
    import socket

    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    from netagent.fastpath import ADJ_ROOM_DECAP_L4_UDP_CFLAG
    from nodekit import bpf

    _ip(ns, "link", "add", "dr-gso", "type", "veth", "peer", "name", "dr-gso2")
    _ip(ns, "link", "set", "dr-gso", "up")
    _ip(ns, "link", "set", "dr-gso2", "up")
    module = None
    try:
        try:
            cflags = [ADJ_ROOM_DECAP_L4_UDP_CFLAG, f"-DPROBE_PORT={VXLAN_PORT}"]
            module = bpf.compile_program(DECAP_PROBE, cflags)
            fd = bpf.load_function(module, "probe", bpf.PROG_TYPE_SCHED_CLS)
        except bpf.BpfError as exc:
            raise Missing(str(exc)) from exc
        some_mac = "02:00:00:00:00:01"
        frame = (Ether(src=some_mac, dst=some_mac) / IP(dst="192.0.2.1") / UDP(dport=VXLAN_PORT)
                 / VXLAN(vni=1) / Ether(src=some_mac, dst=some_mac) / IP(dst="192.0.2.2") / UDP() / b"probe")
        try:
            with netns.entered(netns.path(ns)), IPRoute() as ipr:
                bpf.attach_tc_filter(ipr, ipr.link_lookup(ifname="dr-gso2")[0], bpf.TC_INGRESS, fd,
                                     "netagent-doctor-probe", "netagent-doctor-")
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                    raw.bind(("dr-gso", 0))
                    raw.send(bytes(frame))
        except (NetlinkError, OSError, IndexError) as exc:
            raise Missing(f"cannot run the probe: {exc}") from exc
        with_flag = without_flag = 0
        for _ in range(100):
            with_flag, without_flag = (module[b"outcome"][i].value for i in (0, 1))
            if with_flag:
                break
            time.sleep(0.01)
    finally:
        bpf.release(module)
    if with_flag == 1:
        return "the fast path strips VXLAN from GSO packets too"
    if not with_flag:
        raise Missing("the probe frame never reached the probe")
    control = ("while the same call without it succeeds" if without_flag == 1
               else f"and without it too: {os.strerror(-without_flag)}")
    raise Missing(f"bpf_skb_adjust_room() refuses BPF_F_ADJ_ROOM_DECAP_L4_UDP ({os.strerror(-with_flag)}) "
                  f"{control}; the VXLAN device decapsulates GSO packets")


def probe_c_compiler(ns: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise Missing("no C compiler")
    return cc


def probe_reference_plugins(ns: str) -> str:
    for directory in ("/opt/cni/bin", "/usr/lib/cni"):
        if os.access(os.path.join(directory, "portmap"), os.X_OK):
            return f"portmap in {directory}"
    raise Missing("portmap not found in /opt/cni/bin or /usr/lib/cni")


CHECKS: tuple[Check, ...] = (
    Check("netns", True, "everything: pods, the lab and the tests live in namespaces", probe_netns),
    Check("veth", True, "pod wiring (CNI ADD)", probe_veth),
    Check("bridge", True, "pod wiring (CNI ADD)", probe_bridge),
    Check("vxlan", False, "--network vxlan (use --network routes)", probe_vxlan),
    Check("iptables", False, "--proxy iptables, ipMasq via iptables", probe_iptables),
    Check("nftables", False, "--proxy nftables", probe_nftables),
    Check("conntrack", False, "stale UDP conntrack cleanup on endpoint removal", probe_conntrack),
    Check("ipvs", False, "--proxy ipvs", probe_ipvs),
    Check("bpf", False, "--proxy ebpf, --fast-path", probe_bpf_syscall),
    Check("tc clsact", False, "--fast-path (tc programs)", probe_tc_bpf),
    Check("cgroup v2", False, "--proxy ebpf (socket-level load balancing)", probe_cgroup2),
    Check("bcc + headers", False, "--proxy ebpf, --fast-path (BPF programs are compiled by bcc)", probe_bcc),
    Check("tunnel GSO reset in BPF", False,
          "--fast-path decapsulating VXLAN GSO packets (the VXLAN device does it, at lower throughput)",
          probe_tunnel_gso_reset),
    Check("C compiler", False, "the fast CNI shim (the slower Python plugin is installed instead)",
          probe_c_compiler),
    Check("reference CNI plugins", False, "portmap chaining (hostPort)", probe_reference_plugins),
)


def run_checks(checks: tuple[Check, ...] | None = None) -> list[Outcome]:
    checks = CHECKS if checks is None else checks
    scratch = f"na-doctor-{secrets.token_hex(3)}"
    try:
        netns.create(scratch)
    except Exception as exc:  # every other probe depends on this one
        return [Outcome(checks[0], False, f"cannot create a network namespace: {exc}")] + [
            Outcome(c, False, "not probed: no network namespace") for c in checks[1:]]
    try:
        outcomes = []
        for check in checks:
            try:
                outcomes.append(Outcome(check, True, check.probe(scratch)))
            except Missing as exc:
                outcomes.append(Outcome(check, False, str(exc)))
        return outcomes
    finally:
        netns.delete(scratch)


def render(outcomes: list[Outcome]) -> str:
    rows = [("feature", "state", "needed for", "detail")]
    for o in outcomes:
        state = "ok" if o.ok else ("MISSING (required)" if o.check.required else "missing")
        rows.append((o.check.name, state, o.check.disables, o.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


@click.command("doctor")
def doctor_cmd() -> None:
    """Check every kernel/userland feature netagent's components need.

    Exits non-zero when a required feature is missing; a missing optional feature only disables
    what its row says.
    """
    if os.geteuid() != 0:
        raise click.ClickException("doctor creates a scratch network namespace: run it as root")
    outcomes = run_checks()
    click.echo(render(outcomes))
    missing_required = [o.check.name for o in outcomes if o.check.required and not o.ok]
    if missing_required:
        click.echo(f"\nrequired features missing: {', '.join(missing_required)}", err=True)
        sys.exit(1)
    disabled = [o.check.name for o in outcomes if not o.ok]
    unavailable = f"; unavailable: {', '.join(disabled)}" if disabled else ""
    click.echo(f"\nall required features present{unavailable}")

