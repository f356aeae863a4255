"""What a lease did to the Redis session, counted as its commands go out.

Shared by the sync and the asyncio leased connections: both give a lease
back CLEAN, NEEDS_RESET or BROKEN by the same rules (DESIGN facts 2 and 3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sharedpool.lease.core import mark_subscriber
from sharedpool.table import Outcome

# Commands after which the session differs from the manager's handshake
# (DESIGN fact 3): the manager must RESET before anyone else gets it.
_SESSION_COMMANDS = frozenset({
    "SELECT", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
    "SUNSUBSCRIBE", "HELLO", "AUTH", "READONLY", "READWRITE", "MONITOR", "RESET",
    "ASKING", "QUIT", "SYNC", "PSYNC", "REPLCONF",
})
_SESSION_CLIENT_SUBCOMMANDS = frozenset({
    "TRACKING", "SETNAME", "SETINFO", "NO-EVICT", "NO-TOUCH", "CACHING",
})
# Long-lived by nature: the row says so, and the manager neither warns
# about them as leaks nor revokes them at max_lease_time.
_SUBSCRIBE_COMMANDS = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"})
_TRANSACTION_COMMANDS = frozenset({"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH"})

# Command names seen to leave the session alone, in the spelling the caller
# used; filled as commands are classified so the common path is one lookup.
_HARMLESS: set[Any] = set()
_HARMLESS_CAP = 4096


def _token(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1").upper()
    return str(value).upper()


class SessionWatch:
    """Mixin: the session changes and unread replies of the current lease.

    The connection class says whether its transport is gone and whether
    bytes wait unread (``_transport_gone``, ``_has_unread_bytes``); the
    rest is here.
    """

    _session_changed = False
    _in_multi = False
    _watching = False
    _broken = False
    _pending_replies = 0
    _subscribed = False  # a (P/S)SUBSCRIBE went out on this lease
    # Closed by its user with nothing in flight (PubSub.close()): what
    # Redis still pushes, RESET reads past, so the connection is reset, not replaced.
    _closed_clean = False

    def watch_reset(self) -> None:
        self._session_changed = self._in_multi = self._watching = self._broken = False
        self._subscribed = self._closed_clean = False
        self._pending_replies = 0

    def may_close_clean(self) -> bool:
        """Whether a ``disconnect()`` now could end the lease NEEDS_RESET: subscribed, nothing failed."""
        return self._subscribed and not self._broken

    def closing_clean(self) -> bool:
        """``disconnect()`` with no error, on a subscribed lease with no byte of a reply half read:
        the lease can end NEEDS_RESET (the manager's RESET drains the pushed messages)."""
        if self._subscribed and not self._broken and not self._has_unread_bytes():
            self._closed_clean = True
        return self._closed_clean

    def watch_commands(self, commands: Iterable[Any]) -> int:
        """Classify commands about to be sent (each a tuple of args); count their replies."""
        sent = 0
        for args in commands:
            if args[0] not in _HARMLESS:
                self._classify(args)
            sent += 1
        self._pending_replies += sent
        return sent

    def watch_command(self, args: tuple[Any, ...]) -> None:
        if args[0] not in _HARMLESS:
            self._classify(args)
        self._pending_replies += 1

    def outcome(self) -> Outcome:
        if self._broken or (self._transport_gone() and not self._closed_clean):
            return Outcome.BROKEN
        if self._session_changed or self._in_multi or self._watching:
            # RESET also reads past any reply still in flight.
            return Outcome.NEEDS_RESET
        if self._pending_replies != 0 or self._has_unread_bytes():
            # A reply nobody read would be the next holder's answer.
            return Outcome.BROKEN
        return Outcome.CLEAN

    def _transport_gone(self) -> bool:
        raise NotImplementedError

    def _has_unread_bytes(self) -> bool:
        raise NotImplementedError

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
            lease = getattr(self, "lease", None)
            if command in _SUBSCRIBE_COMMANDS and lease is not None:
                self._subscribed = True
                mark_subscriber(lease)
            return
        if command == "CLIENT":
            sub = words[1] if len(words) > 1 else (_token(args[1]) if len(args) > 1 else "")
            if sub == "REPLY":
                # Redis may skip our next replies, the manager's RESET's
                # included: nobody can tell which reply is whose any more.
                self._broken = True
            elif sub in _SESSION_CLIENT_SUBCOMMANDS:
                self._session_changed = True
            return  # CLIENT subcommands differ: never remembered as harmless
        if len(_HARMLESS) < _HARMLESS_CAP:
            try:
                _HARMLESS.add(args[0])
            except TypeError:
                pass
