"""Traffic keys: from the handshake's secrets to what a holder is handed.

The manager reads the two application traffic secrets from its own key log
(``SSLContext.keylog_filename`` on a memfd, per connection) and derives each
direction's key and IV with RFC 8446's HKDF-Expand-Label (section 7.1/7.3).
``Handover`` is what a worker is sent once with the fd (the tail of the FD
frame): the suite and both directions' key and IV. The sequence numbers are
not in it: they change with every record and live in the table's row. A
kernel-TLS path would take exactly these (``tls12_crypto_info_*``: key,
salt = IV[:4], iv = IV[4:], rec_seq from the row) and need nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from sharedpool.errors import TLSRecordError
from sharedpool.tls.records import DirectionKeys, RecordLayer, Suite

IV_SIZE = 12
CLIENT_SECRET = "CLIENT_TRAFFIC_SECRET_0"
SERVER_SECRET = "SERVER_TRAFFIC_SECRET_0"
# The FD frame's tail: a version byte (to let the hand-over grow), the suite, two (key, iv).
_HEAD = struct.Struct("!BH")
_VERSION = 1


def hkdf_expand_label(secret: bytes, label: str, length: int, hash_name: str) -> bytes:
    info = struct.pack("!H", length) + _vector(b"tls13 " + label.encode()) + _vector(b"")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def _vector(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def direction_keys(suite: Suite, secret: bytes) -> DirectionKeys:
    if len(secret) != hashlib.new(suite.hash_name).digest_size:
        raise TLSRecordError(f"a traffic secret of {len(secret)} bytes for {suite.name}")
    return DirectionKeys(
        hkdf_expand_label(secret, "key", suite.key_size, suite.hash_name),
        hkdf_expand_label(secret, "iv", IV_SIZE, suite.hash_name),
    )


def secrets_from_keylog(text: str) -> tuple[bytes, bytes]:
    """(client, server) application traffic secrets from one session's NSS key log."""
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in (CLIENT_SECRET, SERVER_SECRET):
            found[parts[0]] = bytes.fromhex(parts[2])
    if CLIENT_SECRET not in found or SERVER_SECRET not in found:
        raise TLSRecordError("the TLS handshake left no TLS 1.3 traffic secrets in its key log")
    return found[CLIENT_SECRET], found[SERVER_SECRET]


@dataclass(frozen=True, repr=False)
class Handover:
    """A connection's suite and traffic keys, as one holder process needs them. No repr of the keys."""

    suite: Suite
    client: DirectionKeys
    server: DirectionKeys

    def __repr__(self) -> str:
        return f"<Handover {self.suite.name}>"

    def layer(self, send_seq: int = 0, recv_seq: int = 0) -> RecordLayer:
        return RecordLayer(self.suite, self.client, self.server, send_seq, recv_seq)

    def encode(self) -> bytes:
        parts = [_HEAD.pack(_VERSION, self.suite)]
        for keys in (self.client, self.server):
            parts.append(bytes([len(keys.key)]) + keys.key + keys.iv)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Handover:
        try:
            version, code = _HEAD.unpack_from(data)
            suite = Suite(code)
            at = _HEAD.size
            pair = []
            for _ in range(2):
                size = data[at]
                key, iv = data[at + 1 : at + 1 + size], data[at + 1 + size : at + 1 + size + IV_SIZE]
                at += 1 + size + IV_SIZE
                pair.append(DirectionKeys(key, iv))
        except (struct.error, ValueError, IndexError):
            raise TLSRecordError("a malformed TLS hand-over from the manager") from None
        if version != _VERSION or at != len(data) or any(len(k.key) != suite.key_size or len(k.iv) != IV_SIZE for k in pair):
            raise TLSRecordError("a malformed TLS hand-over from the manager")
        return cls(suite, pair[0], pair[1])
