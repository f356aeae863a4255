"""A redis-py connection over a socket the manager lent us.

It differs from ``redis.Connection`` in three ways:

* no handshake: the manager already did AUTH / HELLO / SELECT;
* ``disconnect()`` closes our dup of the fd and never calls ``shutdown()``,
  which would end the TCP connection for the manager too (DESIGN fact 1);
* it watches what the lease does to the session, so the release can say
  whether the connection is clean, needs a RESET, or is broken.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from redis.connection import Connection

from sharedpool.protocol import Outcome

if TYPE_CHECKING:
    from sharedpool.client.channel import ControlChannel
    from sharedpool.client.pool import SharedConnectionPool

# Commands after which the session differs from the manager's handshake
# (DESIGN fact 3): the manager must RESET before anyone else gets it.
_SESSION_COMMANDS = frozenset({
    "SELECT", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
    "SUNSUBSCRIBE", "HELLO", "AUTH", "READONLY", "READWRITE", "MONITOR", "RESET",
    "ASKING", "QUIT", "SYNC", "PSYNC", "REPLCONF",
})
_SESSION_CLIENT_SUBCOMMANDS = frozenset({
    "TRACKING", "REPLY", "SETNAME", "SETINFO", "NO-EVICT", "NO-TOUCH", "CACHING",
})
_TRANSACTION_COMMANDS = frozenset({"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH"})

# Command names seen to leave the session alone, in the spelling the caller
# used; filled as commands are classified so the common path is one lookup.
_HARMLESS: set[Any] = set()
_HARMLESS_CAP = 4096


def _token(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1").upper()
    return str(value).upper()


class LeasedConnection(Connection):
    """One slot's connection as seen by a worker; reused across leases of that slot."""

    def __init__(
        self,
        *,
        shared_pool: SharedConnectionPool,
        slot: int,
        generation: int,
        sock: socket.socket,
        redis_label: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.shared_pool = shared_pool
        self.slot = slot
        self.generation = generation
        self.redis_label = redis_label
        self.lease_id = 0
        self.channel: ControlChannel | None = None
        self.revoked = ""  # the manager's reason, once it took this lease back
        self.returned_early = False  # lease given back while redis-py retries
        self.sticky = False  # the manager lets us park this lease
        self._lost = False
        self._session_changed = False
        self._in_multi = False
        self._watching = False
        self._pending_replies = 0
        self._sock = sock  # type: ignore[assignment]  # redis-py declares it None-typed
        self._parser.on_connect(self)

    def repr_pieces(self) -> list[tuple[str, Any]]:
        return [("slot", self.slot), ("generation", self.generation), ("lease", self.lease_id or None), ("redis", self.redis_label)]

    def _host_error(self) -> str:
        return f"{self.redis_label} (sharedpool slot {self.slot})"

    # ----- lease lifecycle (called by the pool) ----------------------------

    def begin_lease(self, lease_id: int, channel: ControlChannel) -> None:
        # Another holder may have left the shared file description in the
        # other blocking mode (DESIGN fact 9): always re-apply ours.
        sock = self._sock
        assert sock is not None
        sock.settimeout(self.socket_timeout)
        self.lease_id = lease_id
        self.channel = channel
        self.revoked = ""
        self.returned_early = False
        self._lost = False
        self._session_changed = False
        self._in_multi = False
        self._watching = False
        self._pending_replies = 0

    def resume_lease(self) -> None:
        """Start another use of a parked lease: only this process touched the fd since."""
        self._session_changed = False
        self._in_multi = False
        self._watching = False
        self._pending_replies = 0

    def outcome(self) -> Outcome:
        if self._lost or self._sock is None:
            return Outcome.BROKEN
        if self._session_changed or self._in_multi or self._watching:
            # RESET also reads past any reply still in flight.
            return Outcome.NEEDS_RESET
        if self._pending_replies != 0 or self._has_unread_bytes():
            # A reply nobody read would be the next holder's answer.
            return Outcome.BROKEN
        return Outcome.CLEAN

    def _has_unread_bytes(self) -> bool:
        buffer = getattr(self._parser, "_buffer", None)
        if buffer is not None:
            return bool(buffer.unread_bytes())
        reader = getattr(self._parser, "_reader", None)  # hiredis
        if reader is not None and hasattr(reader, "has_data"):
            return bool(reader.has_data())
        return False

    # ----- redis-py overrides ----------------------------------------------

    def _connect(self) -> socket.socket:
        """redis-py reconnects after a failure mid-lease: swap in a fresh lease."""
        return self.shared_pool._replace_lost_lease(self)

    def on_connect(self) -> None:
        self._parser.on_connect(self)

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._parser.on_connect(self)

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self._parser.on_disconnect()
        sock, self._sock = self._sock, None
        self.reset_should_reconnect()
        if sock is None:
            return
        if self.lease_id:
            self._lost = True
        # Never shutdown(): the open file description is shared with the
        # manager, and only the manager may end the TCP connection.
        try:
            sock.close()
        except OSError:
            pass
        pool = getattr(self, "shared_pool", None)
        if pool is not None:
            pool._forget_slot(self)

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is None:
            # Reconnecting binds a fresh lease and resets the counts: do it
            # before counting this command, or its reply would go unseen.
            self.connect()
        name = args[0]
        if name not in _HARMLESS:
            self._classify(args)
        self._pending_replies += 1
        self.send_packed_command(self._command_packer.pack(*args), check_health=kwargs.get("check_health", True))

    def pack_commands(self, commands: Any) -> Any:
        if self._sock is None:
            self.connect()  # as in send_command: count on the lease that will carry them
        commands = list(commands)
        for args in commands:
            if args[0] not in _HARMLESS:
                self._classify(args)
        self._pending_replies += len(commands)
        return super().pack_commands(commands)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        finally:
            self._pending_replies -= 1

    def _classify(self, args: tuple[Any, ...]) -> None:
        words = _token(args[0]).split()
        if not words:
            return
        command = words[0]
        if command in _TRANSACTION_COMMANDS:
            if command == "MULTI":
                self._in_multi = True
            elif command == "WATCH":
                self._watching = True
            elif command == "UNWATCH":
                self._watching = False
            else:  # EXEC and DISCARD end the transaction and every WATCH
                self._in_multi = False
                self._watching = False
            return
        if command in _SESSION_COMMANDS:
            self._session_changed = True
            return
        if command == "CLIENT":
            sub = words[1] if len(words) > 1 else (_token(args[1]) if len(args) > 1 else "")
            if sub in _SESSION_CLIENT_SUBCOMMANDS:
                self._session_changed = True
            return  # CLIENT subcommands differ: never remembered as harmless
        if len(_HARMLESS) < _HARMLESS_CAP:
            try:
                _HARMLESS.add(args[0])
            except TypeError:
                pass
