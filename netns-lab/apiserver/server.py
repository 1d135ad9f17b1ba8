"""The lab API server's HTTP layer: routing, responses and watch streams over the Api, LabApiServer
(the server in this process) and write_kubeconfig; see the package docstring for what it serves."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
import select
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from netns_lab.apiserver.allocator import DEFAULT_SERVICE_CIDR, ServiceAllocator
from netns_lab.apiserver.api import Api, Target
from netns_lab.apiserver.api_errors import bad_request, status_object, unauthorized
from netns_lab.apiserver.discovery import DISCOVERY
from netns_lab.apiserver.endpoints_controller import EndpointsController
from netns_lab.apiserver.resources import BY_PATH
from netns_lab.apiserver.store import ApiError, ObjectStore
from netns_lab.apiserver.tables import as_table
from netns_lab.apiserver.tls import HANDSHAKE_TIMEOUT, Certificate, server_certificate

from nodekit import netns
from nodekit.files import atomic_write

log = logging.getLogger("netns_lab.apiserver")

# What anyone may read without credentials, as the real apiserver's system:public-info-viewer role
# allows: health and version. Everything else, discovery included, needs the token.
HEALTH_PATHS = ("/healthz", "/readyz", "/livez")
PUBLIC_PATHS = (*HEALTH_PATHS, "/version")
MAX_BODY = 3 * 1024 * 1024
# A client that went away: over TLS a write after its close_notify is an SSLError, not a ConnectionError.
HUNG_UP = (ConnectionError, ssl.SSLError)


def parse_target(path: str) -> Target | None:
    """Map /api/v1/... and /apis/GROUP/VERSION/... paths to what they name; None if not a resource path."""
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        group_version, rest = "v1", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group_version, rest[2]) in BY_PATH:
        namespace, rest = rest[1], rest[2:]
    if not rest or not 1 <= len(rest) <= 3 or (group_version, rest[0]) not in BY_PATH:
        return None
    resource = BY_PATH[(group_version, rest[0])]
    if len(rest) == 3 and (rest[2] != "status" or not resource.has_status):
        return None
    if namespace is not None and not resource.namespaced:
        return None
    if resource.namespaced and namespace is None and len(rest) > 1:
        return None
    return Target(resource, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request against the Api; every failure becomes a Kubernetes Status response."""

    protocol_version = "HTTP/1.1"
    server: LabHTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without this, Nagle + delayed ACK add ~40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            raw_body = self._read_raw_body()  # read even when refused, so the connection stays usable
            if not (method == "GET" and path in PUBLIC_PATHS) and not self._authenticated():
                raise unauthorized()
            body = self._parse_body(raw_body)
            if method == "GET" and path in DISCOVERY:
                return self._send(200, DISCOVERY[path])
            if method == "GET" and path in HEALTH_PATHS:
                return self._send_raw(200, b"ok", "text/plain")
            if "dryRun" in query:
                raise bad_request("dryRun is not supported by the lab API server")
            target = parse_target(url.path)
            if target is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._dispatch(method, target, query, body)
        except ApiError as e:
            self._send(e.code, status_object(e.code, e.reason, e.message, e.details))
        except HUNG_UP:
            self.close_connection = True
        except Exception as e:  # a bug here must not take the server down; the client gets a Status
            log.exception("%s %s failed", method, self.path)
            self._send(500, status_object(500, "InternalError", f"internal error: {e}"))

    def _dispatch(self, method: str, t: Target, query: dict[str, str], body: object) -> None:
        api = self.server.api
        if t.name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                events = api.watch(t, query, self._client_gone)
                if self._wants_table():  # kubectl get --watch
                    events = (
                        {**e, "object": as_table(t.resource, [e["object"]], "")}
                        if e["type"] in ("ADDED", "MODIFIED", "DELETED")
                        else e
                        for e in events
                    )
                return self._stream(events)
            if method == "GET":
                listed = api.list(t, query)
                if self._wants_table():
                    listed = as_table(t.resource, listed["items"], listed["metadata"]["resourceVersion"])
                return self._send(200, listed)
            if method == "POST":
                return self._send(201, api.create(t, body))
        elif method == "GET":
            obj = api.get(t)
            return self._send(200, as_table(t.resource, [obj], "") if self._wants_table() else obj)
        elif method == "PUT":
            return self._send(200, api.update(t, body))
        elif method == "PATCH":
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            return self._send(200, api.patch(t, content_type, body))
        elif method == "DELETE" and t.subresource is None:
            options = dict(body) if isinstance(body, dict) else {}
            if "gracePeriodSeconds" in query:
                options["gracePeriodSeconds"] = query["gracePeriodSeconds"]
            return self._send(200, api.delete(t, options))
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {self.path}")

    def _authenticated(self) -> bool:
        """The request carries the server's bearer token (compared in constant time)."""
        scheme, _, credential = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), self.server.token.encode())

    def _wants_table(self) -> bool:
        return "as=Table" in self.headers.get("Accept", "")

    def _read_raw_body(self) -> bytes:
        """The body's bytes, at most MAX_BODY of them (the real apiserver's limit); a body that cannot
        be read whole ends the connection, as the next request's start is unknown."""
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self.close_connection = True
            raise bad_request(f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "RequestEntityTooLarge", f"the request body is over {MAX_BODY} bytes")
        return self.rfile.read(int(length))

    def _parse_body(self, raw: bytes) -> object:
        if not raw:
            return None
        try:
            if "yaml" in self.headers.get("Content-Type", ""):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the request body is not valid JSON or YAML: {e}") from None

    def _send(self, code: int, obj: dict) -> None:
        self._send_raw(code, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _send_raw(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[dict]) -> None:
        """A watch: one JSON event per line, each line one HTTP chunk, flushed as it happens."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for event in events:
                self._chunk(event)
        except HUNG_UP:
            raise
        except Exception:  # too late for an error response: end the stream, the client will re-watch
            log.exception("watch %s failed", self.path)
            self.close_connection = True
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True once the client closed its end of a watch: TLS close_notify (Go clients such as kubectl
        send it) or the TCP stream's end both read as b"". A watch client sends nothing else, so reading
        (not peeking, which TLS cannot) loses nothing."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            finally:
                sock.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # part of a TLS record only
        except OSError:
            return True


class LabHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen()'s backlog: socketserver's default of 5 overflows under a burst of connections (1,000
    # creates at once), and the kernel then resets the ones it completed with SYN cookies. The kernel
    # caps this at net.core.somaxconn.
    request_queue_size = 4096
    api: Api
    token: str
    tls: ssl.SSLContext

    def finish_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        """The TLS handshake, in the connection's own thread (a slow client never holds up accept),
        then the requests; the TLS socket is closed here, as socketserver only knows the raw one."""
        request.settimeout(HANDSHAKE_TIMEOUT)
        with self.tls.wrap_socket(request, server_side=True) as connection:
            connection.settimeout(None)
            super().finish_request(connection, client_address)

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that hangs up is normal (watchers stop, kubectl exits), and so is one that does not
        speak TLS or trust the certificate: one debug line, no traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (*HUNG_UP, TimeoutError)):
            log.debug("%s: %s", client_address, error)
        else:
            log.exception("connection from %s failed", client_address)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"listen address {address!r}: expected ADDR:PORT")
    return host, int(port)


def _listener(address: str, api: Api, token: str, tls: ssl.SSLContext) -> LabHTTPServer:
    """An HTTPS server bound to ADDR:PORT or [ADDR6]:PORT (in the calling thread's netns)."""
    host, port = _split_address(address)
    server_class = (
        type("LabHTTPServer6", (LabHTTPServer,), {"address_family": socket.AF_INET6})
        if ":" in host
        else LabHTTPServer
    )
    server = server_class((host, port), Handler)
    server.api, server.token, server.tls = api, token, tls
    return server


@dataclass(frozen=True)
class Credentials:
    """What a client needs to talk to a lab API server: its bearer token and the certificate to trust."""

    token: str
    ca_pem: str

    @classmethod
    def read(cls, token_path: str, certificate_path: str) -> Credentials:
        """Those of a server process: its --token-file and the certificate its ready file names."""
        with open(certificate_path) as f:
            return cls(read_token(token_path), f.read())


class LabApiServer:
    """The lab API server in this process: start() binds and serves, stop() ends watches and saves.

    It speaks https with a certificate kept beside the data file (tls.py), and every request but health
    and version must carry `token` as a bearer token (a random one unless given);
    write_kubeconfig(path, server.url, server.credentials) gives a client both."""

    def __init__(
        self,
        data_path: str,
        listen: str = "127.0.0.1:0",
        netns_listen: dict[str, str] | None = None,
        service_cidrs: list[str] | None = None,
        history_size: int = 5000,
        bookmark_interval: float = 30.0,
        token: str | None = None,
    ) -> None:
        self.data_path = data_path
        self.token = token or new_token()
        self.listen = listen
        self.netns_listen = netns_listen or {}
        self.service_cidrs = service_cidrs or [DEFAULT_SERVICE_CIDR]
        self.history_size = history_size
        self.bookmark_interval = bookmark_interval
        self._servers: list[LabHTTPServer] = []
        self._serving: list[LabHTTPServer] = []
        self.store: ObjectStore | None = None
        self.api: Api | None = None
        self.controller: EndpointsController | None = None
        self.certificate: Certificate | None = None

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def credentials(self) -> Credentials:
        assert self.certificate is not None, "start() the server first"
        return Credentials(self.token, self.certificate.pem())

    def start(self) -> LabApiServer:
        hosts = [_split_address(a)[0] for a in (self.listen, *self.netns_listen.values())]
        self.certificate = server_certificate(self.data_path, hosts)
        tls = self.certificate.server_context()
        self.store = ObjectStore(self.data_path, self.history_size)
        try:
            allocator = ServiceAllocator(self.service_cidrs)
            self.api = Api(self.store, allocator, self.bookmark_interval)
            self.controller = EndpointsController(self.store)
            self._servers.append(_listener(self.listen, self.api, self.token, tls))
            for name, address in self.netns_listen.items():
                with netns.entered(netns.path(name)):
                    self._servers.append(_listener(address, self.api, self.token, tls))
        except BaseException:
            self.stop()
            raise
        self.controller.start()
        for server in self._servers:
            threading.Thread(
                target=server.serve_forever,
                args=(0.1,),
                name=f"apiserver {server.server_address}",
                daemon=True,
            ).start()
            self._serving.append(server)
        return self

    def stop(self) -> None:
        """Stop accepting, end every watch, stop the controller and timers, close the data file."""
        for server in self._serving:
            server.shutdown()
        for server in self._servers:
            server.server_close()
        if self.controller:
            self.controller.stop()
        if self.api:
            self.api.stop_timers()
        if self.store:
            self.store.close()
        self._servers, self._serving = [], []

    def __enter__(self) -> LabApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_token() -> str:
    """A bearer token no one guesses: 256 random bits."""
    return secrets.token_urlsafe(32)


def read_token(path: str) -> str:
    """The token in `path` (one line); refused when empty, so a torn write never means "no auth"."""
    with open(path) as f:
        token = f.read().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path} holds no token (one line, no spaces)")
    return token


def write_kubeconfig(
    path: str, server_url: str, credentials: Credentials, name: str = "netagent-lab"
) -> None:
    """A kubeconfig pointing kubectl and the `kubernetes` client at `server_url` (https), trusting the
    server's certificate and carrying its bearer token; mode 0600, as it holds the token."""
    ca_data = base64.b64encode(credentials.ca_pem.encode()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server_url, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": name, "user": {"token": credentials.token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    }
    atomic_write(path, yaml.safe_dump(config, sort_keys=False), mode=0o600)
