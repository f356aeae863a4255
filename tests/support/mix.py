"""The request mix a test worker runs: a pipeline, a pinned lease, plain commands, each read checked."""

from __future__ import annotations

from typing import Any


def checked_round_trip(r: Any, key: str, value: str, turn: int) -> str:
    """Write ``value`` at ``key`` and read it back, by the ``turn % 3``-th way; '' or what went wrong.

    ``r`` is a ``sharedpool.Redis`` with ``decode_responses=True``. The
    three ways cover the paths a leased connection takes: a pipeline (one
    lease, many replies), ``lease()`` (a pinned connection), and single
    commands (a lease each).
    """
    try:
        if turn % 3 == 0:
            with r.pipeline() as pipe:
                got = pipe.set(key, value).get(key).execute()[1]
        elif turn % 3 == 1:
            with r.lease() as pinned:
                pinned.set(key, value)
                got = pinned.get(key)
        else:
            r.set(key, value)
            got = r.get(key)
    except Exception as exc:
        return f"{key}: {type(exc).__name__}: {exc}"
    return "" if got == value else f"{key}: wrote {value!r}, read {got!r}"
