"""Masquerade of pod traffic that leaves the cluster (`ipMasq`), as one nftables table per network.

The whole table is replaced in a single `nft -f` transaction (declare, delete, recreate), so applying
it is idempotent, atomic, and never leaves a duplicate rule behind however often ADD runs. The chain
is named after a hash of its rules, so "is the wanted ruleset in place?" is one netlink lookup of
that chain, and the nft process (tens of ms) runs only when something is missing or changed.
The network's last DEL removes the table (`remove`).
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
    """One table per network; a name nft cannot spell as is gets a hash too, so that "a.b" and "a_b"
    (one network's last DEL removes its table) never share one."""
    spelled = re.sub(r"[^A-Za-z0-9_]", "_", network_name)
    if spelled == network_name:
        return f"netagent_{spelled}"
    return f"netagent_{spelled}_{hashlib.sha256(network_name.encode()).hexdigest()[:8]}"


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
    if not _exists(table_name(network_name), chain):
        _nft(script, "installing the masquerade rules failed")


def remove(network_name: str) -> None:
    """Delete the network's table; nothing to do (and no nft process) when there is none."""
    table = table_name(network_name)
    if _exists(table):
        script = f"table inet {table}\ndelete table inet {table}\n"  # gone meanwhile is fine too
        _nft(script, f"removing the masquerade table {table} failed")


def _nft(script: str, failure: str) -> None:
    nft = next((p for p in NFT_CANDIDATES if shutil.which(p)), None) or shutil.which("nft")
    if nft is None:
        raise CniError(errors.KERNEL_FAILURE, "ipMasq needs the nft command, which is not installed")
    done = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CniError(errors.KERNEL_FAILURE, failure, done.stderr.strip())


def _exists(table: str, chain: str | None = None) -> bool:
    """One NFT_MSG_GETCHAIN for exactly this chain (or GETTABLE for the table) in the inet family,
    never a dump of the ruleset."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nftsocket import (
        NFT_MSG_GETCHAIN,
        NFT_MSG_GETTABLE,
        nft_chain_msg,
        nft_table_msg,
    )
    from pyroute2.nftables.main import NFTables

    NFPROTO_INET = 1
    if chain is None:
        query, kind = nft_table_msg(), NFT_MSG_GETTABLE
        query["attrs"] = [("NFTA_TABLE_NAME", table)]
    else:
        query, kind = nft_chain_msg(), NFT_MSG_GETCHAIN
        query["attrs"] = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", chain)]
    try:
        socket = NFTables(nfgen_family=NFPROTO_INET)
    except OSError:  # a kernel without nf_tables holds no table of ours
        return False
    with socket as nft:
        try:
            return len(nft.request_get(query, kind, msg_flags=NLM_F_REQUEST)) > 0
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return False
            what = table if chain is None else f"{table}/{chain}"
            raise CniError(errors.KERNEL_FAILURE, f"cannot query nftables {what}", str(e)) from None
