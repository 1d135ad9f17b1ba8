"""`netagent doctor` reports every feature, never crashes on a missing one, and fails only on a
missing required one."""

from __future__ import annotations

import subprocess
import sys

from netagent import doctor, fastpath
from nodekit import netns


def test_doctor_reports_every_feature_and_succeeds_when_required_ones_exist() -> None:
    done = subprocess.run([sys.executable, "-m", "netagent.cli", "doctor"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for check in doctor.CHECKS:
        assert check.name in done.stdout
    assert "required features present" in done.stdout


def test_missing_ipvs_is_reported_not_fatal() -> None:
    """This machine's kernel has no IPVS: doctor must say what that disables, not crash."""
    outcomes = {o.check.name: o for o in doctor.run_checks()}
    ipvs = outcomes["ipvs"]
    if ipvs.ok:  # a kernel with IPVS: nothing to show here
        return
    assert "IP Virtual Server" in ipvs.detail
    assert not ipvs.check.required


def test_a_missing_required_feature_fails_the_run(monkeypatch) -> None:
    def absent(ns: str) -> str:
        raise doctor.Missing("simulated absence")

    broken = doctor.Check("imaginary", True, "everything", absent)
    monkeypatch.setattr(doctor, "CHECKS", (*doctor.CHECKS[:1], broken))
    from click.testing import CliRunner

    result = CliRunner().invoke(doctor.doctor_cmd)
    assert result.exit_code == 1
    assert "MISSING (required)" in result.output


def test_doctor_leaves_no_scratch_namespace_behind() -> None:
    doctor.run_checks()
    assert netns.names("na-doctor-") == []


def test_the_tunnel_gso_probe_agrees_with_the_kernels_own_list_of_flags() -> None:
    """The kernel's BTF names every bpf_skb_adjust_room() flag it knows. The probe must find the flag
    usable exactly when it is named there (with the value the fast path passes), and on a refusal show
    that its frame could be stripped without it (the control), so the refusal is the flag's."""
    btf = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    named = [line for line in btf.splitlines() if "'BPF_F_ADJ_ROOM_DECAP_L4_UDP'" in line]
    assert "'BPF_F_ADJ_ROOM_ENCAP_L4_UDP'" in btf  # the enum is there to be read
    check = next(c for c in doctor.CHECKS if c.probe is doctor.probe_tunnel_gso_reset)
    outcome = doctor.run_checks((check,))[0]
    assert outcome.ok == bool(named), outcome.detail
    if named:
        assert named[0].strip().endswith(f"val={fastpath.ADJ_ROOM_DECAP_L4_UDP}")
    else:
        assert "while the same call without it succeeds" in outcome.detail
