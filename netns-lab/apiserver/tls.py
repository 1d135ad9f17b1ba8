"""The lab API server's TLS identity: a self-signed certificate for the addresses it listens on.

Clients only send a bearer token over TLS (kubectl's client-go drops credentials on plain http), so
the server speaks https, and kubeconfigs trust exactly this certificate (certificate-authority-data).
The certificate is made once per data file and set of addresses and kept beside the data file, so a
restarted server keeps the identity its clients trust."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

VALID_DAYS = 3650
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake


@dataclass(frozen=True)
class Certificate:
    cert_path: str
    key_path: str

    def pem(self) -> str:
        with open(self.cert_path) as f:
            return f.read()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def server_certificate(base_path: str, hosts: Iterable[str]) -> Certificate:
    """The certificate at base_path.tls-HASH.{crt,key} naming `hosts` (and loopback), made if missing.

    HASH is of the names it carries: a server listening on other addresses gets another certificate."""
    names = sorted({"127.0.0.1", "::1", "localhost", *hosts})
    alt_names = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
    digest = hashlib.sha256(alt_names.encode()).hexdigest()[:12]
    cert = Certificate(f"{base_path}.tls-{digest}.crt", f"{base_path}.tls-{digest}.key")
    if not (os.path.exists(cert.cert_path) and os.path.exists(cert.key_path)):
        _make(cert, alt_names)
    return cert


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _make(cert: Certificate, alt_names: str) -> None:
    """A P-256 key (0600, as openssl creates it) and a self-signed certificate for alt_names, written
    under temporary names and renamed, so a server killed half-way never leaves a key without its
    certificate."""
    tmp_cert, tmp_key = f"{cert.cert_path}.tmp{os.getpid()}", f"{cert.key_path}.tmp{os.getpid()}"
    argv = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", tmp_key, "-out", tmp_cert, "-days", str(VALID_DAYS), "-subj", "/CN=netagent-lab-apiserver",
        "-addext", f"subjectAltName={alt_names}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign", "-addext", "extendedKeyUsage=serverAuth",
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OSError(f"openssl could not make the API server's certificate: {result.stderr.strip()}")
        for path in (tmp_key, tmp_cert):  # the key must be; the certificate is only 0600 as all lab state
            os.chmod(path, 0o600)
        os.replace(tmp_key, cert.key_path)
        os.replace(tmp_cert, cert.cert_path)
    finally:
        for leftover in (tmp_cert, tmp_key):
            if os.path.exists(leftover):
                os.unlink(leftover)
