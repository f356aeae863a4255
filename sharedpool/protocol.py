"""The control protocol between a worker and the manager (version 2).

Version 2 is the protocol of the lease table (``table.py``): leases are taken
and given back in shared memory, and this channel carries only what needs
the manager: the table itself, a first fd for a (slot, generation), a slot
to open, a connection to reset or replace, and administration.

Transport
---------
An ``AF_UNIX`` ``SOCK_SEQPACKET`` socket. We chose SEQPACKET over STREAM
because the kernel keeps message boundaries: one ``send`` is one frame, a
passed fd arrives with exactly the frame that carries it, and no length
prefix or reassembly buffer is needed. A frame larger than the receive
buffer is reported with ``MSG_TRUNC`` and refused; lost ancillary data is
reported with ``MSG_CTRUNC`` and refused. Received fds are close-on-exec
(``MSG_CMSG_CLOEXEC``). (Linux only, like SO_PEERCRED.)

Frame
-----
Every frame is an 8-byte header followed by a body::

    byte 0   protocol version (2)
    byte 1   frame type
    byte 2-3 reserved, zero
    byte 4-7 request id: a reply carries the id of its request, so a reply
             to a request its asker gave up on (a signal handler raised
             mid-wait) is recognised and dropped, never taken for the
             answer to the next one. 0 in frames that get no reply.

A frame is at most ``MAX_FRAME`` bytes. Fixed bodies are ``struct`` layouts
in network byte order; rare ones are UTF-8 JSON objects, so fields can be
added without a version bump: readers ignore unknown keys.

A version-1 peer is answered in version-1 framing (a 4-byte header, an
ERROR body ``!HQ`` + text) with a refusal naming both versions.

Types
-----
=====  ===========  =====  ====================================================
code   name         dir    body
=====  ===========  =====  ====================================================
1      HELLO        c->s   JSON ``{"pid": int, "client": str}``. Must be first.
2      WELCOME      s->c   JSON (epoch, pool, db (the default database),
                           databases (those served, as ranges: "0-15"),
                           protocol, redis, manager_pid,
                           max_connections, the table's geometry, limits the
                           client applies), with the table's memfd attached.
3      FETCH_FD     c->s   ``!IIH`` slot, generation, db: "I hold this slot's
                           lock and have no fd of this generation"; refused
                           (STALE) when the slot serves another database
                           (``!II``, without the db, is still accepted).
4      FD           s->c   ``!II`` slot, generation, with one fd (a dup of
                           the slot's Redis socket); for rediss:// then the
                           TLS hand-over (``tls.keys.Handover``: suite and
                           traffic keys). A plain FD is as before: no
                           version change.
5      REPORT       c->s   ``!IIQBB`` slot, generation, lease number, outcome
                           (``Outcome``), cause (0 given back, 1 found its
                           holder gone, 2 its holder's process gives it up
                           with a thread still in it: replace it without
                           waiting for the lock). No reply.
6      DEMAND       c->s   ``!H`` database (empty: the manager's default
                           one): "every open slot of this database is taken;
                           open one, or rebind an idle one of another
                           database". Answered by ACK or ERROR.
7      ERROR        s->c   ``!HQ`` code, lease number (0 when none), then a
                           UTF-8 message for humans.
8      STATS        c->s   empty.
9      STATS_REPLY  s->c   JSON snapshot of the manager's stats.
10     PING         c->s   empty.
11     PONG         s->c   empty.
12     ADMIN        c->s   JSON ``{"command": str, ...}``; answered by
                           ADMIN_REPLY or ERROR.
13     ADMIN_REPLY  s->c   JSON.
14     SITE         c->s   ``!I`` call-site id, then its UTF-8 text: sent once
                           per site, so a row's call-site id can be named.
15     ACK          s->c   empty.
16     PROBE        c->s   JSON ``{"timeout": seconds}``: verify Redis now (a
                           fresh connection, AUTH, PING) for ``sharedpool
                           check``.
17     PROBE_REPLY  s->c   JSON ``{"ok": bool, "error": str, "elapsed_s":
                           float, "redis": str, "pool": str, "open": int,
                           "open_by_db": {"<db>": int}, "databases": str,
                           "default_db": int, "table_core": "c" | "python"}``.
18     NODES        c->s   JSON ``{"refresh": bool, "wait": bool}``: a
                           cluster manager's node list (``--cluster``);
                           ``refresh``: the asker's view of the cluster
                           changed (it followed a MOVED), look again;
                           ``wait``: answer after that look. A manager that
                           serves one Redis answers ERROR ``UNSUPPORTED``.
19     NODES_REPLY  s->c   JSON ``{"version": int, "seed": str, "nodes":
                           [{"index", "addr", "role", "slots", "primary"}]}``.
=====  ===========  =====  ====================================================

Cluster mode: a row's, FETCH_FD's and DEMAND's ``db`` is a node's index
(a cluster has only database 0). WELCOME then also carries ``"cluster":
{"<index>": "host:port"}``: a client checks that the index it asks for is
the node it means, so a restarted manager that numbered the nodes otherwise
is refused (``Misconfigured``), never lent. DEMAND for a node no longer
served is answered ERROR ``REDIS_UNAVAILABLE`` (the connection stays).
Older clients and managers are unaffected: the new types are requests only
a cluster client sends.

Types 64-127 are frames the manager may send unprompted; a client ignores
such types it does not know. A manager answers an unknown type with ERROR
``UNSUPPORTED`` and keeps the connection; a malformed frame of a known type
is answered with ERROR ``MALFORMED`` and the connection is closed.

Semantics
---------
* One control connection per worker process, shared by its threads under a
  lock. A lease belongs to the slot lock its holder took, not to the
  channel: when the channel closes, the manager only sweeps the rows of
  that pid at once (a vanished holder's lock is already free).
* ``epoch`` changes every time a manager starts, and a new manager means a
  new table: a worker that sees a new epoch drops the old table and every
  fd it cached.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from sharedpool.table import Outcome as Outcome  # re-exported: part of the wire format

VERSION = 2
SUPPORTED_VERSIONS = (2,)
MAX_FRAME = 64 * 1024
MAX_SITE = 512

HEADER = struct.Struct("!BBHI")
_SLOT_GEN = struct.Struct("!II")
SLOT_BODY_SIZE = _SLOT_GEN.size  # an FD body longer than this carries a TLS hand-over
_REPORT = struct.Struct("!IIQBB")
_ERROR = struct.Struct("!HQ")
_SITE = struct.Struct("!I")
_DEMAND = struct.Struct("!H")
_V1_HEADER = struct.Struct("!BBH")
_V1_ERROR = 7

# recvmsg ancillary space for the single fd a frame may carry; a little
# extra so that a misbehaving peer sending two fds is seen (MSG_CTRUNC)
# rather than silently truncated into a leak.
FD_ANCILLARY_SPACE = socket.CMSG_SPACE(struct.calcsize("i") * 2)
RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    FETCH_FD = 3
    FD = 4
    REPORT = 5
    DEMAND = 6
    ERROR = 7
    STATS = 8
    STATS_REPLY = 9
    PING = 10
    PONG = 11
    ADMIN = 12
    ADMIN_REPLY = 13
    SITE = 14
    ACK = 15
    PROBE = 16
    PROBE_REPLY = 17
    NODES = 18
    NODES_REPLY = 19


UNSOLICITED_TYPES = range(64, 128)


class ReportCause(enum.IntEnum):
    GIVEN_BACK = 0  # the holder gave it back RESET or BROKEN, and unlocked
    HOLDER_GONE = 1  # a taker found it HELD with its lock free
    ABORTED = 2  # the holder's process gives it up while a thread may still be in it


class ErrorCode(enum.IntEnum):
    MALFORMED = 1
    UNSUPPORTED = 2
    VERSION = 3
    NOT_READY = 4  # a frame other than HELLO before HELLO
    SHUTTING_DOWN = 7
    REDIS_UNAVAILABLE = 8
    FORBIDDEN = 11
    TOO_MANY_CLIENTS = 13
    INTERNAL = 14
    STALE = 16  # FETCH_FD for a generation the slot no longer has


class ProtocolError(Exception):
    """A frame that cannot be decoded. The connection that sent it is done."""


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    code: int
    lease_seq: int
    message: str


@dataclass(frozen=True, slots=True)
class Report:
    slot: int
    generation: int
    lease_seq: int
    outcome: Outcome
    cause: ReportCause


def header(frame_type: FrameType, request_id: int = 0) -> bytes:
    return HEADER.pack(VERSION, frame_type, 0, request_id)


def split(frame: bytes) -> tuple[int, int, int, bytes]:
    """Return (version, type, request id, body) of a received frame.

    A version-1 frame (4-byte header) comes back as version 1 with no body
    worth reading, so the caller can refuse it by version.
    """
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte cap")
    if len(frame) >= 1 and frame[0] == 1:
        return 1, frame[1] if len(frame) > 1 else 0, 0, b""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than its header")
    version, frame_type, _reserved, request_id = HEADER.unpack_from(frame)
    return version, frame_type, request_id, frame[HEADER.size :]


def encode_json(frame_type: FrameType, payload: dict[str, Any], request_id: int = 0) -> bytes:
    data = header(frame_type, request_id) + json.dumps(payload, separators=(",", ":")).encode()
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


def encode_empty(frame_type: FrameType, request_id: int = 0) -> bytes:
    return header(frame_type, request_id)


def encode_slot(frame_type: FrameType, slot: int, generation: int, request_id: int = 0) -> bytes:
    """FETCH_FD and FD."""
    return header(frame_type, request_id) + _SLOT_GEN.pack(slot, generation)


def encode_fetch_fd(slot: int, generation: int, db: int, request_id: int = 0) -> bytes:
    """FETCH_FD naming the database the taker wants: the manager refuses a slot serving another."""
    return header(FrameType.FETCH_FD, request_id) + _SLOT_GEN.pack(slot, generation) + _DEMAND.pack(db)


def decode_fetch_fd(body: bytes) -> tuple[int, int, int | None]:
    """(slot, generation, db); db None from a client that does not name one."""
    if len(body) == _SLOT_GEN.size + _DEMAND.size:
        slot, generation = _SLOT_GEN.unpack_from(body)
        (db,) = _DEMAND.unpack_from(body, _SLOT_GEN.size)
        return int(slot), int(generation), int(db)
    slot, generation = decode_slot(body)
    return slot, generation, None


def decode_slot(body: bytes) -> tuple[int, int]:
    if len(body) != _SLOT_GEN.size:
        raise ProtocolError(f"slot body of {len(body)} bytes, expected {_SLOT_GEN.size}")
    slot, generation = _SLOT_GEN.unpack(body)
    return int(slot), int(generation)


def encode_report(slot: int, generation: int, lease_seq: int, outcome: Outcome, cause: ReportCause) -> bytes:
    return header(FrameType.REPORT) + _REPORT.pack(slot, generation, lease_seq, outcome, cause)


def decode_report(body: bytes) -> Report:
    if len(body) != _REPORT.size:
        raise ProtocolError(f"REPORT body of {len(body)} bytes, expected {_REPORT.size}")
    slot, generation, lease_seq, outcome, cause = _REPORT.unpack(body)
    if outcome not in tuple(Outcome) or cause not in (0, 1, 2):
        raise ProtocolError(f"REPORT outcome {outcome} / cause {cause} out of range")
    return Report(slot, generation, lease_seq, Outcome(outcome), ReportCause(cause))


def encode_demand(db: int) -> bytes:
    return header(FrameType.DEMAND) + _DEMAND.pack(db)


def decode_demand(body: bytes, default_db: int) -> int:
    """The database a DEMAND is for; an empty body (an older client) means the default one."""
    if not body:
        return default_db
    if len(body) != _DEMAND.size:
        raise ProtocolError(f"DEMAND body of {len(body)} bytes, expected 0 or {_DEMAND.size}")
    return int(_DEMAND.unpack(body)[0])


def encode_site(site_id: int, text: str) -> bytes:
    return header(FrameType.SITE) + _SITE.pack(site_id) + text.encode("utf-8")[:MAX_SITE]


def decode_site(body: bytes) -> tuple[int, str]:
    if len(body) < _SITE.size:
        raise ProtocolError(f"SITE body of {len(body)} bytes, expected at least {_SITE.size}")
    (site_id,) = _SITE.unpack_from(body)
    return int(site_id), body[_SITE.size : _SITE.size + MAX_SITE].decode("utf-8", "replace")


def encode_error(code: ErrorCode, message: str, request_id: int = 0, lease_seq: int = 0) -> bytes:
    text = message.encode("utf-8")[: MAX_FRAME - HEADER.size - _ERROR.size]
    return header(FrameType.ERROR, request_id) + _ERROR.pack(code, lease_seq) + text


def decode_error(body: bytes) -> ErrorFrame:
    if len(body) < _ERROR.size:
        raise ProtocolError(f"ERROR body of {len(body)} bytes, expected at least {_ERROR.size}")
    code, lease_seq = _ERROR.unpack_from(body)
    return ErrorFrame(code, lease_seq, body[_ERROR.size :].decode("utf-8", "replace"))


def encode_v1_refusal(message: str) -> bytes:
    """An ERROR a version-1 client can read: it then says why it was refused."""
    return _V1_HEADER.pack(1, _V1_ERROR, 0) + _ERROR.pack(ErrorCode.VERSION, 0) + message.encode()


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

