"""Autopipelining: concurrent tasks' simple commands share one lease and one round trip.

A lease is exclusive, so without this Redis sees at most C commands in
flight for the whole host, each a full round trip through one worker's
loop. With autopipelining (``sharedpool.asyncio.Redis()``'s default;
``autopipeline=False`` opts out), a command on the allowlist
(``BATCHABLE``) issued by any task of this process joins the *open
batch*; the batch runs in its own task, which takes one lease, sends
all its commands in one write, reads every reply in order, gives the lease
back and settles each task's future with its own reply (ioredis's
``enableAutoPipelining``).

A batch stays open, gathering commands, from its first command until its
task holds a lease: at least until the loop's next turn, longer while the
lease is contended, so batches grow with the load. At ``max_batch``
commands it closes early and the next command opens another batch, which
takes another lease.

What each task sees is what it would see with the command issued alone:

* replies are matched by position: the i-th reply read is the i-th command
  sent, and a reply read settles exactly one future;
* a Redis error reply (WRONGTYPE...) is that command's own error; a
  response callback that fails after its reply was read fails that command
  only;
* a task cancelled while its batch is open leaves the batch (its command
  is never sent); cancelled once sent, it just stops waiting: the batch
  still reads its reply, so the lease comes back clean;
* a connection lost mid-batch (ConnectionError, TimeoutError) settles the
  commands whose replies were read, and sends those still awaited again,
  in their order, on a fresh lease under the connection's ``retry``, as
  redis-py would resend a lone command; a command is thus never sent
  again once answered, nor once its task was cancelled (its write would
  land over whatever was written since). A lease the manager revoked
  (``max_lease_time``) fails every command still awaited with ``LeaseLost``
  at once, with nothing sent again. When the
  retries run out, or on an error the retry does not cover, every
  unanswered command of the batch gets that error;
* bounds: the batch's lease is taken with the pool's own bounds
  (``manager_timeout + acquire_timeout``) counted from the batch's start,
  which is no later than any of its commands, and each reply is read under
  ``socket_timeout``.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from sharedpool.asyncio.connection import AsyncLeasedConnection


class SharedRedis(Protocol):
    """What a batch uses of its client (``asyncio.client.SharedRedis``): the pool and redis-py's reply parsing."""

    connection_pool: Any

    async def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any: ...

# Commands as redis-py names them (``args[0]``). Each is a plain key/value
# command with one reply, no effect on the connection's session (SELECT,
# CLIENT..., HELLO, AUTH), no transaction (MULTI, WATCH), no blocking
# (BLPOP, XREAD BLOCK, WAIT) and no script (EVAL could do any of these).
# Anything else, and any spelling redis-py does not use, takes the
# ordinary lease-per-command path.
BATCHABLE = frozenset({
    # strings
    "GET", "SET", "SETEX", "PSETEX", "SETNX", "GETSET", "GETDEL", "GETEX", "MGET", "MSET", "MSETNX",
    "INCR", "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY", "APPEND", "STRLEN", "GETRANGE", "SETRANGE",
    # keys
    "DEL", "UNLINK", "EXISTS", "TOUCH", "TYPE", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST", "TTL", "PTTL",
    # hashes
    "HGET", "HSET", "HSETNX", "HMGET", "HMSET", "HGETALL", "HDEL", "HEXISTS", "HINCRBY", "HINCRBYFLOAT",
    "HKEYS", "HVALS", "HLEN",
    # lists
    "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LRANGE", "LLEN", "LINDEX", "LSET", "LREM", "LTRIM",
    # sets
    "SADD", "SREM", "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD",
    # sorted sets
    "ZADD", "ZREM", "ZSCORE", "ZMSCORE", "ZINCRBY", "ZCARD", "ZCOUNT", "ZRANK", "ZREVRANK",
    "ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZREVRANGEBYSCORE", "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK",
})

MAX_BATCH = 128


class _Call:
    __slots__ = ("args", "future", "options")

    def __init__(self, args: tuple[Any, ...], options: dict[str, Any], future: asyncio.Future[Any]) -> None:
        self.args = args
        self.options = options
        self.future = future

    def settle(self, reply: Any) -> None:
        if self.future.done():
            return  # its task was cancelled: the reply was read all the same, and is dropped
        if isinstance(reply, asyncio.CancelledError):
            self.future.cancel()  # the batch task was cancelled (its loop closing): so are its waiters
        elif isinstance(reply, BaseException):
            self.future.set_exception(reply)
        else:
            self.future.set_result(reply)


class AutoPipeline:
    """One client's batcher, in one process and one event loop at a time."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"autopipeline max_batch={max_batch!r}: at least 1")
        self.max_batch = max_batch
        self.batches = 0  # sent, for repr and the bench's batch size
        self.commands = 0
        self._start_afresh(None)

    def _start_afresh(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # A batch and its futures belong to one loop; a forked child's
        # batches are its parent's, whose tasks do not run here.
        self._loop = loop
        self._pid = os.getpid()
        self._open: list[_Call] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        gathering = len(self._open) if self._open is not None else 0
        return (
            f"<AutoPipeline [{len(self._running)} batches running, {gathering} commands gathering | "
            f"{self.commands} commands sent in {self.batches} batches]>"
        )

    @staticmethod
    def takes(command_name: Any) -> bool:
        return command_name in BATCHABLE

    async def execute(self, client: SharedRedis, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """Run one command in the open batch (opening one if needed) and return its reply."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._pid != os.getpid():
            self._start_afresh(loop)
        batch = self._open
        if batch is None or len(batch) >= self.max_batch:
            batch = self._open = []
            task = loop.create_task(self._run(client, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        future: asyncio.Future[Any] = loop.create_future()
        batch.append(_Call(args, options, future))
        # Cancelling this task cancels the future, and only the future.
        return await future

    async def _run(self, client: SharedRedis, batch: list[_Call]) -> None:
        pool = client.connection_pool
        conn: AsyncLeasedConnection | None = None
        calls: list[_Call] = batch
        try:
            conn = await pool.get_connection()
            if self._open is batch:
                self._open = None  # closed: later commands open the next batch
            # Cancelled while the batch was open: never sent.
            calls = [call for call in batch if not call.future.done()]
            if calls:
                self.batches += 1
                self.commands += len(calls)
                await self._send(client, conn, calls)
        except BaseException as exc:
            if self._open is batch:
                self._open = None
            for call in calls:
                call.settle(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if conn is not None:
                await pool.release(conn)

    async def _send(self, client: SharedRedis, conn: AsyncLeasedConnection, calls: list[_Call]) -> None:
        async def attempt() -> None:
            # Only what is still awaited goes out again, in its order: a call
            # answered must not run twice, and one whose task was cancelled
            # after it was sent must not land later over what that task (or
            # any other) wrote since (issue 25, finding 1).
            rest = [call for call in calls if not call.future.done()]
            if not rest:
                return
            if not conn.is_connected:
                # Bind the fresh lease before packing: packing counts the
                # replies due on this lease, and binding starts the count afresh.
                await conn.connect_check_health(check_health=False)
            await conn.send_packed_command(conn.pack_commands([call.args for call in rest]), check_health=False)
            for call in rest:
                try:
                    reply = await client.parse_response(conn, call.args[0], **call.options)
                except ResponseError as exc:
                    reply = exc
                except Exception as exc:
                    if not conn.is_connected:
                        raise  # the read failed: redis-py closed the connection, and the batch's retry decides
                    reply = exc  # read, then its response callback failed: this command's error alone
                call.settle(reply)

        async def failed(error: Exception) -> None:
            await conn.disconnect(error=error)
            # The manager took the lease back (max_lease_time): every command
            # still awaited hears LeaseLost now, with no retry and nothing
            # sent again (issue 25, finding 2). The failed read says so
            # already; a failed write, or a revocation seen only now, here.
            client.connection_pool.raise_if_revoked(conn)

        await conn.retry.call_with_retry(attempt, failed)

