"""Masquerade of pod traffic that leaves the cluster (`ipMasq`), as one nftables table per network.

The whole table is replaced in a single `nft -f` transaction (declare, delete, recreate), so applying
it is idempotent, atomic, and never leaves a duplicate rule behind however often ADD runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from cni import errors
from cni.config import IPNetwork
from cni.errors import CniError

NFT_CANDIDATES = ("/usr/sbin/nft", "/sbin/nft")


def table_name(network_name: str) -> str:
    return "netagent_" + re.sub(r"[^A-Za-z0-9_]", "_", network_name)


def ruleset(network_name: str, pod_subnets: list[IPNetwork], cluster_cidrs: list[IPNetwork]) -> str:
    """Masquerade pod sources towards anything outside the cluster CIDRs of the same family.

    Without a cluster CIDR for a family, the pod subnet itself is the inside.
    """
    table = table_name(network_name)
    rules = []
    for subnet in pod_subnets:
        family = "ip" if subnet.version == 4 else "ip6"
        inside = [c for c in cluster_cidrs if c.version == subnet.version] or [subnet]
        inside_set = ", ".join(str(c) for c in inside)
        rules.append(f"        {family} saddr {subnet} {family} daddr != {{ {inside_set} }} masquerade")
    body = "\n".join(rules)
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"{body}\n"
        "    }\n"
        "}\n"
    )


def apply(network_name: str, pod_subnets: list[IPNetwork], cluster_cidrs: list[IPNetwork]) -> None:
    nft = next((p for p in NFT_CANDIDATES if shutil.which(p)), None) or shutil.which("nft")
    if nft is None:
        raise CniError(errors.KERNEL_FAILURE, "ipMasq needs the nft command, which is not installed")
    script = ruleset(network_name, pod_subnets, cluster_cidrs)
    done = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CniError(errors.KERNEL_FAILURE, "installing the masquerade rules failed", done.stderr.strip())
