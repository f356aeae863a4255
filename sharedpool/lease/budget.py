"""One time budget for all of redis-py's retries of one call, sync and asyncio alike.

After a lost lease each of redis-py's attempts re-enters the pool, and its
backoff sleeps in between: together they must not outlast one call's bound
(``manager_timeout + acquire_timeout``), whatever the policy's count and
cap. The budget starts at the call's first failure: the backoff sleeps
count, but not the time Redis took over the first attempt.

``LeaseLost`` is never retried. It stays a ``redis.ConnectionError`` (what
a caller's ``except`` or a library's outage handling expects of a
connection taken away mid-command), but no retry can bring a revoked lease
back, and each attempt would only spend the budget in backoff sleeps
before the same answer: the holder must hear it at the command that met it.

Each leased connection wraps the ``retry`` redis-py gives it in a bounded
retry (``client.connection``, ``asyncio.connection``); this module holds
what the two wrappers share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.backoff import AbstractBackoff

from sharedpool.errors import LeaseLost

if TYPE_CHECKING:
    from sharedpool.config import ClientConfig
    from sharedpool.lease.context import LeaseContext
    from sharedpool.lease.state import LeaseHolder


def call_bound(config: ClientConfig, att: LeaseContext | None) -> float:
    """Seconds one call may spend on the pool in all, retries included: manager_timeout + acquire_timeout."""
    acquire_timeout = config.acquire_timeout or (att.acquire_timeout if att is not None else 0.0)
    return config.manager_timeout + acquire_timeout


class SpentBudgetBackoff(AbstractBackoff):
    """The caller's backoff, cut short so that no sleep ends past the call's budget."""

    def __init__(self, inner: AbstractBackoff, conn: LeaseHolder) -> None:
        self._inner = inner
        self._conn = conn

    def reset(self) -> None:
        self._inner.reset()

    def compute(self, failures: int) -> float:
        wanted = float(self._inner.compute(failures))
        until = self._conn.retry_until
        return min(wanted, max(0.0, until - time.monotonic())) if until else wanted


class CallBudget:
    """The budget of one connection's calls; ``depth`` because redis-py runs connect()'s retry inside a command's."""

    __slots__ = ("conn", "depth")

    def __init__(self, conn: LeaseHolder) -> None:
        self.conn = conn
        self.depth = 0

    def enter(self) -> None:
        if not self.depth:
            self.conn.retry_until = 0.0  # a new call: its budget is set at its first failure
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1

    def judge(self, is_retryable: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
        """redis-py's ``is_retryable``, refusing once the budget is spent."""
        conn = self.conn

        def within_budget(error: Exception) -> bool:
            if isinstance(error, LeaseLost):
                return False
            now = time.monotonic()
            if not conn.retry_until:
                pool = conn.shared_pool
                conn.retry_until = now + (pool.call_bound() if pool is not None else 0.0)
            elif now >= conn.retry_until:
                return False
            return is_retryable(error) if is_retryable is not None else True

        return within_budget


class BoundedRetryAttribute:
    """A leased connection's ``retry``: whatever policy redis-py sets (in ``__init__``, or
    through ``pool.set_retry()``) is stored wrapped in the connection's bounded retry."""

    def __init__(self, wrapper: type) -> None:
        self._wrapper = wrapper  # called as wrapper(policy, conn)

    def __get__(self, conn: Any, owner: type | None = None) -> Any:
        return self if conn is None else conn._bounded_retry

    def __set__(self, conn: Any, policy: Any) -> None:
        conn._bounded_retry = policy if isinstance(policy, self._wrapper) else self._wrapper(policy, conn)
