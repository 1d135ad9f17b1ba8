"""The `netagent` command line.

Subcommands are imported only when invoked: the CNI fallback path and `--help` must not pay for
importing the Kubernetes client or scapy.
"""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", one-line help shown by `netagent --help` without importing it)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("netagent.agent:run_cmd", "Run the node agent (DaemonSet entry point)."),
    "install-cni": ("cni.install:install_cni_cmd", "Install the CNI plugin and its conflist."),
    "doctor": ("netagent.doctor:doctor_cmd", "Check the kernel and userland features netagent needs."),
    "gc": ("netagent.gc.cli:gc_cmd", "Release CNI state leaked by pods that no longer exist."),
    "proxy": ("netagent.proxy.cli:proxy_group", "Inspect the kube-proxy replacement."),
    "lab": ("netns_lab.cli:lab_group", "A whole cluster on this machine, in network namespaces."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr = SUBCOMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="netagent")
def main() -> None:
    """netagent: CNI plugin, node agent and netns lab for Kubernetes networking."""


if __name__ == "__main__":
    main()
