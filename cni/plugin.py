"""The CNI plugin entry point: one `handle()` used both by the exec'd plugin and the agent's CNI service.

`handle` never raises: every outcome is an exit code plus the bytes the runtime must see on stdout
(a result, or the spec's error object). Bad input is refused where it is decoded (config.decode,
config.parse_*, result.parse_prev_result) with the spec's code, so it never gets this far; what is
left, a bug of ours, becomes error code 999 with the traceback logged to stderr only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from cni import errors
from cni.config import (
    SUPPORTED_VERSIONS,
    NetConf,
    Request,
    decode,
    parse_netconf,
    parse_request,
    resolve_network,
)
from cni.errors import CniError

log = logging.getLogger(__name__)

LATEST_VERSION = SUPPORTED_VERSIONS[-1]


def handle(env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    version = LATEST_VERSION  # for error objects until the config's version is known
    try:
        request = parse_request(env)
        raw = decode(stdin) if request.command != "VERSION" or stdin.strip() else {}
        if isinstance(raw.get("cniVersion"), str):
            version = raw["cniVersion"]
        return 0, _dump(_dispatch(request.command, request, raw))
    except CniError as e:
        return 1, e.to_json(version)
    except Exception as e:
        log.exception("netagent CNI plugin failed unexpectedly")
        return 1, CniError(errors.INTERNAL_ERROR, f"internal error: {e}", type(e).__name__).to_json(version)


def answer_version(raw: Any) -> str:
    """The version to answer in: the config's cniVersion if supported, else the latest."""
    requested = raw.get("cniVersion") if isinstance(raw, dict) else None
    return requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION


def _dispatch(command: str, request: Request, raw: dict[str, Any]) -> dict[str, Any] | None:
    if command == "VERSION":
        return {"cniVersion": answer_version(raw), "supportedVersions": list(SUPPORTED_VERSIONS)}
    conf = parse_netconf(raw)
    if command in ("GC", "STATUS") and conf.cni_version != "1.1.0":
        msg = f"{command} needs cniVersion 1.1.0, the config says {conf.cni_version}"
        raise CniError(errors.INCOMPATIBLE_VERSION, msg)
    from cni import attachment

    if command == "ADD":
        return attachment.add(request, resolve_network(conf))
    if command == "DEL":
        attachment.delete(request, conf)
        return None
    if command == "CHECK":
        attachment.check(request, conf)
        return None
    if command == "GC":
        return _gc(conf)
    return _status(conf)


def _gc(conf: NetConf) -> None:
    from cni import gc

    if conf.valid_attachments is None:
        raise CniError(errors.INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the network config")
    from cni import masq

    # the masquerade goes with the network's last attachment, whatever this call's ipMasq says
    report = gc.collect(conf.name, conf.data_dir, conf.valid_attachments, lambda: masq.remove(conf.name))
    log.info("GC %s released %s, deleted %s", conf.name, report.released, report.deleted_links)


def _status(conf: NetConf) -> None:
    """Success when an ADD could succeed now: node state known and a free address in every family."""
    from cni import ipam

    try:
        network = resolve_network(conf)
    except CniError as e:
        raise CniError(errors.PLUGIN_NOT_AVAILABLE, e.msg, e.details) from None
    full = ipam.AllocationStore(conf.data_dir, conf.name).exhausted(network.ranges)
    if full:
        raise CniError(
            errors.PLUGIN_NOT_AVAILABLE,
            "address pool exhausted: " + ", ".join(str(pool.subnet) for pool in full),
        )


def _dump(result: dict[str, Any] | None) -> bytes:
    return b"" if result is None else json.dumps(result).encode() + b"\n"


def main() -> None:
    """Exec entry point (`netagent-cni`, and the shim's fallback when no agent answers)."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="netagent-cni: %(message)s")
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as e:
        failure = CniError(errors.IO_FAILURE, "cannot read the network config", str(e))
        code, out = 1, failure.to_json(LATEST_VERSION)
    else:
        code, out = handle(os.environ, stdin)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
