"""Database numbers: the ranges a manager serves (``0-15``, ``0,2,5-7``), and the one a URL names."""

from __future__ import annotations

from urllib.parse import urlsplit

from sharedpool.errors import ConfigError, mask_secrets

MAX_DATABASE = 0xFFFF  # a row carries its database in 16 bits
DEFAULT_DATABASES = tuple(range(16))  # Redis's default count (its ``databases`` setting)


def parse_databases(text: str) -> tuple[int, ...]:
    """``"0-15"``, ``"0,2,5-7"`` (spaces allowed) -> sorted distinct database numbers."""
    found: set[int] = set()
    for part in str(text).replace(" ", ",").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if not 0 <= first <= last <= MAX_DATABASE:
            raise ValueError(part)
        found.update(range(first, last + 1))
    if not found:
        raise ValueError(text)
    return tuple(sorted(found))


def format_databases(databases: tuple[int, ...] | list[int]) -> str:
    """The inverse of ``parse_databases``, in ranges: (0, 1, 2, 5) -> "0-2,5"."""
    parts: list[str] = []
    ordered = sorted(set(databases))
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[start]) if start == end else f"{ordered[start]}-{ordered[end]}")
        start = end + 1
    return ",".join(parts)


def url_database(url: str) -> int:
    """The database a redis:// (``/N``) or unix:// (``?db=N``) URL names; 0 when it names none."""
    from redis.connection import parse_url

    if urlsplit(url).scheme == "rediss":
        from sharedpool.tls.handshake import without_options

        url = without_options(url)  # redis-py would parse ssl_min_version as a number
    try:
        return int(parse_url(url).get("db", 0) or 0)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        raise ConfigError("redis_url", mask_secrets(url), "a URL whose database (/N or ?db=N) is an integer") from None
