"""A redis-py connection over a socket the manager lent us.

It differs from ``redis.Connection`` in three ways:

* no handshake: the manager already did AUTH / HELLO / SELECT;
* ``disconnect()`` closes our dup of the fd and never calls ``shutdown()``,
  which would end the TCP connection for the manager too (DESIGN fact 1);
* it watches what the lease does to the session, so the release can say
  whether the connection is clean, needs a RESET, or is broken.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from redis.connection import Connection
from redis.exceptions import ReadOnlyError, ResponseError
from redis.retry import Retry

from sharedpool import errors
from sharedpool.errors import LeaseLost
from sharedpool.lease.budget import BoundedRetryAttribute, CallBudget, SpentBudgetBackoff
from sharedpool.lease.state import LeaseHolder, LeaseState

if TYPE_CHECKING:
    from sharedpool.lease.core import Lease


# How long a closing subscriber waits for the rest of a pushed message already begun.
_DRAIN_S = 0.05


class LeasingPool(Protocol):
    """What a leased connection asks of its pool (``client.sync_pool``'s ``SharedConnectionPool``)."""

    def call_bound(self) -> float: ...
    def connection_lost(self, conn: LeasedConnection) -> None: ...
    def raise_if_revoked(self, conn: LeasedConnection) -> None: ...
    def replace_lost_lease(self, conn: LeasedConnection) -> socket.socket: ...
    def end_in_use(self, conn: LeasedConnection) -> None: ...


class _BoundedRetry(Retry):
    """The caller's retry policy, stopped when one call's time budget is spent (``lease.budget``)."""

    def __init__(self, policy: Retry, conn: LeasedConnection) -> None:
        super().__init__(SpentBudgetBackoff(policy._backoff, conn), policy._retries, tuple(policy._supported_errors))
        self.policy = policy
        self._budget = CallBudget(conn)

    def call_with_retry(
        self, do: Callable[[], Any], fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None, with_failure_count: bool = False,
    ) -> Any:
        budget = self._budget
        budget.enter()
        try:
            return super().call_with_retry(do, fail, budget.judge(is_retryable), with_failure_count)
        finally:
            budget.leave()


class LeasedConnection(LeaseHolder, Connection):
    """One slot's connection as seen by a worker; reused across leases of that slot."""

    retry = BoundedRetryAttribute(_BoundedRetry)
    _idle_watch: tuple[socket.socket, select.poll] | None = None

    def __init__(
        self,
        *,
        shared_pool: LeasingPool | None = None,
        slot: int = -1,
        generation: int = 0,
        sock: socket.socket | None = None,
        redis_label: str = "",
        **kwargs: Any,
    ) -> None:
        if shared_pool is None or sock is None:
            # A plain redis.ConnectionPool given our class (rq rebuilds pools
            # so): it would open nothing we could share. Say what works.
            raise errors.Misconfigured(
                "a LeasedConnection is made only by sharedpool.SharedConnectionPool, not by another pool: "
                "rebuild the pool as type(pool)(**pool.connection_kwargs), or use sharedpool.SharedRedis as the "
                "client class (SharedRedis(connection_pool=redis.ConnectionPool(connection_class=LeasedConnection, "
                "**kwargs)) turns into the shared pool)"
            )
        super().__init__(**kwargs)
        self.shared_pool: LeasingPool | None = shared_pool
        self._hold_init(slot, generation, redis_label)
        # A socket object made from an fd assumes blocking mode whatever the
        # shared description says (DESIGN fact 9): give it its own mode now.
        sock.settimeout(self.socket_timeout)
        self._sock = sock  # type: ignore[assignment]  # redis-py declares it None-typed
        self._parser.on_connect(self)

    # ----- lease lifecycle (called by the pool) ----------------------------

    def begin(self, lease: Lease, sock: socket.socket | None = None) -> None:
        """Start a lease; ``sock`` rebinds this object to another slot's fd (a retry)."""
        if sock is not None:
            self._sock = sock  # type: ignore[assignment]
            self.slot, self.generation = lease.slot, lease.generation
            self._parser.on_connect(self)
        current = self._sock
        assert current is not None
        if type(current) is not socket.socket:
            current.take_up()  # type: ignore[attr-defined]  # rediss://: the row's record sequence numbers
        if sock is not None or self.socket_timeout is None:
            # Another holder may have left the shared file description
            # non-blocking (DESIGN fact 9), and a socket object in blocking
            # mode would then fail with EAGAIN: re-apply ours. A socket with
            # a timeout polls before every read and write, so it works
            # whichever mode the description is in: no syscall per lease.
            # (One holder in blocking mode followed by one with a timeout can
            # make a send larger than the socket buffer wait past the timeout.)
            current.settimeout(self.socket_timeout)
        # _begin_lease and watch_reset, inlined: this runs once per lease.
        self.state = LeaseState.IN_USE
        self.lease = lease
        self.why = ""
        self._session_changed = self._in_multi = self._watching = self._broken = False
        self._subscribed = self._closed_clean = False
        self._pending_replies = 0

    def drop(self) -> None:
        self.disconnect()

    def end(self) -> Lease | None:
        sock = self._sock
        if sock is not None and type(sock) is not socket.socket:
            sock.write_back()  # type: ignore[attr-defined]  # rediss://: before the lock goes, in its own step
        return super().end()

    def _transport_gone(self) -> bool:
        return self._sock is None

    def closed_while_idle(self) -> bool:
        """Whether Redis closed (or wrote to) this connection while no lease held it.

        redis-py checks each connection it takes from its pool (``can_read``)
        and reconnects one that Redis closed meanwhile (``CLIENT KILL``, its
        ``timeout``), so the caller's command never meets it. The manager
        replaces such a connection too, but a lease taken between the close
        and the manager's turn would get it: checked here, at one poll of a
        poller kept per socket (~0.3 µs). rediss:// is not checked: an idle
        TLS connection may have a record waiting (a session ticket).
        """
        sock: Any = self._sock  # redis-py types it None
        if type(sock) is not socket.socket:
            return False
        watch = self._idle_watch
        if watch is None or watch[0] is not sock:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
            watch = self._idle_watch = (sock, poller)
        return bool(watch[1].poll(0))

    def _has_unread_bytes(self) -> bool:
        sock = self._sock
        if sock is not None and type(sock) is not socket.socket and sock.pending():  # type: ignore[attr-defined]
            return True  # rediss://: records received that no reply has taken
        parser = self._parser
        buffer = getattr(parser, "_buffer", None)
        if buffer is not None:
            # SocketBuffer.unread_bytes() without its two Python frames and
            # two seeks (once per lease): the read position against the end.
            data = getattr(buffer, "_buffer", None)
            if data is None or data.closed:
                return True  # the parser let go of its buffer: nothing to trust in it
            return bool(data.tell() != data.getbuffer().nbytes)
        reader = getattr(parser, "_reader", None)  # hiredis
        if reader is not None and hasattr(reader, "has_data"):
            return bool(reader.has_data())
        return False

    # ----- redis-py overrides ----------------------------------------------

    def _connect(self) -> socket.socket:
        """redis-py reconnects after a failure mid-lease: swap in a fresh lease."""
        pool = self.shared_pool
        if pool is None or self.pid != os.getpid():
            raise LeaseLost(f"{self!r} was inherited across fork: take a lease from the pool in this process")
        return pool.replace_lost_lease(self)

    def on_connect(self) -> None:
        self._parser.on_connect(self)

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._parser.on_connect(self)

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        if not args and not kwargs and self.state is LeaseState.IN_USE and self.may_close_clean():
            # PubSub.reset(): nothing in flight, and its lease can end
            # NEEDS_RESET. Messages already read into our buffer are read
            # to their end first, so that what Redis still has to send
            # starts at a message's first byte, which the manager's RESET
            # reads past; a message that does not end within
            # _DRAIN_S leaves it BROKEN.
            try:
                while self._sock is not None and self._has_unread_bytes():
                    self.read_response(disable_decoding=True, timeout=_DRAIN_S, disconnect_on_error=False, push_request=True)
            except Exception:
                self._broken = True
            self.closing_clean()
        self._parser.on_disconnect()
        sock, self._sock = self._sock, None
        self.reset_should_reconnect()
        if sock is None:
            return
        # Never shutdown(): the open file description is shared with the
        # manager, and only the manager may end the TCP connection.
        try:
            sock.close()
        except OSError:
            pass
        pool = self.shared_pool
        if pool is not None and self.pid == os.getpid():
            pool.connection_lost(self)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            super().send_packed_command(command, check_health)
        except BaseException as exc:
            self._lease_failed(exc)
            raise

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is None:
            # Reconnecting binds a fresh lease and resets the counts: do it
            # before counting this command, or its reply would go unseen.
            self.connect()
        self.watch_command(args)
        self.send_packed_command(self._command_packer.pack(*args), check_health=kwargs.get("check_health", True))

    def pack_commands(self, commands: Any) -> Any:
        if self._sock is None:
            self.connect()  # as in send_command: count on the lease that will carry them
        commands = list(commands)
        self.watch_commands(commands)
        return super().pack_commands(commands)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ReadOnlyError as exc:
            # A master that a failover demoted refuses writes: this connection leads nowhere useful
            # any more. Broken (the manager replaces it, asking the Sentinels where the master is).
            self._lease_failed(exc)
            raise errors.ReplicaAnswered(f"{self.redis_label} answered {exc}: it is a replica now") from None
        except ResponseError:
            raise  # Redis's answer: the connection is fine
        except BaseException as exc:
            self._lease_failed(exc)
            raise
        finally:
            self._pending_replies -= 1
