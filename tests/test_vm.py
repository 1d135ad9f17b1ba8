"""The IPVS guest harness (`./bootstrap vm -- CMD`): a command runs as root in a qemu guest whose
kernel has IPVS, sees the host's files at the same paths, and hands back its stdout, stderr and exit
status; what it writes is thrown away with the guest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu is installed by ./bootstrap test and ./bootstrap vm")


def in_guest(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netns_lab.vm", "--timeout", "300", "--", *argv],
                          capture_output=True, text=True, timeout=400)


def test_a_command_in_the_guest_returns_its_output_and_exit_status_and_the_guest_has_ipvs(tmp_path):
    marker = tmp_path / "written-by-the-guest"
    script = (f"echo out; echo err >&2; cat /proc/net/ip_vs | head -1; id -u; pwd; "
              f"echo x > {marker}; cat {marker}; exit 7")
    done = in_guest("sh", "-c", script)
    assert done.returncode == 7, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "out" and lines[-1] == "x"
    assert lines[1].startswith("IP Virtual Server version")
    assert lines[2:4] == ["0", str(Path.cwd())]  # root, in the same directory as the caller
    assert "err" in done.stderr.splitlines()
    assert not marker.exists()  # the guest's writes went to its own overlay


def test_a_command_that_cannot_start_fails_with_the_shells_status():
    done = in_guest("/nonexistent/command")
    assert done.returncode == 127
