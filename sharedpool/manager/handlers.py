"""What the manager answers to each frame type (the table at the bottom).

Each handler gets the manager, the control connection, the request id and
the frame's body; it may raise ``protocol.ProtocolError``, which closes that
connection (``control.py``).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sharedpool import protocol, stat_keys
from sharedpool import table as tbl
from sharedpool.db_ranges import format_databases
from sharedpool.manager.actions import Action
from sharedpool.manager.backend import describe_error, probe
from sharedpool.manager.control import Peer, PeerState
from sharedpool.manager.pool_state import ReapCause, SlotState
from sharedpool.manager.sentinel import probe_master
from sharedpool.protocol import ErrorCode, FrameType
from sharedpool.table import Outcome, RowState
from sharedpool.table import core as table_core
from sharedpool.version import __version__

if TYPE_CHECKING:
    from sharedpool.manager.context import ManagerContext

log = logging.getLogger("sharedpool.manager")

# Per-worker rows in a STATS reply: ~100 bytes each, well inside MAX_FRAME.
_STATS_WORKER_ROWS = 300


def welcome(manager: ManagerContext) -> dict[str, Any]:
    config, target, table = manager.config, manager.target, manager.keeper.table
    return {
        "epoch": manager.epoch,
        "pool": config.pool_name,
        "db": manager.pool.limits.default_db,
        "databases": format_databases(manager.pool.limits.databases),
        "protocol": target.protocol,
        "redis": target.label,
        "manager_pid": os.getpid(),
        "max_connections": config.max_connections,
        "versions": list(protocol.SUPPORTED_VERSIONS),
        "server": f"sharedpool/{__version__}",
        "table": {"capacity": table.capacity, "waiter_capacity": table.waiter_capacity, "layout": tbl.LAYOUT_VERSION},
        "acquire_timeout": config.acquire_timeout,
        "max_lease_time": config.max_lease_time,
        "max_leases_per_worker": config.max_leases_per_worker,
    } | ({"cluster": {str(n["index"]): n["addr"] for n in manager.cluster.map.describe()}} if manager.cluster else {})


def on_hello(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    if client.state is not PeerState.HANDSHAKE:
        raise protocol.ProtocolError("HELLO sent twice")
    hello = protocol.decode_json(body)
    claimed = hello.get("pid")
    if claimed != client.pid:
        log.debug("HELLO claims pid %r, peer credentials say %d; using the latter", claimed, client.pid)
    manager.control.admitted(client)
    frame = protocol.encode_json(FrameType.WELCOME, welcome(manager), request_id)
    try:
        client.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [manager.keeper.table.fd]))])
    except OSError as exc:
        manager.control.drop(client, f"WELCOME undeliverable ({exc.strerror or exc})", sweep=False)


def on_fetch_fd(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    index, generation, db = protocol.decode_fetch_fd(body)
    slot = manager.pool.slot(index, generation)
    if slot is None or slot.state is not SlotState.SHARED or slot.backend is None:
        manager.counters[stat_keys.STALE_FETCHES] += 1
        manager.control.send(client, protocol.encode_error(
            ErrorCode.STALE, f"slot {index} generation {generation} is not open (replaced or closed)", request_id))
        return
    if db is not None and db != slot.db:
        # The row's database byte said db (scribbled): this connection serves another.
        manager.counters[stat_keys.STALE_FETCHES] += 1
        manager.control.send(client, protocol.encode_error(
            ErrorCode.STALE, f"slot {index} generation {generation} serves db {slot.db}, not db {db}", request_id))
        return
    frame = protocol.encode_slot(FrameType.FD, index, generation, request_id)
    if slot.backend.handover is not None:
        frame += slot.backend.handover.encode()  # rediss://: the keys, only here and only to an admitted peer
    try:
        client.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [slot.backend.fileno]))])
        manager.counters[stat_keys.FDS_SENT] += 1
    except OSError as exc:
        manager.control.drop(client, f"fd undeliverable ({exc.strerror or exc})")


def on_report(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    report = protocol.decode_report(body)
    pool, keeper, table = manager.pool, manager.keeper, manager.keeper.table
    slot = pool.slot(report.slot, report.generation)
    if slot is None or slot.state is not SlotState.SHARED:
        return  # already repaired (the sweep was first), or a stale report
    now = time.monotonic()
    if report.cause is protocol.ReportCause.ABORTED:
        # Its holder still has the lock and may be blocked on the socket:
        # shutting the connection down is what wakes it.
        try:
            row = table.row(report.slot)
        except tbl.RowError:
            return
        if row.state is RowState.HELD and row.holder_pid == client.pid and row.generation == report.generation:
            # Its lock is held: asked back and shut down, replaced when the
            # holder gives it back or its lock goes with the process.
            counter = stat_keys.reaped_key(ReapCause.HOLDER_CLOSED.value)
            manager.perform(pool.revoke(report.slot, report.generation, row.lease_seq, counter))
        return
    if not keeper.try_lock(report.slot, report.generation):
        # Someone is on it right now (a taker checking it): look again soon.
        manager.sweep_soon(now + 0.05)
        return
    try:
        found: tbl.Row | None = table.row(report.slot)
    except tbl.RowError:
        found = None
    if found is None or found.generation != report.generation or found.state not in (RowState.RESET, RowState.BROKEN):
        keeper.unlock(report.slot)
        return
    outcome = Outcome.BROKEN if found.state is RowState.BROKEN else Outcome.NEEDS_RESET
    cause = ReapCause.HOLDER_CLOSED if report.cause is protocol.ReportCause.HOLDER_GONE else None
    manager.perform(pool.given_back(report.slot, report.generation, outcome, now, cause))
    manager.redispatch(now)


def on_demand(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    now = time.monotonic()
    pool = manager.pool
    db = protocol.decode_demand(body, pool.limits.default_db)
    cluster_refusal = manager.cluster.refusal(db, now) if manager.cluster is not None else ""
    if cluster_refusal:
        # The node left the cluster, or is down: its redis-py cluster client takes
        # this as a node error and refreshes its own view.
        manager.control.send(client, protocol.encode_error(ErrorCode.REDIS_UNAVAILABLE, cluster_refusal, request_id))
        return
    if not pool.serves(db):
        # The client checked the served list at WELCOME: this one did not.
        raise protocol.ProtocolError(f"DEMAND for db {db}, which is not served ({format_databases(pool.limits.databases)})")
    refusal = pool.demanded(now, db)
    if refusal:
        code = ErrorCode.SHUTTING_DOWN if manager.pool.shutting_down else ErrorCode.REDIS_UNAVAILABLE
        manager.control.send(client, protocol.encode_error(code, refusal, request_id))
    else:
        manager.control.send(client, protocol.encode_empty(FrameType.ACK, request_id))
    manager.redispatch(now)
    if pool.rebind_wanted:
        # Nothing can be opened: the sweep, right after this batch of
        # events, offers the idle slots of other databases for rebinding.
        manager.sweep_soon(now)


def on_site(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    site_id, text = protocol.decode_site(body)
    manager.pool.note_site(client.pid, site_id, text)


def on_probe(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    request = protocol.decode_json(body)
    timeout = request.get("timeout", 2.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        raise protocol.ProtocolError("PROBE needs a 'timeout' in seconds, above 0 and at most 60")
    target = manager.target
    started = time.monotonic()

    def done(now: float, future: Future[str]) -> list[Action]:
        try:
            error = future.result()
        except Exception as exc:  # reported, never raised
            error = describe_error(exc)
        if "max number of clients" in error:
            log.warning("Redis at %s refuses new connections: %s", target.label, error)
        if client.state is PeerState.READY:
            manager.control.send(client, protocol.encode_json(FrameType.PROBE_REPLY, {
                "ok": not error, "error": error, "elapsed_s": round(now - started, 4),
                "redis": target.label, "pool": manager.config.pool_name, "open": manager.pool.open_connections,
                "open_by_db": {str(db): count for db, count in manager.pool.open_by_db().items()},
                "databases": format_databases(manager.pool.limits.databases), "default_db": manager.pool.limits.default_db,
                "table_core": table_core.PATH,
                **({stat_keys.SENTINEL: manager.sentinel.describe()} if manager.sentinel is not None else {}),
            }, request_id))
        return []

    if manager.sentinel is not None:
        settings, base = manager.sentinel.settings, manager.sentinel.base_target
        manager.submit(lambda: probe_master(settings, base, float(timeout)), done)
        return
    manager.submit(lambda: probe(target, float(timeout)), done)


def on_stats(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    snapshot = manager.snapshot(max_workers=_STATS_WORKER_ROWS)
    manager.control.send(client, protocol.encode_json(FrameType.STATS_REPLY, snapshot, request_id))


def on_ping(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    manager.control.send(client, protocol.encode_empty(FrameType.PONG, request_id))


def on_admin(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    request = protocol.decode_json(body)
    command = request.get("command")
    if client.uid not in (os.getuid(), 0):
        log.warning(
            "refused admin command %r from pid %d uid %d: not the manager's uid or root", command, client.pid, client.uid
        )
        manager.control.send(client, protocol.encode_error(
            ErrorCode.FORBIDDEN, f"admin commands are for uid {os.getuid()} and root, not uid {client.uid}", request_id))
        return
    now = time.monotonic()
    reply: dict[str, Any] = {"command": command, "ok": True}
    if command == "reap":
        pid = request.get("pid")
        if not isinstance(pid, int):
            raise protocol.ProtocolError("admin reap needs an integer 'pid'")
        reply["reaped"] = manager.reap_pid(pid, now)
    elif command == "pause":
        manager.pool.pause()
        manager.keeper.sync_flags(manager.pool)
        log.info("paused by pid %d: no leases until resume", client.pid)
    elif command == "resume":
        log.info("resumed by pid %d", client.pid)
        manager.perform(manager.pool.resume())
    elif command == "reconnect":
        log.info("reconnect requested by pid %d: replacing every connection", client.pid)
        manager.perform(manager.pool.retire_all())
        manager.reaper.sweep(now)
    elif command == "reload":
        reply["result"] = manager.reload()
    elif command == "shutdown":
        log.info("shutdown requested by pid %d", client.pid)
        manager.stop()
    else:
        manager.control.send(
            client, protocol.encode_error(ErrorCode.UNSUPPORTED, f"unknown admin command {command!r}", request_id)
        )
        return
    manager.control.send(client, protocol.encode_json(FrameType.ADMIN_REPLY, reply, request_id))


def on_nodes(manager: ManagerContext, client: Peer, request_id: int, body: bytes) -> None:
    request = protocol.decode_json(body)
    cluster = manager.cluster
    if cluster is None:
        manager.control.send(client, protocol.encode_error(
            ErrorCode.UNSUPPORTED, "this manager serves one Redis, not a cluster (start it with --cluster)", request_id))
        return

    def reply() -> None:
        if client.state is PeerState.READY:
            manager.control.send(client, protocol.encode_json(FrameType.NODES_REPLY, cluster.stats(), request_id))

    now = time.monotonic()
    if request.get("wait"):
        cluster.refresh(now, reply)
        return
    if request.get("refresh"):
        cluster.refresh(now)
    reply()


Handler = Callable[["ManagerContext", Peer, int, bytes], None]

HANDLERS: dict[int, Handler] = {
    FrameType.ADMIN: on_admin,
    FrameType.HELLO: on_hello,
    FrameType.FETCH_FD: on_fetch_fd,
    FrameType.REPORT: on_report,
    FrameType.DEMAND: on_demand,
    FrameType.SITE: on_site,
    FrameType.STATS: on_stats,
    FrameType.PROBE: on_probe,
    FrameType.PING: on_ping,
    FrameType.NODES: on_nodes,
}
