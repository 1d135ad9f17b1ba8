"""`netagent install-cni`: put the plugin executable and its conflist where the runtime looks.

The executable is the C shim (cni/shim.c) compiled here with the agent socket and the Python
fallback plugin baked in. Without a C compiler a Python launcher is installed instead: correct, but
every call then pays the interpreter start. Every file is written atomically, so a runtime
scanning the directories concurrently never sees a half-written plugin or config.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile

import click

from cni.config import valid_ifname
from nodekit import nodestate
from nodekit.files import atomic_write

PLUGIN_NAME = "netagent"
CONFLIST_NAME = "10-netagent.conflist"
SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.c")


def default_fallback() -> str:
    """The `netagent-cni` console script of the Python environment running this command."""
    return os.path.join(os.path.dirname(sys.executable), "netagent-cni")


def conflist(
    state_dir: str, data_dir: str, cluster_cidr: str, bridge: str, mtu: int | None, name: str = PLUGIN_NAME
) -> dict:
    plugin: dict = {
        "type": PLUGIN_NAME,
        "bridge": bridge,
        "hairpinMode": True,
        "ipMasq": True,
        "clusterCIDR": cluster_cidr,
        "nodeStateFile": nodestate.path_in(state_dir),
        "ipam": {"dataDir": data_dir},
    }
    if mtu is not None:
        plugin["mtu"] = mtu
    return {
        # runtimes with libcni < 1.2 only read cniVersion; newer ones pick the best of cniVersions
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": name,
        "plugins": [plugin, {"type": "portmap", "capabilities": {"portMappings": True}}],
    }


def build_shim(output: str, socket_path: str, fallback: str) -> bool:
    """Compile the shim to `output` atomically; False when there is no C compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return False
    directory = os.path.dirname(output)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        subprocess.run(
            [
                compiler,
                "-O2",
                f"-DNETAGENT_SOCKET={_c_string(socket_path)}",
                f"-DNETAGENT_FALLBACK={_c_string(fallback)}",
                "-o",
                tmp,
                SHIM_SOURCE,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except subprocess.CalledProcessError as e:
        raise click.ClickException(f"compiling {SHIM_SOURCE} failed:\n{e.stderr}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def python_launcher(fallback: str) -> str:
    return f'#!/bin/sh\n# netagent CNI plugin, slow path (no C compiler at install)\nexec "{fallback}" "$@"\n'


def _c_string(text: str) -> str:
    if any(c in text for c in '"\\\n'):
        raise click.BadParameter(f"path must not contain quotes, backslashes or newlines: {text!r}")
    return f'"{text}"'


@click.command("install-cni")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, help="Where the runtime finds plugins.")
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, help="Where runtimes read configs.")
@click.option(
    "--state-dir",
    default=nodestate.DEFAULT_STATE_DIR,
    show_default=True,
    help="Agent state: node.json is read from here and the agent's socket is STATE/cni.sock.",
)
@click.option("--data-dir", default="/var/lib/cni/networks", show_default=True, help="IPAM allocations.")
@click.option("--cluster-cidr", default="10.244.0.0/16", show_default=True, help="Not masqueraded.")
@click.option("--bridge", default="na0", show_default=True)
@click.option("--mtu", type=click.IntRange(576, 65535), default=None, help="Default: from the node state.")
@click.option(
    "--fallback",
    default=None,
    help="Python plugin the shim runs when the agent is down; must exist on the node's filesystem "
    "[default: netagent-cni beside this Python].",
)
def install_cni_cmd(
    bin_dir: str,
    conf_dir: str,
    state_dir: str,
    data_dir: str,
    cluster_cidr: str,
    bridge: str,
    mtu: int | None,
    fallback: str | None,
) -> None:
    """Install the CNI plugin executable and 10-netagent.conflist."""
    for cidr in cluster_cidr.split(","):
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise click.BadParameter(f"{cidr!r} is not a CIDR", param_hint="--cluster-cidr") from None
    if not valid_ifname(bridge):
        raise click.BadParameter(f"{bridge!r} is not a valid interface name", param_hint="--bridge")
    fallback = fallback or default_fallback()
    if not os.access(fallback, os.X_OK):
        raise click.ClickException(f"fallback plugin {fallback} is not executable (is netagent installed?)")
    executable = os.path.join(bin_dir, PLUGIN_NAME)
    socket_path = os.path.join(state_dir, "cni.sock")
    if build_shim(executable, socket_path, fallback):
        click.echo(f"installed {executable} (compiled shim -> agent at {socket_path}, fallback {fallback})")
    else:
        atomic_write(executable, python_launcher(fallback), mode=0o755)
        click.echo(f"installed {executable} as a Python launcher: no C compiler found, every call is slow")
    config_path = os.path.join(conf_dir, CONFLIST_NAME)
    text = json.dumps(conflist(state_dir, data_dir, cluster_cidr, bridge, mtu), indent=2) + "\n"
    atomic_write(config_path, text)
    click.echo(f"installed {config_path}")
