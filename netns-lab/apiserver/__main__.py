"""The lab's Kubernetes API server stand-in.

As a process, the way the lab starts it: `python -m netns_lab.apiserver --data ... --ready-file ...`
(usage and what it serves: the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading

from netns_lab.apiserver.allocator import DEFAULT_SERVICE_CIDR
from netns_lab.apiserver.server import LabApiServer, read_token, write_kubeconfig

from nodekit.files import atomic_write

log = logging.getLogger("netns_lab.apiserver")


def main(argv: list[str] | None = None) -> int:
    """`python -m netns_lab.apiserver`: serve until SIGTERM/SIGINT; 1 if a listener cannot start."""
    parser = argparse.ArgumentParser(prog="python -m netns_lab.apiserver", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="state file (created if missing)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="ADDR:PORT on the host side (port 0: any)")
    parser.add_argument(
        "--listen-netns",
        action="append",
        default=[],
        metavar="NETNS=ADDR:PORT",
        help="also listen inside named network namespace NETNS",
    )
    parser.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR, help="CIDR[,CIDR] for ClusterIPs")
    parser.add_argument("--ready-file", help="write {url, port, pid} here as JSON once listening")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for the host-side listener here")
    parser.add_argument(
        "--token-file",
        help="the bearer token clients must present, read from this file (never on the command line, "
        "which every user can read); without it a random token is made: see --kubeconfig",
    )
    parser.add_argument("--history", type=int, default=5000, help="watch history window, in events")
    parser.add_argument("--bookmark-interval", type=float, default=30.0, help="seconds between BOOKMARKs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s apiserver %(levelname)s %(message)s",
    )
    try:
        netns_listen = dict(item.split("=", 1) for item in args.listen_netns)
    except ValueError:
        parser.error("--listen-netns takes NETNS=ADDR:PORT")
    try:
        token = read_token(args.token_file) if args.token_file else None
    except (OSError, ValueError) as e:
        print(f"lab apiserver: cannot start: --token-file: {e}", file=sys.stderr)
        return 1
    server = LabApiServer(
        args.data,
        args.listen,
        netns_listen,
        args.service_cidr.split(","),
        args.history,
        args.bookmark_interval,
        token,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (OSError, ValueError) as e:
        print(f"lab apiserver: cannot start: {e}", file=sys.stderr)
        return 1
    try:
        if args.kubeconfig:
            write_kubeconfig(args.kubeconfig, server.url, server.credentials)
        if args.ready_file:
            port = int(server.url.rsplit(":", 1)[1])
            assert server.certificate is not None
            ready = {"url": server.url, "port": port, "pid": os.getpid(), "ca": server.certificate.cert_path}
            atomic_write(args.ready_file, json.dumps(ready), mode=0o600)
        log.info("serving on %s%s", server.url, "".join(f", {n}={a}" for n, a in netns_listen.items()))
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
