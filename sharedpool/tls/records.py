"""The TLS 1.3 record layer that a lease holder runs on a passed socket fd.

The manager does the handshake (``tls.handshake``) and hands each process
the application traffic keys once (``tls.keys.Handover``); the two record
sequence numbers travel in the lease table's row (``tls.row``). From then
on whoever holds the slot's lock encrypts and decrypts records itself,
as kernel TLS would (RFC 8446 section 5):

* a record is a 5-byte header (type 23, version 0x0303, length) and an AEAD
  ciphertext of ``content || content type || zero padding``; the nonce is
  the direction's IV xor its sequence number, the additional data the header;
* at most 2**14 bytes of content in a record: longer writes are split, and a
  reader joins records as redis-py reads them.

Anything but application data from the server (a record failing its tag, an
alert, close_notify included, a KeyUpdate or any other handshake message)
raises ``TLSRecordError``, a ``redis.ConnectionError``: the lease ends
broken and the manager replaces the connection. Nothing is ever decrypted
into what redis-py parses unless its tag verified, and a failed layer
refuses all further use, so a nonce is never used twice for two plaintexts.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NoReturn

from sharedpool.errors import TLSRecordError

MAX_PLAINTEXT = 1 << 14
TAG_SIZE = 16
# RFC 8446 5.2: the ciphertext may exceed the plaintext limit by 256 bytes.
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
HEADER = struct.Struct("!BHH")
APPLICATION_DATA = 23
HANDSHAKE = 22
ALERT = 21
CHANGE_CIPHER_SPEC = 20
NEW_SESSION_TICKET = 4
KEY_UPDATE = 24
_SEQ_LIMIT = 1 << 64
# RFC 8446 6: the alerts a server is likely to send a client it refuses.
ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 40: "handshake_failure", 42: "bad_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown", 48: "unknown_ca",
    50: "decode_error", 51: "decrypt_error", 70: "protocol_version", 80: "internal_error", 116: "certificate_required",
}


class Suite(enum.IntEnum):
    """The TLS 1.3 cipher suites we can carry on, by their IANA code."""

    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303

    @property
    def key_size(self) -> int:
        return 16 if self is Suite.TLS_AES_128_GCM_SHA256 else 32

    @property
    def hash_name(self) -> str:
        return "sha384" if self is Suite.TLS_AES_256_GCM_SHA384 else "sha256"


@dataclass(frozen=True, repr=False)
class DirectionKeys:
    """One direction's traffic key and IV (RFC 8446 7.3). Its repr never shows them."""

    key: bytes
    iv: bytes

    def __repr__(self) -> str:
        return f"<DirectionKeys {len(self.key) * 8}-bit key>"


def _aead(suite: Suite, key: bytes) -> object:
    try:
        from cryptography.hazmat.primitives.ciphers import aead
    except ImportError:  # pragma: no cover - config refuses rediss:// first
        raise TLSRecordError("rediss:// needs the cryptography package: pip install 'sharedpool[tls]'") from None
    if suite is Suite.TLS_CHACHA20_POLY1305_SHA256:
        return aead.ChaCha20Poly1305(key)
    return aead.AESGCM(key)


class _Direction:
    __slots__ = ("_aead", "_iv", "_iv_int", "seq")

    def __init__(self, suite: Suite, keys: DirectionKeys, seq: int) -> None:
        self._aead = _aead(suite, keys.key)
        self._iv_int = int.from_bytes(keys.iv, "big")
        self.seq = seq

    def nonce(self) -> bytes:
        seq = self.seq
        if seq >= _SEQ_LIMIT - 1:
            # RFC 8446 5.3: the sequence number must not wrap; a KeyUpdate
            # would be due long before, and we cannot send one.
            raise TLSRecordError("TLS record sequence number exhausted")
        self.seq = seq + 1
        return (self._iv_int ^ seq).to_bytes(12, "big")


class RecordLayer:
    """Both directions of one connection's records, and the bytes read but not yet whole.

    ``send_seq`` and ``recv_seq`` are the next sequence numbers; they are
    what the lease table's row stores between two holders. ``tickets_ok`` lets
    NewSessionTicket messages be skipped: only the manager sets it, while it
    reads the ones the server sends right after the handshake.
    """

    def __init__(self, suite: Suite, client: DirectionKeys, server: DirectionKeys, send_seq: int = 0, recv_seq: int = 0) -> None:
        self.suite = suite
        self._out = _Direction(suite, client, send_seq)
        self._in = _Direction(suite, server, recv_seq)
        self._raw = bytearray()  # ciphertext received, not yet a whole record
        self._plain = bytearray()  # decrypted application data redis-py has not read
        self.broken = ""
        self.tickets_ok = False
        self.tickets_seen = 0

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else "ok"
        return (
            f"<RecordLayer {self.suite.name} send_seq={self._out.seq} recv_seq={self._in.seq} "
            f"buffered={len(self._raw)}+{len(self._plain)} {state}>"
        )

    @property
    def send_seq(self) -> int:
        return self._out.seq

    @property
    def recv_seq(self) -> int:
        return self._in.seq

    def set_seqs(self, send_seq: int, recv_seq: int) -> None:
        """Take up the sequence numbers the last holder left (at the start of a lease)."""
        self._check()
        if self._raw or self._plain:
            self._fail("a lease starts with record bytes left from the last one")
        self._out.seq = send_seq
        self._in.seq = recv_seq

    def pending(self) -> int:
        """Bytes received that no reader has taken: a reply in flight, or part of one."""
        return len(self._raw) + len(self._plain)

    def _check(self) -> None:
        if self.broken:
            raise TLSRecordError(f"TLS connection unusable: {self.broken}")

    def _fail(self, why: str) -> NoReturn:
        self.broken = why
        self._raw.clear()
        self._plain.clear()
        raise TLSRecordError(f"TLS connection unusable: {why}")

    # ----- sending ------------------------------------------------------------

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` as records ready to write, split at 2**14 bytes of content each."""
        self._check()
        view = memoryview(data)
        out = []
        direction = self._out
        cipher = direction._aead
        for start in range(0, max(len(view), 1), MAX_PLAINTEXT):
            chunk = view[start : start + MAX_PLAINTEXT]
            header = HEADER.pack(APPLICATION_DATA, 0x0303, len(chunk) + 1 + TAG_SIZE)
            out.append(header)
            out.append(cipher.encrypt(direction.nonce(), bytes(chunk) + b"\x17", header))  # type: ignore[attr-defined]
        return b"".join(out)

    # ----- receiving ----------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Ciphertext read from the socket; whole records are opened at once."""
        self._check()
        raw = self._raw
        raw += data
        at = 0
        while len(raw) - at >= HEADER.size:
            outer, version, length = HEADER.unpack_from(raw, at)
            if outer != APPLICATION_DATA or version != 0x0303 or not TAG_SIZE < length <= MAX_CIPHERTEXT:
                self._fail(
                    f"a record of outer type {outer}, version {version:#06x}, length {length} "
                    "where TLS 1.3 sends only application data"
                )
            end = at + HEADER.size + length
            if end > len(raw):
                break
            self._open(bytes(raw[at : at + HEADER.size]), bytes(raw[at + HEADER.size : end]))
            at = end
        if at:
            del raw[:at]

    def _open(self, header: bytes, ciphertext: bytes) -> None:
        from cryptography.exceptions import InvalidTag

        direction = self._in
        try:
            inner = direction._aead.decrypt(direction.nonce(), ciphertext, header)  # type: ignore[attr-defined]
        except InvalidTag:
            self._fail("a record failed authentication (tampered, or a sequence number out of step)")
        content = inner.rstrip(b"\0")
        if not content:
            self._fail("a record with no content type")
        kind, body = content[-1], content[:-1]
        if kind == APPLICATION_DATA:
            self._plain += body
        elif kind == ALERT:
            if body[1:2] == b"\x00":
                self._fail("the server closed the TLS session (close_notify)")
            code = body[1] if len(body) > 1 else -1
            self._fail(f"the server sent TLS alert {ALERTS.get(code, code)}")
        elif kind == HANDSHAKE:
            self._handshake_messages(body)
        else:
            self._fail(f"a record of inner content type {kind}")

    def _handshake_messages(self, body: bytes) -> None:
        at = 0
        while at < len(body):
            if len(body) - at < 4:
                self._fail("a handshake message split across records")
            kind = body[at]
            length = int.from_bytes(body[at + 1 : at + 4], "big")
            if kind == NEW_SESSION_TICKET and self.tickets_ok:
                self.tickets_seen += 1
            elif kind == KEY_UPDATE:
                self._fail("the server sent a KeyUpdate (new keys cannot be handed to every holder)")
            else:
                self._fail(f"the server sent handshake message {kind} after the handshake")
            at += 4 + length
        if at != len(body):
            self._fail("a handshake message split across records")

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of decrypted application data ('' when none is whole yet)."""
        plain = self._plain
        if not plain:
            return b""
        data = bytes(plain[:size])
        del plain[:size]
        return data
