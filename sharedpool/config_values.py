"""One setting's value: the parsers and checks that ``config``'s fields name.

A check returns None for a good value, or what a good one looks like (the
``ConfigError`` says it with the field's name). Sentinel addresses and
redis-py-style words (``yes``, ``660``) are parsed here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


def positive_float(name: str, value: float) -> str | None:
    return None if value > 0 else "a number of seconds greater than 0"


def non_negative_float(name: str, value: float) -> str | None:
    return None if value >= 0 else "a number of seconds, 0 or more (0 turns it off)"


def int_range(low: int, high: int) -> Callable[[str, int], str | None]:
    def check(name: str, value: int) -> str | None:
        return None if low <= value <= high else f"an integer from {low} to {high}"

    return check


def choice(*allowed: Any) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        return None if value in allowed else "one of " + ", ".join(repr(a) for a in allowed)

    return check


def redis_url(name: str, value: str) -> str | None:
    scheme = urlsplit(value).scheme
    if scheme == "rediss":
        from sharedpool import tls

        return None if tls.available() else f"redis:// or unix:// ({tls.INSTALL_HINT})"
    if scheme not in ("redis", "unix"):
        return "a redis://host:port/db or unix:///path/to/redis.sock URL (rediss:// for TLS)"
    return None


def socket_mode(name: str, value: int) -> str | None:
    if value & ~0o777:
        return "permission bits as octal, e.g. 600 or 660"
    if value & 0o006:
        return "permission bits that give others nothing, such as 600 or 660 (share through a group, never with everyone)"
    return None


def parse_octal(text: str) -> int:
    return int(str(text), 8)


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


CLIENT_NAME_FIELDS = ("pool", "slot", "db")


def client_name(name: str, value: str) -> str | None:
    try:
        example = value.format(pool="default", slot=0, db=0)
    except (KeyError, IndexError, ValueError):
        return "a name whose only {fields} are {pool}, {slot} and {db} (empty: no CLIENT SETNAME)"
    if any(ch.isspace() for ch in example):
        return "a name without spaces or newlines (Redis refuses them in CLIENT SETNAME)"
    return None


def parse_addresses(text: str) -> tuple[tuple[str, int], ...]:
    """``"10.0.0.1:26379, sentinel-b:26379"`` -> ((host, port), ...); a bracketed IPv6 host is allowed."""
    found: list[tuple[str, int]] = []
    for part in str(text).replace(" ", ",").split(","):
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(part)
        if (host, int(port)) not in found:
            found.append((host, int(port)))
    if not found:
        raise ValueError(text)
    return tuple(found)


def format_addresses(addresses: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in addresses)


def parse_uid_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).replace(",", " ").split())
