"""The control protocol between a worker and the manager.

Transport
---------
An ``AF_UNIX`` ``SOCK_SEQPACKET`` socket. We chose SEQPACKET over STREAM
because the kernel keeps message boundaries: one ``send`` is one frame, a
passed fd arrives with exactly the frame that carries it, and no length
prefix or reassembly buffer is needed. A frame larger than the receive
buffer is reported with ``MSG_TRUNC`` and refused; lost ancillary data is
reported with ``MSG_CTRUNC`` and refused. (Linux only, like SO_PEERCRED.)

Frame
-----
Every frame is a 4-byte header followed by a body::

    byte 0   protocol version (currently 1)
    byte 1   frame type
    byte 2-3 reserved, zero (room for flags without a version bump)

A frame is at most ``MAX_FRAME`` bytes, header included. Hot-path bodies
(ACQUIRE, GRANT, RELEASE) are fixed ``struct`` layouts in network byte
order; rare ones (HELLO, WELCOME, STATS, ADMIN) are UTF-8 JSON objects, so
fields can be added without a version bump: readers ignore unknown keys.

Types
-----
=====  ==========  =====  =====================================================
code   name        dir    body
=====  ==========  =====  =====================================================
1      HELLO       c->s   JSON ``{"pid": int, "client": str}``. Must be first.
2      WELCOME     s->c   JSON ``{"epoch": str, "pool": str, "db": int,
                          "protocol": 2|3, "redis": str, "manager_pid": int,
                          "max_connections": int, "versions": [int]}``
3      ACQUIRE     c->s   ``!I`` timeout in ms (``DEFAULT_TIMEOUT`` = the
                          manager's ``acquire_timeout``), then optionally the
                          UTF-8 place in the worker's code that asked.
4      GRANT       s->c   ``!QIIB`` lease id, slot, generation, flags: bit 0
                          has_fd, bit 1 sticky (the worker may park it); with
                          has_fd, one fd in SCM_RIGHTS (a dup of the
                          slot's Redis socket).
5      RELEASE     c->s   ``!QB`` lease id, outcome (``Outcome``). No reply
                          on success; a refused release gets an ERROR with
                          code ``RELEASE_REFUSED`` naming the lease id.
6      FETCH_FD    c->s   ``!Q`` lease id: "I hold this lease but no copy of
                          its fd"; answered by a GRANT with the fd.
7      ERROR       s->c   ``!HQ`` code, lease id (0 when none), then a UTF-8
                          message for humans.
8      STATS       c->s   empty.
9      STATS_REPLY s->c   JSON snapshot of the manager's stats.
10     PING        c->s   empty.
11     PONG        s->c   empty.
12     ADMIN       c->s   JSON ``{"command": str, ...}``; answered by
                          ADMIN_REPLY or ERROR.
13     ADMIN_REPLY s->c   JSON.
=====  ==========  =====  =====================================================

Types 64-127 are frames the manager sends unprompted; a client ignores
such types it does not know (a future RECALL of sticky leases will be one):

=====  ==========  =====  =====================================================
64     REVOKED     s->c   ``!Q`` lease id, then the reason in UTF-8: the lease
                          was taken back (``max_lease_time``) and its
                          connection shut down.
65     RECALL      s->c   ``!Q`` lease id, on the process's notify channel:
                          give this sticky lease back (at once if parked,
                          else when its current use ends).
=====  ==========  =====  =====================================================

Sticky leases
-------------
A process may open one extra control connection whose HELLO says
``"role": "notify"``; it takes no leases and is read by a background
thread. While it is open, a lease granted while the pool has spare
connections and nobody waits is *sticky* (GRANT flag bit 1): a clean
release may be kept (parked) by the worker instead of sent, and the next
use of it costs no frame at all. The manager sends RECALL on the notify
channel when someone waits and no connection can be opened, and for
leases older than ``sticky_max_age``; the worker then sends the RELEASE on
the channel that holds the lease. WELCOME says ``"sticky": true`` when the
manager allows this. A manager answers an unknown type with ERROR ``UNSUPPORTED`` and
keeps the connection; a malformed frame of a known type is answered with
ERROR ``MALFORMED`` and the connection is closed.

Semantics
---------
* A worker process caches each slot's fd per *generation*. The manager
  sends the fd when it believes the process (by pid) lacks that slot's
  current generation; otherwise the GRANT carries only ids. A worker that
  lacks it anyway (it dropped its copy) asks with FETCH_FD.
* At most one ACQUIRE may be outstanding per control connection; a
  connection may hold several leases.
* A lease belongs to the control connection that acquired it. When that
  connection closes, every lease it held is abandoned: the connection is
  shut down and replaced, because a reply may still be in flight.
* ``epoch`` changes every time a manager starts: a worker that sees a new
  epoch drops every cached fd.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_FRAME = 64 * 1024
DEFAULT_TIMEOUT = 0xFFFFFFFF
MAX_WHERE = 512

HEADER = struct.Struct("!BBH")
_ACQUIRE = struct.Struct("!I")
_GRANT = struct.Struct("!QIIB")
_RELEASE = struct.Struct("!QB")
_LEASE_ID = struct.Struct("!Q")
_ERROR = struct.Struct("!HQ")

# recvmsg ancillary space for the single fd a GRANT may carry; a little
# extra so that a misbehaving peer sending two fds is seen (MSG_CTRUNC)
# rather than silently truncated into a leak.
FD_ANCILLARY_SPACE = socket.CMSG_SPACE(struct.calcsize("i") * 2)


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    ACQUIRE = 3
    GRANT = 4
    RELEASE = 5
    FETCH_FD = 6
    ERROR = 7
    STATS = 8
    STATS_REPLY = 9
    PING = 10
    PONG = 11
    ADMIN = 12
    ADMIN_REPLY = 13
    REVOKED = 64  # unsolicited: !Q lease id, then the reason in UTF-8
    RECALL = 65  # unsolicited, on the notify channel: !Q lease id


UNSOLICITED_TYPES = range(64, 128)


class Outcome(enum.IntEnum):
    CLEAN = 0
    NEEDS_RESET = 1
    BROKEN = 2


_OUTCOMES = tuple(Outcome)  # index = wire value; cheaper than Outcome(value)


class ErrorCode(enum.IntEnum):
    MALFORMED = 1
    UNSUPPORTED = 2
    VERSION = 3
    NOT_READY = 4  # a frame other than HELLO before HELLO
    TIMEOUT = 5
    POOL_FULL = 6  # max_waiting reached
    SHUTTING_DOWN = 7
    REDIS_UNAVAILABLE = 8
    RELEASE_REFUSED = 9
    UNKNOWN_LEASE = 10
    FORBIDDEN = 11
    BUSY = 12  # a second ACQUIRE while one is outstanding
    TOO_MANY_CLIENTS = 13
    INTERNAL = 14
    WORKER_LIMIT = 15  # max_leases_per_worker reached


class ProtocolError(Exception):
    """A frame that cannot be decoded. The connection that sent it is done."""


@dataclass(frozen=True, slots=True)
class Grant:
    lease_id: int
    slot: int
    generation: int
    has_fd: bool
    sticky: bool = False


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    code: int
    lease_id: int
    message: str


_HEADERS = {t: HEADER.pack(VERSION, t, 0) for t in FrameType}


def header(frame_type: FrameType) -> bytes:
    return _HEADERS[frame_type]


def split(frame: bytes) -> tuple[int, int, bytes]:
    """Return (version, type, body) of a received frame."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than its header")
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte cap")
    version, frame_type, _reserved = HEADER.unpack_from(frame)
    return version, frame_type, frame[HEADER.size :]


def encode_json(frame_type: FrameType, payload: dict[str, Any]) -> bytes:
    data = _HEADERS[frame_type] + json.dumps(payload, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ValueError(f"{frame_type.name} frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return data


def decode_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"body is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("body is JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"body is JSON {type(value).__name__}, expected an object")
    return value


def encode_acquire(timeout_ms: int, where: str = "") -> bytes:
    if not 0 <= timeout_ms <= DEFAULT_TIMEOUT:
        raise ValueError(f"timeout_ms {timeout_ms} out of range")
    return _HEADERS[FrameType.ACQUIRE] + _ACQUIRE.pack(timeout_ms) + where.encode()[:MAX_WHERE]


def decode_acquire(body: bytes) -> tuple[int, str]:
    if len(body) < _ACQUIRE.size:
        raise ProtocolError(f"ACQUIRE body of {len(body)} bytes, expected at least {_ACQUIRE.size}")
    (timeout_ms,) = _ACQUIRE.unpack_from(body)
    where = body[_ACQUIRE.size : _ACQUIRE.size + MAX_WHERE].decode("utf-8", "replace")
    return timeout_ms, where


GRANT_HAS_FD = 1
GRANT_STICKY = 2


def encode_grant(lease_id: int, slot: int, generation: int, has_fd: bool, sticky: bool = False) -> bytes:
    flags = (GRANT_HAS_FD if has_fd else 0) | (GRANT_STICKY if sticky else 0)
    return _HEADERS[FrameType.GRANT] + _GRANT.pack(lease_id, slot, generation, flags)


def decode_grant(body: bytes) -> Grant:
    if len(body) != _GRANT.size:
        raise ProtocolError(f"GRANT body of {len(body)} bytes, expected {_GRANT.size}")
    lease_id, slot, generation, flags = _GRANT.unpack(body)
    return Grant(lease_id, slot, generation, bool(flags & GRANT_HAS_FD), bool(flags & GRANT_STICKY))


def encode_release(lease_id: int, outcome: Outcome) -> bytes:
    return _HEADERS[FrameType.RELEASE] + _RELEASE.pack(lease_id, outcome)


def decode_release(body: bytes) -> tuple[int, Outcome]:
    if len(body) != _RELEASE.size:
        raise ProtocolError(f"RELEASE body of {len(body)} bytes, expected {_RELEASE.size}")
    lease_id, outcome = _RELEASE.unpack(body)
    if outcome >= len(_OUTCOMES):
        raise ProtocolError(f"RELEASE outcome {outcome} is not one of 0, 1, 2")
    return lease_id, _OUTCOMES[outcome]


def encode_fetch_fd(lease_id: int) -> bytes:
    return _HEADERS[FrameType.FETCH_FD] + _LEASE_ID.pack(lease_id)


def decode_fetch_fd(body: bytes) -> int:
    if len(body) != _LEASE_ID.size:
        raise ProtocolError(f"FETCH_FD body of {len(body)} bytes, expected {_LEASE_ID.size}")
    (lease_id,) = _LEASE_ID.unpack(body)
    return int(lease_id)


def encode_error(code: ErrorCode, message: str, lease_id: int = 0) -> bytes:
    text = message.encode("utf-8")[: MAX_FRAME - HEADER.size - _ERROR.size]
    return _HEADERS[FrameType.ERROR] + _ERROR.pack(code, lease_id) + text


def decode_error(body: bytes) -> ErrorFrame:
    if len(body) < _ERROR.size:
        raise ProtocolError(f"ERROR body of {len(body)} bytes, expected at least {_ERROR.size}")
    code, lease_id = _ERROR.unpack_from(body)
    return ErrorFrame(code, lease_id, body[_ERROR.size :].decode("utf-8", "replace"))


def encode_revoked(lease_id: int, message: str) -> bytes:
    text = message.encode("utf-8")[: MAX_FRAME - HEADER.size - _LEASE_ID.size]
    return _HEADERS[FrameType.REVOKED] + _LEASE_ID.pack(lease_id) + text


def decode_revoked(body: bytes) -> tuple[int, str]:
    if len(body) < _LEASE_ID.size:
        raise ProtocolError(f"REVOKED body of {len(body)} bytes, expected at least {_LEASE_ID.size}")
    (lease_id,) = _LEASE_ID.unpack_from(body)
    return int(lease_id), body[_LEASE_ID.size :].decode("utf-8", "replace")


def encode_recall(lease_id: int) -> bytes:
    return _HEADERS[FrameType.RECALL] + _LEASE_ID.pack(lease_id)


def decode_recall(body: bytes) -> int:
    if len(body) != _LEASE_ID.size:
        raise ProtocolError(f"RECALL body of {len(body)} bytes, expected {_LEASE_ID.size}")
    (lease_id,) = _LEASE_ID.unpack(body)
    return int(lease_id)


def encode_empty(frame_type: FrameType) -> bytes:
    return _HEADERS[frame_type]


# Plain ints: IntFlag arithmetic is Python code, and this runs per frame.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def check_recv_flags(flags: int) -> None:
    """Refuse a frame the kernel had to cut (data or fds)."""
    if not flags:
        return
    if flags & _MSG_TRUNC:
        raise ProtocolError(f"frame truncated: larger than the {MAX_FRAME}-byte cap")
    if flags & _MSG_CTRUNC:
        raise ProtocolError("ancillary data truncated: more fds than a frame may carry")


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds
