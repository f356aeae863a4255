"""The manager's own TLS connection to Redis: redis-py's ``Connection`` on our record layer.

``_connect`` opens the TCP socket as redis-py does, runs our handshake
(``handshake.handshake``) and gives redis-py the ``TLSSocket``; the
manager's HELLO / AUTH / SELECT / CLIENT SETNAME then run through the same
record layer every holder uses. A PING follows them, so that the session
tickets the server sends after the handshake are read before the
connection is lent: after that, any handshake message breaks it.
"""

from __future__ import annotations

import socket
from typing import Any

from redis.connection import Connection

from sharedpool.errors import TLSRecordError
from sharedpool.tls.handshake import TLSOptions, handshake, refused_after_handshake
from sharedpool.tls.keys import Handover
from sharedpool.tls.transport import TLSSocket


class ManagerTLSConnection(Connection):
    def __init__(self, *, tls: TLSOptions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls = tls
        self.handover: Handover | None = None
        self._label = f"{self.host}:{self.port}"

    def _connect(self) -> socket.socket:
        raw = super()._connect()
        try:
            transport, self.handover = handshake(raw, self.tls, self._label, float(self.socket_connect_timeout or 5.0))
        except BaseException:
            raw.close()
            raise
        raw.settimeout(self.socket_timeout)
        return transport  # type: ignore[return-value]  # socket-shaped: what redis-py calls of it

    def on_connect_check_health(self, check_health: bool = True) -> None:
        # redis-py's on_connect() and connect() both come here.
        try:
            super().on_connect_check_health(check_health)
            self.send_command("PING", check_health=False)
            self.read_response()
        except TLSRecordError as exc:
            refused = refused_after_handshake(exc, self._label)
            if refused is not None:
                raise refused from None
            raise
        sock = self._sock
        assert isinstance(sock, TLSSocket)
        sock.layer.tickets_ok = False
