"""Sentinel: the manager finds the master through the Sentinels and follows failovers.

Given ``sentinels`` and ``sentinel_service``, the master's address is not
in ``redis_url`` (its password, username and database still are): the
manager asks the Sentinels (``SENTINEL MASTER``: the address
``get-master-addr-by-name`` gives, and the config epoch; each within
``sentinel_timeout``), and believes the address named with the highest
epoch once the address itself says ``ROLE`` master. Every connection it
opens is checked the same way before it is lent, so a lease never goes to
a replica the Sentinels have not caught up with.

It checks again when a Sentinel says ``+switch-master`` (a thread keeps a
subscription on one Sentinel, moving on to the next when that one fails,
and checks again on each new subscription: a switch may have happened
while it had none), when opening a connection fails, when Redis closes
one, and every ``_RECHECK_EVERY`` seconds in case all of that was missed.

A failover (the master is another address) drains every connection to the
old one: idle ones at once, leased ones when they come back (their rows
are told to give them back for replacement, as for ``max_lifetime``), and
a lease still held ``redis_timeout`` later is revoked (shut down, as for
``max_lease_time``). Workers change nothing: their next lease is on a
connection to the new master.

Blocking I/O (the queries, the ROLE check) runs in the loop's thread pool
or in the subscription thread, never in the loop; their results come back
to the loop, which alone changes the manager's state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.connection import Connection

from sharedpool import stat_keys
from sharedpool import table as tbl
from sharedpool.config import ManagerConfig
from sharedpool.config_values import format_addresses
from sharedpool.manager.actions import Action
from sharedpool.manager.backend import RedisTarget, describe_error, probe
from sharedpool.manager.slot import ReapCause, SlotState
from sharedpool.table import RowState

if TYPE_CHECKING:
    from sharedpool.manager.context import ManagerContext

log = logging.getLogger("sharedpool.manager")

Address = tuple[str, int]

# A safety net under the subscription and the error-driven checks.
_RECHECK_EVERY = 10.0
# The subscription thread: how long one read waits (and so how soon it sees a stop),
# how often it PINGs its Sentinel, and its pause before trying the next one.
_READ_WAIT = 0.5
_PING_EVERY = 2.0
_RETRY_PAUSE = 0.5
_SWITCH_CHANNEL = "+switch-master"


class MasterUnknown(redis.ConnectionError):
    """No Sentinel named a master that says it is one; the message says what each answered."""


class NotMaster(redis.ConnectionError):
    """A server the Sentinels named (or a connection to it) answers ROLE as a replica."""


@dataclass(frozen=True)
class SentinelSettings:
    addresses: tuple[Address, ...]
    service: str
    username: str
    password: str
    timeout: float

    @classmethod
    def from_config(cls, config: ManagerConfig) -> SentinelSettings:
        return cls(config.sentinels, config.sentinel_service, config.sentinel_username, config.sentinel_password,
                   config.sentinel_timeout)

    def connection(self, address: Address) -> Connection:
        host, port = address
        return Connection(
            host=host, port=port, username=self.username or None, password=self.password or None,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout, decode_responses=True,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            # RESP2: a subscription's messages are plain replies to read, not RESP3 pushes
            # that redis-py hands to a push handler while it waits for a reply.
            protocol=2,
        )

    def __repr__(self) -> str:  # never the password
        return f"<SentinelSettings {self.service!r} at {format_addresses(self.addresses)}>"


def target_at(target: RedisTarget, address: Address) -> RedisTarget:
    """``target`` (redis_url's password, username, options) pointed at ``address``."""
    host, port = address
    return dataclasses.replace(target, kwargs=dict(target.kwargs, host=host, port=port), label=f"{host}:{port}")


def unresolved(target: RedisTarget, service: str) -> RedisTarget:
    """redis_url's target before the Sentinels have named the master: its label says so."""
    return dataclasses.replace(target, label=f"sentinel service {service!r}")


def check_role(conn: Connection) -> None:
    """Raise ``NotMaster`` unless the connection's server says ROLE master."""
    conn.send_command("ROLE", check_health=False)
    reply = conn.read_response()
    role = reply[0] if isinstance(reply, (list, tuple)) and reply else reply
    if isinstance(role, bytes):
        role = role.decode(errors="replace")
    if role != "master":
        raise NotMaster(f"{conn.host}:{conn.port} answers ROLE {role!r}, not master")


def find_master(settings: SentinelSettings, target: RedisTarget) -> Address:
    """Ask every Sentinel; return the address named with the highest config epoch that says ROLE master.

    ``SENTINEL MASTER`` rather than ``get-master-addr-by-name``: it gives the
    same address plus the config epoch, which every failover raises. Right
    after a failover a Sentinel that has not heard of it yet still names the
    old master, and that server still says ROLE master until the Sentinels
    demote it (seconds later): trusting the first answer would move the
    manager back to it. Each query and each ROLE check is bounded
    (``sentinel_timeout``, ``redis_timeout``).
    """
    heard: list[str] = []
    named: dict[Address, int] = {}  # address -> the highest config epoch any Sentinel named it with
    for address in settings.addresses:
        where = format_addresses((address,))
        conn = settings.connection(address)
        try:
            conn.send_command("SENTINEL", "MASTER", settings.service, check_health=False)
            reply = conn.read_response()
            fields = dict(zip(reply[::2], reply[1::2], strict=False)) if isinstance(reply, list) else dict(reply)
            candidate = (str(fields["ip"]), int(fields["port"]))
            epoch = int(fields.get("config-epoch", 0))
        except (redis.RedisError, KeyError, TypeError, ValueError) as exc:
            heard.append(f"{where}: {describe_error(exc)}")
            continue
        finally:
            conn.disconnect()
        named[candidate] = max(epoch, named.get(candidate, -1))
    for candidate, epoch in sorted(named.items(), key=lambda item: -item[1]):
        located = target_at(target, candidate)
        conn = located.connection_class()(**located.kwargs)
        try:
            conn.connect()
            check_role(conn)
        except redis.RedisError as exc:
            heard.append(f"{format_addresses((candidate,))} (config epoch {epoch}): {describe_error(exc)}")
            continue
        finally:
            conn.disconnect()
        return candidate
    raise MasterUnknown(f"no Sentinel named a master of {settings.service!r} that says so: " + "; ".join(heard))


def probe_master(settings: SentinelSettings, target: RedisTarget, timeout: float) -> str:
    """``sharedpool check`` in Sentinel mode: ask the Sentinels now, then PING what they name.
    Returns an error text, or ''."""
    quick = dataclasses.replace(target, kwargs=dict(target.kwargs, socket_timeout=timeout, socket_connect_timeout=timeout))
    try:
        address = find_master(settings, quick)
    except MasterUnknown as exc:
        return str(exc)
    return probe(target_at(quick, address), timeout)


class SwitchWatch(threading.Thread):
    """Keeps a ``+switch-master`` subscription on one of the Sentinels; ``hint(reason)`` on
    each message and each new subscription. Runs until ``stop()``; never raises."""

    def __init__(self, settings: SentinelSettings, hint: Callable[[str], None]) -> None:
        super().__init__(name="sharedpool-sentinel", daemon=True)
        self._settings = settings
        self._hint = hint
        self._stopping = threading.Event()
        self.subscribed_to = ""  # read by stats (a str swap is atomic)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            for address in self._settings.addresses:
                if self._stopping.is_set():
                    return
                try:
                    self._follow(address)
                except (redis.RedisError, OSError, ValueError) as exc:
                    if self.subscribed_to:
                        log.warning("lost the Sentinel subscription at %s: %s", self.subscribed_to, describe_error(exc))
                    else:
                        log.debug("Sentinel %s: %s", format_addresses((address,)), describe_error(exc))
                except Exception:  # this thread must outlive any surprise; the periodic check covers meanwhile
                    log.exception("Sentinel subscription failed")
                self.subscribed_to = ""
                self._stopping.wait(_RETRY_PAUSE)

    def _follow(self, address: Address) -> None:
        conn = self._settings.connection(address)
        try:
            conn.connect()
            conn.send_command("SUBSCRIBE", _SWITCH_CHANNEL, check_health=False)
            conn.read_response()  # the subscribe confirmation
            self.subscribed_to = format_addresses((address,))
            log.info("following %s on Sentinel %s", _SWITCH_CHANNEL, self.subscribed_to)
            self._hint(f"subscribed to Sentinel {self.subscribed_to}")
            heard_at = next_ping = time.monotonic()
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    conn.send_command("PING", check_health=False)
                    next_ping = now + _PING_EVERY
                if now - heard_at > _PING_EVERY + self._settings.timeout + _READ_WAIT:
                    raise redis.TimeoutError(f"no answer to PING within {now - heard_at:.1f} s")
                if not conn.can_read(timeout=_READ_WAIT):
                    continue
                message = conn.read_response()
                heard_at = time.monotonic()
                if isinstance(message, list) and len(message) >= 3 and message[0] == "message":
                    # "<name> <old ip> <old port> <new ip> <new port>", for every master the Sentinel watches.
                    if str(message[2]).split(" ", 1)[0] == self._settings.service:
                        self._hint(f"{_SWITCH_CHANNEL} {message[2]}")
        finally:
            conn.disconnect()


class SentinelMonitor:
    """The loop's side: the current master, the failover count, and the drain of the old master."""

    def __init__(self, manager: ManagerContext, settings: SentinelSettings) -> None:
        self._manager = manager
        self.settings = settings
        self.base_target = manager.target  # redis_url's: everything but the address
        self.master: Address | None = None
        self.last_error = ""
        self._checking = False
        self._check_again = ""
        self._next_check = 0.0
        # Slots whose connection was opened to a previous master: index -> generation.
        self._draining: dict[int, int] = {}
        self._revoke_at = 0.0
        self._watch = SwitchWatch(settings, lambda reason: manager.call_soon(lambda now: self.recheck(reason, now)))

    def __repr__(self) -> str:
        master = format_addresses((self.master,)) if self.master else "unknown"
        return (f"<SentinelMonitor {self.settings.service!r} master {master}, "
                f"{self.failovers} failovers, {len(self._draining)} draining>")

    @property
    def failovers(self) -> int:
        return self._manager.pool.counters[stat_keys.FAILOVERS]

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop()

    def describe(self) -> dict[str, Any]:
        """The ``sentinel`` section of stats and of ``check``."""
        return {
            "service": self.settings.service,
            "master": format_addresses((self.master,)) if self.master else None,
            "failovers": self.failovers,
            "sentinels": format_addresses(self.settings.addresses),
            "subscribed_to": self._watch.subscribed_to or None,
            "draining": len(self._draining),
            "last_error": self.last_error,
        }

    def rebase(self, target: RedisTarget) -> RedisTarget:
        """A reload changed redis_url (password, database): keep the master's address."""
        self.base_target = target
        return target_at(target, self.master) if self.master else unresolved(target, self.settings.service)

    # ----- opening: the worker thread's side -----------------------------------

    def opening(self) -> Callable[[], tuple[RedisTarget, Address]]:
        """For a connection about to be opened: a callable (run in the thread pool) that
        returns the target to open and its address, asking the Sentinels if no master is known yet."""
        master, settings, base = self.master, self.settings, self.base_target

        def where() -> tuple[RedisTarget, Address]:
            address = master or find_master(settings, base)
            return target_at(base, address), address

        return where

    def opened(self, address: Address, now: float) -> None:
        """A connection to ``address`` was opened and said ROLE master (the loop's side)."""
        if self.master is None:
            self._adopt(address, "first connection", now)
        elif address != self.master:
            raise NotMaster(f"opened to {format_addresses((address,))}, but the master is now {format_addresses((self.master,))}")

    # ----- checking ---------------------------------------------------------------

    def recheck(self, reason: str, now: float) -> list[Action]:
        """Ask the Sentinels again (one question at a time; a reason that comes meanwhile asks once more after)."""
        if self._checking:
            self._check_again = self._check_again or reason
            return []
        self._checking = True
        self._next_check = now + _RECHECK_EVERY
        settings, base = self.settings, self.base_target

        def done(now: float, future: Future[Address]) -> list[Action]:
            self._checking = False
            try:
                address = future.result()
            except Exception as exc:  # reported, never raised: the manager outlives any Sentinel trouble
                error = describe_error(exc)
                if error != self.last_error:
                    log.warning("Sentinel check (%s) failed: %s", reason, error)
                self.last_error = error
            else:
                self.last_error = ""
                self._adopt(address, reason, now)
            again, self._check_again = self._check_again, ""
            if again:
                return self.recheck(again, now)
            return []

        self._manager.submit(lambda: find_master(settings, base), done)
        return []

    def _adopt(self, address: Address, reason: str, now: float) -> None:
        manager = self._manager
        if address == self.master:
            return
        old, self.master = self.master, address
        manager.target = target_at(self.base_target, address)
        if old is None:
            log.info("master of %r is %s (%s)", self.settings.service, manager.target.label, reason)
            manager.redispatch(now)
            return
        pool = manager.pool
        pool.counters[stat_keys.FAILOVERS] += 1
        self._draining.update(
            (slot.index, slot.generation) for slot in pool.slots if slot.state is not SlotState.EMPTY
        )
        self._revoke_at = now + manager.config.redis_timeout
        log.warning(
            "failover: master of %r moved from %s to %s (%s): draining %d connections to the old one "
            "(leases held past %g s are revoked)",
            self.settings.service, format_addresses((old,)), manager.target.label, reason, len(self._draining),
            manager.config.redis_timeout,
        )
        manager.perform(pool.retire_all())
        manager.reaper.sweep(now)  # the idle ones end now
        manager.sweep_soon(self._revoke_at)

    # ----- the sweep's duty ---------------------------------------------------------

    def tick(self, now: float) -> None:
        """After each sweep: revoke what still holds the old master past the deadline; recheck when due."""
        pool, table = self._manager.pool, self._manager.keeper.table
        for index, generation in list(self._draining.items()):
            slot = pool.slot(index, generation)
            if slot is None or slot.state is SlotState.EMPTY:
                del self._draining[index]  # replaced: this slot's next connection is the new master's
                continue
            if now < self._revoke_at or slot.state is not SlotState.SHARED or slot.shut:
                continue
            try:
                row = table.row(index)
            except tbl.RowError:
                continue  # the sweep repairs scribbled rows
            if row.state is RowState.HELD and row.generation == generation:
                log.warning("slot %d: lease %d of pid %d still on the old master %g s after the failover: revoked",
                            index, row.lease_seq, row.holder_pid, self._manager.config.redis_timeout)
                cause = stat_keys.reaped_key(ReapCause.REVOKED.value)
                self._manager.perform(pool.revoke(index, generation, row.lease_seq, cause))
        if self._draining and now < self._revoke_at:
            self._manager.sweep_soon(self._revoke_at)
        if now >= self._next_check:
            self.recheck("periodic", now)
