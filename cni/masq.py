"""Masquerade of pod traffic that leaves the cluster (`ipMasq`), as one nftables table per network.

The whole table is replaced in a single `nft -f` transaction (declare, delete, recreate), so applying
it is idempotent, atomic, and never leaves a duplicate rule behind however often ADD runs. The chain
is named after a hash of its rules, so "is the wanted ruleset in place?" is one netlink lookup of
that chain, and the nft process (tens of ms) runs only when something is missing or changed.
"""

from __future__ import annotations

import errno
import hashlib
import re
import shutil
import subprocess

from cni import errors
from cni.config import IPNetwork
from cni.errors import CniError

NFT_CANDIDATES = ("/usr/sbin/nft", "/sbin/nft")


def table_name(network_name: str) -> str:
    return "netagent_" + re.sub(r"[^A-Za-z0-9_]", "_", network_name)


def ruleset(
    network_name: str, pod_subnets: list[IPNetwork], cluster_cidrs: list[IPNetwork]
) -> tuple[str, str]:
    """(chain name, nft script): masquerade pod sources towards anything outside the cluster CIDRs of
    the same family. Without a cluster CIDR for a family, the pod subnet itself is the inside.
    """
    table = table_name(network_name)
    rules = []
    for subnet in pod_subnets:
        family = "ip" if subnet.version == 4 else "ip6"
        inside = [c for c in cluster_cidrs if c.version == subnet.version] or [subnet]
        inside_set = ", ".join(str(c) for c in inside)
        rules.append(f"        {family} saddr {subnet} {family} daddr != {{ {inside_set} }} masquerade")
    body = "\n".join(rules)
    chain = "postrouting_" + hashlib.sha256(body.encode()).hexdigest()[:12]
    return chain, (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"    chain {chain} {{\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"{body}\n"
        "    }\n"
        "}\n"
    )


def apply(network_name: str, pod_subnets: list[IPNetwork], cluster_cidrs: list[IPNetwork]) -> None:
    chain, script = ruleset(network_name, pod_subnets, cluster_cidrs)
    if _chain_exists(table_name(network_name), chain):
        return
    nft = next((p for p in NFT_CANDIDATES if shutil.which(p)), None) or shutil.which("nft")
    if nft is None:
        raise CniError(errors.KERNEL_FAILURE, "ipMasq needs the nft command, which is not installed")
    done = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CniError(errors.KERNEL_FAILURE, "installing the masquerade rules failed", done.stderr.strip())


def _chain_exists(table: str, chain: str) -> bool:
    """One NFT_MSG_GETCHAIN for exactly this chain in the inet family (no dump of the ruleset)."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETCHAIN, nft_chain_msg
    from pyroute2.nftables.main import NFTables

    NFPROTO_INET = 1
    query = nft_chain_msg()
    query["attrs"] = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", chain)]
    with NFTables(nfgen_family=NFPROTO_INET) as nft:
        try:
            return len(nft.request_get(query, NFT_MSG_GETCHAIN, msg_flags=NLM_F_REQUEST)) > 0
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return False
            msg = f"cannot query nftables chain {table}/{chain}"
            raise CniError(errors.KERNEL_FAILURE, msg, str(e)) from None
