"""Running the node's kernel tools (nft, iptables-restore, conntrack, bpftool, ...) here or inside a
named network namespace: always an argv, never a shell, and one error type that carries the tool's
own words, so callers can show the operator why the kernel refused."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from nodekit import netns


class ToolError(RuntimeError):
    """The tool could not be run, ran past its deadline, or exited non-zero (the message has its stderr)."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def run_tool(
    argv: Sequence[str],
    *,
    netns_name: str | None = None,
    stdin: str | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> str:
    """The tool's stdout. With check, a non-zero exit raises ToolError; without, it is returned as is."""
    full = netns.exec_argv(netns_name, argv) if netns_name else list(argv)
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
    except OSError as err:  # e.g. the tool is not installed
        raise ToolError(f"cannot run {argv[0]}: {err}") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        stderr = proc.stderr.strip()
        raise ToolError(f"{argv[0]} failed ({proc.returncode}): {stderr[:2000]}", proc.returncode, stderr)
    return proc.stdout
