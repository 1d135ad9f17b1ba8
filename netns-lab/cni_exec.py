"""Calling CNI plugins exactly as a container runtime does (the libcni protocol), inside a node netns.

For a conflist, ADD calls each plugin in order, handing the previous plugin's result to the next as
`prevResult`; DEL calls them in reverse order, each with the cached result of the ADD. Every plugin is
an executable found on CNI_PATH, given CNI_* environment variables and its network config on stdin,
and answers with a result or the spec's error object on stdout.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from dataclasses import dataclass

from netns_lab.state import LabError, NodeInfo

from nodekit import netns

SYSTEM_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins (portmap, bandwidth, ...)
PLUGIN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Attachment:
    """What identifies one pod's attachment to the network: the spec's (container id, ifname) + netns."""

    container_id: str
    netns_path: str
    ifname: str = "eth0"


def load_conflist(conf_dir: str) -> dict:
    """The network the runtime would use: the first *.conflist in the directory, by name."""
    paths = sorted(glob.glob(os.path.join(conf_dir, "*.conflist")))
    if not paths:
        raise LabError(f"no CNI network config (*.conflist) in {conf_dir}: was the plugin installed?")
    try:
        with open(paths[0]) as f:
            conflist = json.load(f)
    except (OSError, ValueError) as e:
        raise LabError(f"unreadable CNI config {paths[0]}: {e}") from None
    if not conflist.get("plugins"):
        raise LabError(f"CNI config {paths[0]} lists no plugins")
    return conflist


def add(node: NodeInfo, attachment: Attachment) -> dict:
    """ADD through the node's whole chain; returns the final result. A failed chain is rolled back."""
    conflist = load_conflist(node.cni_conf_dir)
    result: dict | None = None
    for plugin in conflist["plugins"]:
        try:
            result = _invoke(node, "ADD", attachment, _plugin_config(conflist, plugin, result))
        except LabError:
            delete(node, attachment, result)  # libcni leaves this to the runtime, which always DELs
            raise
    return result or {}


def delete(node: NodeInfo, attachment: Attachment, cached_result: dict | None) -> None:
    """DEL through the chain in reverse order; every plugin is called even if one fails."""
    conflist = load_conflist(node.cni_conf_dir)
    failures = []
    for plugin in reversed(conflist["plugins"]):
        try:
            _invoke(node, "DEL", attachment, _plugin_config(conflist, plugin, cached_result))
        except LabError as e:
            failures.append(str(e))
    if failures:
        raise LabError("; ".join(failures))


def _plugin_config(conflist: dict, plugin: dict, prev_result: dict | None) -> dict:
    config = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    if prev_result is not None:
        config["prevResult"] = prev_result
    return config


def _invoke(node: NodeInfo, command: str, attachment: Attachment, config: dict) -> dict:
    plugin_type = config.get("type", "")
    search_path = [node.cni_bin_dir, SYSTEM_PLUGIN_DIR]
    binary = next((os.path.join(d, plugin_type) for d in search_path
                   if plugin_type and os.access(os.path.join(d, plugin_type), os.X_OK)), None)
    if binary is None:
        raise LabError(f"CNI plugin {plugin_type!r} not found in {':'.join(search_path)}")
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": attachment.container_id,
        "CNI_NETNS": attachment.netns_path,
        "CNI_IFNAME": attachment.ifname,
        "CNI_PATH": ":".join(search_path),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    try:
        proc = subprocess.run(netns.exec_argv(node.netns, [binary]), input=json.dumps(config).encode(),
                              env=env, capture_output=True, timeout=PLUGIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"CNI {command} by {plugin_type} on {node.name} timed out") from None
    if proc.returncode != 0:
        raise LabError(f"CNI {command} by {plugin_type} on {node.name} failed: {_error_text(proc)}")
    if command != "ADD":
        return {}
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"CNI ADD by {plugin_type} printed no JSON result: {proc.stdout[:200]!r}") from None


def _error_text(proc: subprocess.CompletedProcess) -> str:
    try:
        error = json.loads(proc.stdout)
        text = f"code {error.get('code')}: {error.get('msg')}"
        return text + (f" ({error['details']})" if error.get("details") else "")
    except (ValueError, AttributeError):
        return (proc.stdout + proc.stderr).decode(errors="replace").strip()[:500] or f"exit {proc.returncode}"
