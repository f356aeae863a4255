"""A TCP relay between a manager and a real Redis that can hold a connection's requests and cut it.

Fault injection, not a mock: every byte still goes to the real server. It
makes one timing exact that a live server leaves to chance: a command sent
but not answered (held here) while other connections' commands are
answered, then that connection lost.
"""

from __future__ import annotations

import socket
import threading
import time


class Link:
    """One relayed connection: the manager's side and Redis's side."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.held = bytearray()  # requests kept from Redis while holding
        self.holding = False
        self.cut_done = False
        self.cut_at = 0.0  # time.monotonic() of the first cut, whoever made it
        self._lock = threading.Lock()
        self._pumps_left = 2

    def pump_ended(self) -> None:
        """Called by each of the link's two threads as it stops; the last closes both sockets."""
        self.cut()
        with self._lock:
            self._pumps_left -= 1
            last = not self._pumps_left
        if last:
            self.downstream.close()
            self.upstream.close()

    def forward_request(self, data: bytes) -> None:
        with self._lock:
            if self.holding:
                self.held += data
                return
        self.upstream.sendall(data)

    def release(self) -> None:
        with self._lock:
            data, self.held, self.holding = bytes(self.held), bytearray(), False
        if data and not self.cut_done:
            self.upstream.sendall(data)

    def cut(self) -> None:
        """Lose the connection: its held requests never reach Redis, and the manager's side reads EOF."""
        with self._lock:
            if not self.cut_done:
                self.cut_at = time.monotonic()
            self.cut_done = True
            self.held = bytearray()
        for sock in (self.downstream, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HoldingProxy:
    """Listens on 127.0.0.1; each accepted connection is relayed to ``upstream`` by two threads."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(downstream, upstream)
            with self._lock:
                self.links.append(link)
            for pump in (self._pump_requests, self._pump_replies):
                thread = threading.Thread(target=pump, args=(link,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump_requests(self, link: Link) -> None:
        try:
            while data := link.downstream.recv(65536):
                link.forward_request(data)
        except OSError:
            pass
        link.pump_ended()

    def _pump_replies(self, link: Link) -> None:
        try:
            while data := link.upstream.recv(65536):
                link.downstream.sendall(data)
        except OSError:
            pass
        link.pump_ended()

    def live_links(self) -> list[Link]:
        with self._lock:
            return [link for link in self.links if not link.cut_done]

    def hold_all(self) -> None:
        for link in self.live_links():
            with link._lock:
                link.holding = True

    def release_all(self, but: Link | None = None) -> None:
        for link in self.live_links():
            if link is not but:
                link.release()

    def holding(self, needle: bytes) -> Link | None:
        """The live link whose held requests contain ``needle``, if any."""
        for link in self.live_links():
            with link._lock:
                if needle in link.held:
                    return link
        return None

    def close(self) -> None:
        # shutdown() wakes the accept; close() alone leaves it blocked.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for link in self.live_links():
            link.cut()
        for thread in self._threads:
            thread.join(5)
