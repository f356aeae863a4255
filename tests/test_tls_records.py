"""The TLS 1.3 record layer on its own: no server, records built independently here.

The peer's records are sealed in this file straight from RFC 8446 5.2 with
``cryptography`` (not through ``RecordLayer``), so a mistake shared by
both directions of the layer would still show.
"""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import aead

from sharedpool.errors import TLSRecordError
from sharedpool.tls.keys import Handover, direction_keys, hkdf_expand_label, secrets_from_keylog
from sharedpool.tls.records import MAX_PLAINTEXT, DirectionKeys, RecordLayer, Suite

SUITES = list(Suite)


def keys_for(suite: Suite) -> tuple[DirectionKeys, DirectionKeys]:
    size = 48 if suite is Suite.TLS_AES_256_GCM_SHA384 else 32
    return direction_keys(suite, os.urandom(size)), direction_keys(suite, os.urandom(size))


def server_record(suite: Suite, keys: DirectionKeys, seq: int, content: bytes, kind: int = 23, padding: int = 0) -> bytes:
    cipher = aead.ChaCha20Poly1305(keys.key) if suite is Suite.TLS_CHACHA20_POLY1305_SHA256 else aead.AESGCM(keys.key)
    nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
    inner = content + bytes([kind]) + b"\0" * padding
    header = struct.pack("!BHH", 23, 0x0303, len(inner) + 16)
    return header + cipher.encrypt(nonce, inner, header)


def open_client_records(suite: Suite, keys: DirectionKeys, data: bytes, first_seq: int = 0) -> list[bytes]:
    cipher = aead.ChaCha20Poly1305(keys.key) if suite is Suite.TLS_CHACHA20_POLY1305_SHA256 else aead.AESGCM(keys.key)
    out, at, seq = [], 0, first_seq
    while at < len(data):
        outer, version, length = struct.unpack_from("!BHH", data, at)
        assert (outer, version) == (23, 0x0303)
        header, body = data[at : at + 5], data[at + 5 : at + 5 + length]
        nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
        inner = cipher.decrypt(nonce, body, header)
        assert inner[-1] == 23
        out.append(inner[:-1])
        at += 5 + length
        seq += 1
    return out


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_both_directions_round_trip_with_every_suite(suite: Suite) -> None:
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server)
    sent = layer.seal(b"*1\r\n$4\r\nPING\r\n")
    assert open_client_records(suite, client, sent) == [b"*1\r\n$4\r\nPING\r\n"]
    layer.feed(server_record(suite, server, 0, b"+PONG\r\n", padding=5))
    assert layer.take(100) == b"+PONG\r\n"
    assert (layer.send_seq, layer.recv_seq) == (1, 1)


def test_large_values_are_split_at_16_kb_and_joined() -> None:
    suite = Suite.TLS_AES_128_GCM_SHA256
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server, send_seq=7, recv_seq=3)
    value = os.urandom(40_000)
    records = open_client_records(suite, client, layer.seal(value), first_seq=7)
    assert [len(r) for r in records] == [MAX_PLAINTEXT, MAX_PLAINTEXT, 40_000 - 2 * MAX_PLAINTEXT]
    assert b"".join(records) == value
    wire = b"".join(server_record(suite, server, 3 + i, value[i * 10_000 : (i + 1) * 10_000]) for i in range(4))
    got = b""
    for start in range(0, len(wire), 777):  # bytes as TCP may cut them: mid-header, mid-tag
        layer.feed(wire[start : start + 777])
        got += layer.take(1 << 20)
    assert got == value and layer.recv_seq == 7 and layer.pending() == 0


def test_a_flipped_byte_breaks_the_layer_and_yields_nothing() -> None:
    suite = Suite.TLS_AES_256_GCM_SHA384
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server)
    record = bytearray(server_record(suite, server, 0, b"$5\r\nhello\r\n"))
    record[9] ^= 0x01
    with pytest.raises(TLSRecordError, match="failed authentication"):
        layer.feed(bytes(record))
    assert layer.take(100) == b""
    # Broken for good: no further record is opened, none is sealed (no nonce used again).
    with pytest.raises(TLSRecordError):
        layer.feed(server_record(suite, server, 1, b"+OK\r\n"))
    with pytest.raises(TLSRecordError):
        layer.seal(b"PING\r\n")


def test_a_sequence_number_out_of_step_is_an_authentication_failure() -> None:
    suite = Suite.TLS_CHACHA20_POLY1305_SHA256
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server, recv_seq=4)
    with pytest.raises(TLSRecordError, match="failed authentication"):
        layer.feed(server_record(suite, server, 5, b"+OK\r\n"))


@pytest.mark.parametrize(
    ("kind", "content", "why"),
    [
        (21, b"\x01\x00", "close_notify"),
        (21, b"\x02\x74", "certificate_required"),
        (22, b"\x18\x00\x00\x01\x00", "KeyUpdate"),
        (22, b"\x04\x00\x00\x02ab", "handshake message 4"),  # a ticket outside the manager's first reads
        (22, b"\x0d\x00\x00\x00", "handshake message 13"),
        (20, b"\x01", "content type 20"),
    ],
    ids=["close_notify", "alert", "key_update", "late_ticket", "certificate_request", "ccs"],
)
def test_anything_but_application_data_breaks_the_layer(kind: int, content: bytes, why: str) -> None:
    suite = Suite.TLS_AES_128_GCM_SHA256
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server)
    layer.feed(server_record(suite, server, 0, b"+OK\r\n"))
    with pytest.raises(TLSRecordError, match=why):
        layer.feed(server_record(suite, server, 1, content, kind=kind))
    assert layer.take(100) == b"" and layer.broken  # what came before is dropped too: the lease is broken


def test_the_manager_may_skip_session_tickets() -> None:
    suite = Suite.TLS_AES_128_GCM_SHA256
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server)
    layer.tickets_ok = True
    layer.feed(server_record(suite, server, 0, b"\x04\x00\x00\x03abc", kind=22) + server_record(suite, server, 1, b"+PONG\r\n"))
    assert layer.take(100) == b"+PONG\r\n" and layer.tickets_seen == 1


def test_a_plaintext_or_foreign_record_header_breaks_the_layer() -> None:
    suite = Suite.TLS_AES_128_GCM_SHA256
    layer = RecordLayer(suite, *keys_for(suite))
    with pytest.raises(TLSRecordError, match="outer type"):
        layer.feed(b"+OK\r\n")


def test_a_new_lease_refuses_bytes_left_by_the_last_one() -> None:
    suite = Suite.TLS_AES_128_GCM_SHA256
    client, server = keys_for(suite)
    layer = RecordLayer(suite, client, server)
    layer.feed(server_record(suite, server, 0, b"+OK\r\n")[:10])
    assert layer.pending() == 10
    with pytest.raises(TLSRecordError, match="left from the last"):
        layer.set_seqs(1, 1)


def test_hkdf_expand_label_matches_rfc_8448() -> None:
    # RFC 8448 section 3 (simple 1-RTT handshake): the server's application traffic secret and its key and IV.
    secret = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    assert hkdf_expand_label(secret, "key", 16, "sha256").hex() == "9f02283b6c9c07efc26bb9f2ac92e356"
    assert hkdf_expand_label(secret, "iv", 12, "sha256").hex() == "cf782b88dd83549aadf1e984"


def test_handover_round_trips_and_shows_no_key() -> None:
    suite = Suite.TLS_AES_256_GCM_SHA384
    client, server = keys_for(suite)
    handover = Handover(suite, client, server)
    again = Handover.decode(handover.encode())
    assert again == handover
    assert client.key.hex() not in repr(handover) + repr(again.layer()) + repr(client)
    with pytest.raises(TLSRecordError, match="malformed"):
        Handover.decode(handover.encode()[:-1])


def test_keylog_secrets_are_picked_by_label() -> None:
    log = "# comment\nCLIENT_HANDSHAKE_TRAFFIC_SECRET aa 00\nCLIENT_TRAFFIC_SECRET_0 aa 0102\nSERVER_TRAFFIC_SECRET_0 aa 0304\n"
    assert secrets_from_keylog(log) == (b"\x01\x02", b"\x03\x04")
    with pytest.raises(TLSRecordError, match="no TLS 1.3 traffic secrets"):
        secrets_from_keylog("CLIENT_RANDOM aa bb\n")
