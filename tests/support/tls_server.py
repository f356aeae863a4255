"""The TLS redis-server of ``sharedpool.dev.tls_server``, as the tests meet it.

Under ``CI`` a missing TLS server fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sharedpool.dev import tls_server
from sharedpool.dev.tls_server import Certs

__all__ = ["Certs", "TLSRedis", "no_tls_server"]


def no_tls_server(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"TLS tests need a redis-server built with TLS: {why}")
    pytest.skip(why)


class TLSRedis(tls_server.TLSRedis):
    def __init__(self, directory: Path, certs: Certs, **kwargs: Any) -> None:
        try:
            super().__init__(directory, certs, **kwargs)
        except tls_server.NoTLSServer as exc:
            no_tls_server(str(exc))

    def start(self, timeout: float = 10.0) -> TLSRedis:
        try:
            super().start(timeout)
        except tls_server.NoTLSServer as exc:
            no_tls_server(str(exc))
        return self
