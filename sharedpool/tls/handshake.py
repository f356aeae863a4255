"""The manager's TLS 1.3 handshake with Redis, on an SSLObject over MemoryBIOs.

The standard ``ssl`` module runs the handshake (verification included), but
over memory buffers: we move every byte between them and the socket, so
once the handshake is done we know that no application record has been
sent, and that whatever the server sent after its Finished is still in our
hands. The application traffic secrets come from the context's key log,
written to a memfd of this process; a context per connection keeps its key
log to one session. From then on the connection runs on our own record
layer (``records.RecordLayer``), in the manager as in every holder.

Failures that retrying cannot fix (verification, protocol) are
``TLSRefused``, with one line that says which.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from sharedpool.errors import TLSRecordError, TLSRefused
from sharedpool.tls.keys import Handover, direction_keys, secrets_from_keylog
from sharedpool.tls.records import Suite
from sharedpool.tls.transport import TLSSocket

# redis-py's names for certificate requirements.
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# The options of a rediss:// URL we act on, with redis-py's names.
OPTION_NAMES = (
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile", "ssl_keyfile",
    "ssl_check_hostname", "ssl_password", "ssl_min_version",
)
_MIN_VERSIONS = {
    spelling: version
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    for spelling in (version.name.lower(), version.name.lower().replace("_", "."), str(int(version)))
}
_CERT_REQS_NAMES = {value: name for name, value in CERT_REQS.items()}


def parse_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


@dataclass(frozen=True)
class TLSOptions:
    """How the manager verifies Redis and presents itself. repr shows no password."""

    server_hostname: str
    cert_reqs: str = "required"
    ca_certs: str = ""
    ca_path: str = ""
    ca_data: str = ""
    certfile: str = ""
    keyfile: str = ""
    check_hostname: bool = True
    password: str = field(default="", repr=False)
    min_version: str = "TLSv1_3"

    @classmethod
    def build(cls, host: str, values: dict[str, Any]) -> TLSOptions:
        """From redis-py option names (URL query, settings); raises ValueError naming the bad one."""
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if value is None or value == "":
                continue
            short = name[len("ssl_"):]
            if name == "ssl_cert_reqs":
                text = _CERT_REQS_NAMES.get(value, str(value).lower())
                if text not in CERT_REQS:
                    raise ValueError(f"ssl_cert_reqs={value}: expected one of required, optional, none")
                kwargs["cert_reqs"] = text
            elif name == "ssl_check_hostname":
                try:
                    kwargs["check_hostname"] = value if isinstance(value, bool) else parse_bool(value)
                except ValueError:
                    raise ValueError(f"ssl_check_hostname={value}: expected true or false") from None
            elif name == "ssl_min_version":
                key = str(int(value)) if isinstance(value, int) else str(value).lower().removeprefix("tlsversion.")
                if key not in _MIN_VERSIONS:
                    raise ValueError(f"ssl_min_version={value}: expected TLSv1_2 or TLSv1_3")
                kwargs["min_version"] = _MIN_VERSIONS[key].name
            elif name in OPTION_NAMES:
                kwargs[short] = str(value)
        return cls(server_hostname=host, **kwargs)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # TLS 1.3 whatever ssl_min_version says: only its record state can be handed over.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        verify = self.cert_reqs != "none"
        ctx.check_hostname = verify and self.check_hostname
        ctx.verify_mode = CERT_REQS[self.cert_reqs]
        if verify:
            if self.ca_certs or self.ca_path or self.ca_data:
                ctx.load_verify_locations(self.ca_certs or None, self.ca_path or None, self.ca_data or None)
            else:
                ctx.load_default_certs()
        if self.certfile:
            ctx.load_cert_chain(self.certfile, self.keyfile or None, self.password or None)
        return ctx


def options_from(url: str, settings: dict[str, Any]) -> TLSOptions:
    """A rediss:// URL's query parameters, overridden by the ``ssl_*`` settings that are set."""
    values: dict[str, Any] = {name: value for name, value in parse_qsl(urlsplit(url).query) if name in OPTION_NAMES}
    values.update({name: value for name, value in settings.items() if value not in ("", None)})
    return TLSOptions.build(urlsplit(url).hostname or "", values)


def without_options(url: str) -> str:
    """The URL without the query parameters we act on (redis-py would parse some as numbers)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k not in OPTION_NAMES]
    return urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in kept)))


def handshake(raw: socket.socket, options: TLSOptions, label: str, timeout: float) -> tuple[TLSSocket, Handover]:
    """Run the handshake on the connected ``raw``; the connection's transport and keys."""
    try:
        ctx = options.context()
    except (ssl.SSLError, OSError) as exc:
        raise TLSRefused(
            f"TLS to {label}: cannot load the certificates configured (ssl_ca_certs, ssl_certfile...): {exc}"
        ) from None
    keylog = os.memfd_create("sharedpool-tls-keylog", os.MFD_CLOEXEC)
    try:
        ctx.keylog_filename = f"/proc/self/fd/{keylog}"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=options.server_hostname or None)
        _run(obj, raw, incoming, outgoing, label, options, time.monotonic() + timeout)
        cipher = obj.cipher()
        if obj.version() != "TLSv1.3" or cipher is None or cipher[0] not in Suite.__members__:
            raise TLSRefused(f"TLS to {label}: negotiated {obj.version()} {cipher and cipher[0]}, which cannot be shared")
        suite = Suite[cipher[0]]
        ctx.keylog_filename = None  # type: ignore[assignment]  # closes the log file
        client_secret, server_secret = secrets_from_keylog(os.pread(keylog, 1 << 16, 0).decode("ascii", "replace"))
    finally:
        os.ftruncate(keylog, 0)
        os.close(keylog)
    handover = Handover(suite, direction_keys(suite, client_secret), direction_keys(suite, server_secret))
    layer = handover.layer()
    layer.tickets_ok = True  # until the manager's own first commands have read them
    leftover = incoming.read()
    if leftover:
        layer.feed(leftover)
    return TLSSocket(raw, layer), handover


def _run(obj: ssl.SSLObject, raw: socket.socket, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
         label: str, options: TLSOptions, deadline: float) -> None:
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLCertVerificationError as exc:
            raise TLSRefused(f"TLS to {label}: {describe_verify_failure(exc, options)}") from None
        except ssl.SSLError as exc:
            raise TLSRefused(f"TLS to {label}: {describe_ssl_error(exc)}") from None
        pending = outgoing.read()
        if pending:
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            raw.sendall(pending)
        if done:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"TLS handshake with {label} took longer than its bound")
        raw.settimeout(left)
        data = raw.recv(65536)
        if not data:
            raise TLSRefused(f"TLS to {label}: the server closed the connection during the TLS handshake (is this port TLS?)")
        incoming.write(data)


def describe_verify_failure(exc: ssl.SSLCertVerificationError, options: TLSOptions) -> str:
    code, message = exc.verify_code, exc.verify_message or str(exc)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"the server's certificate has expired ({message})"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return f"the server's certificate is not yet valid ({message})"
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (f"the server's certificate does not name host {options.server_hostname!r} "
                f"(hostname check failed; ssl_check_hostname=false turns it off)")
    return f"the server's certificate is not trusted ({message}; check ssl_ca_certs / ssl_ca_path / ssl_ca_data)"


def describe_ssl_error(exc: ssl.SSLError) -> str:
    reason = (exc.reason or "").upper()
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"):
        return ("the server does not offer TLS 1.3 (TLS 1.2 or older only); sharedpool needs TLS 1.3, "
                "whose record state it can hand to each worker")
    if reason == "WRONG_VERSION_NUMBER":
        return "the server does not speak TLS on this port (a plain redis:// port?)"
    if "CERTIFICATE" in reason or reason.startswith("SSLV3_ALERT") or reason.startswith("TLSV13_ALERT"):
        return f"the server refused the handshake ({exc.reason}; a client certificate needed? ssl_certfile, ssl_keyfile)"
    return f"TLS handshake failed ({exc.reason or exc})"


def refused_after_handshake(exc: TLSRecordError, label: str) -> TLSRefused | None:
    """An alert in answer to our first command: TLS 1.3 servers refuse a client certificate so."""
    text = str(exc)
    if "alert" in text:
        return TLSRefused(f"TLS to {label}: the server refused us after the handshake ({text.split(': ', 1)[-1]}; "
                          f"a client certificate needed or refused? ssl_certfile, ssl_keyfile)")
    return None
