"""The tooling that runs libraries' own suites through the pool (``sharedpool.dev.suites``).

The suites themselves run in CI (``.ci/run``), from their PyPI sdists; here
the parts are checked against a real Redis and a real manager: the swap
puts a suite's pools on the manager and nothing else, the plugin and the
runner find a test that passes plain and not shared, and known.toml and
the table in sharedpool/REFERENCE.md list the same regressions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis
from support.redis_view import strangers

import sharedpool
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.suites import runner, swap

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sharedpool.__file__)))
REFERENCE = Path(PACKAGE_ROOT) / "sharedpool" / "REFERENCE.md"


def suite_env(mode: str, port: int, socket_path: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p),
        swap.MODE_ENV: mode, swap.REDIS_PORT_ENV: str(port), "SHAREDPOOL_SOCKET_PATH": socket_path,
    }


SWAPPED_CLIENTS = textwrap.dedent(
    """
    import asyncio, sys
    from sharedpool.dev.suites import swap
    swap.install_from_env()
    import redis, redis.asyncio, redis.connection
    import sharedpool, sharedpool.asyncio

    port = int(sys.argv[1])
    url = f"redis://127.0.0.1:{port}/3"
    clients = {
        "Redis(port=)": redis.Redis(port=port, db=3),
        "Redis() at the default address": redis.Redis(db=3),
        "Redis.from_url": redis.Redis.from_url(url),
        "ConnectionPool(**parse_url)": redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=redis.connection.Connection, **redis.connection.parse_url(url))),
    }
    for name, client in clients.items():
        assert isinstance(client.connection_pool, sharedpool.SharedConnectionPool), name
        client.set(f"key:{name}", name)
        assert client.get(f"key:{name}") == name.encode(), name
    print("pool", clients["Redis(port=)"].connection_pool.manager_info()["pool"])
    # Not the suite's server, TLS or a class of the suite's own: left plain, never connected here.
    assert type(redis.Redis(port=1).connection_pool) is redis.ConnectionPool
    assert type(redis.Redis(port=port, ssl=True).connection_pool) is redis.ConnectionPool
    class Counting(redis.connection.Connection):
        pass
    assert type(redis.ConnectionPool(connection_class=Counting, port=port)) is redis.ConnectionPool
    # A manager-owned option the user set is refused, as it would refuse the user.
    try:
        redis.Redis(port=port, client_name="mine")
    except sharedpool.ConfigError as exc:
        print("refused", exc.field)

    async def main():
        client = redis.asyncio.Redis(port=port, db=3, decode_responses=True)
        assert isinstance(client.connection_pool, sharedpool.asyncio.SharedConnectionPool)
        await client.set("key:asyncio", "yes")
        assert await client.get("key:asyncio") == "yes"
        return client

    loop = asyncio.new_event_loop()
    async_client = loop.run_until_complete(main())
    print("ready", flush=True)
    sys.stdin.readline()  # the test looks at CLIENT LIST while every pool is alive
    loop.run_until_complete(async_client.aclose())
    """
)


def test_the_swap_puts_a_suites_pools_on_the_manager_and_nothing_else(
    manager: ManagerProcess, redis_server: Any, admin: redis.Redis, tmp_path: Path
) -> None:
    script = tmp_path / "clients.py"
    script.write_text(SWAPPED_CLIENTS)
    lines = []
    with subprocess.Popen(
        [sys.executable, str(script), str(redis_server.port)], env=suite_env("shared", redis_server.port, manager.socket_path),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        try:
            for line in process.stdout:
                lines.append(line.strip())
                if line.strip() == "ready":
                    assert strangers(admin, manager) == []
                    break
            process.stdin.write("\n")
            process.stdin.flush()
            lines.append(process.stdout.read())
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    output = "\n".join(lines)
    assert process.returncode == 0, output
    assert f"pool {manager.pool_name}" in output
    assert "refused client_name" in output
    db3 = redis_server.client(db=3, decode_responses=True)
    try:
        assert sorted(db3.keys("key:*")) == sorted([
            "key:Redis(port=)", "key:Redis() at the default address", "key:Redis.from_url",
            "key:ConnectionPool(**parse_url)", "key:asyncio",
        ])
    finally:
        db3.close()


def test_manager_owned_options_at_redis_pys_defaults_are_dropped_and_set_ones_kept() -> None:
    given = {"host": "localhost", "port": 6379, "db": 2, "client_name": None, "username": None,
             "socket_keepalive": True, "driver_info": redis.driver_info.resolve_driver_info(),
             "socket_connect_timeout": 1, "decode_responses": True, "connection_class": redis.connection.Connection}
    assert swap.shared_kwargs(given, {"acquire_timeout": 2}) == {
        "db": 2, "socket_connect_timeout": 1, "decode_responses": True, "acquire_timeout": 2,
    }


FAKE_SUITE = textwrap.dedent(
    """
    import redis

    PORT = int(__import__("os").environ["SHAREDPOOL_SUITE_REDIS_PORT"])

    def test_commands_work():
        client = redis.Redis(port=PORT, db=1)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()

    def test_passes_only_on_a_plain_pool():
        assert type(redis.Redis(port=PORT).connection_pool) is redis.ConnectionPool

    def test_fails_on_both():
        assert False
    """
)


def test_the_runner_reports_a_test_that_passes_plain_and_not_shared(
    manager: ManagerProcess, redis_server: Any, tmp_path: Path
) -> None:
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_fake.py").write_text(FAKE_SUITE)
    suite = runner.Suite("fake", "redis", ("test_fake.py",), ("-p", "no:randomly"))
    site = runner.write_sitecustomize(tmp_path)
    outcomes = {
        mode: runner.run_pytest(
            suite, mode, sys.executable, tmp_path / "suite", site, redis_server.port, manager.socket_path,
            tmp_path / f"{mode}.log", {}, [],
        )
        for mode in swap.MODES
    }
    assert outcomes["plain"].by_test == {
        "test_fake.py::test_commands_work": "passed", "test_fake.py::test_passes_only_on_a_plain_pool": "passed",
        "test_fake.py::test_fails_on_both": "failed",
    }, (tmp_path / "plain.log").read_text()
    known = [runner.Known("fake", "test_fake.py::*_plain_*", "the fake suite's own")]
    verdict = runner.Verdict("fake", outcomes["plain"], outcomes["shared"], known, {})
    assert verdict.regressions == ["test_fake.py::test_passes_only_on_a_plain_pool"], (tmp_path / "shared.log").read_text()
    assert verdict.unexpected == []
    assert verdict.reason("test_fake.py::test_passes_only_on_a_plain_pool") == "the fake suite's own"
    unlisted = runner.Verdict("fake", outcomes["plain"], outcomes["shared"], [], {})
    assert unlisted.unexpected == ["test_fake.py::test_passes_only_on_a_plain_pool"]
    assert "REGRESSION test_fake.py::test_passes_only_on_a_plain_pool" in unlisted.report()


def test_a_known_regression_that_no_longer_fails_is_reported_stale() -> None:
    plain = runner.Outcomes({"t::a": "passed", "t::b": "passed"})
    shared = runner.Outcomes({"t::a": "failed", "t::b": "passed"})
    known = [runner.Known("s", "t::a", "why a"), runner.Known("s", "t::b", "why b"), runner.Known("other", "t::a", "x")]
    verdict = runner.Verdict("s", plain, shared, known, {})
    assert verdict.regressions == ["t::a"] and verdict.unexpected == []
    assert [entry.test for entry in verdict.stale] == ["t::b"]
    assert "did not fail in this run (fixed? remove from known.toml once it passes for good): t::b" in verdict.report()


def _readme_regressions() -> set[tuple[str, str]]:
    """(suite, test) of each row of REFERENCE.md's table of the suites' regressions."""
    text = REFERENCE.read_text()
    start = text.index("<!-- suites-known: begin -->")
    end = text.index("<!-- suites-known: end -->")
    rows = re.findall(r"^\| ([\w-]+) \| `([^`]+)` \|", text[start:end], flags=re.MULTILINE)
    return {(suite, test) for suite, test in rows}


def test_the_readme_lists_the_regressions_known_toml_lists() -> None:
    known = {(entry.suite, entry.test) for entry in runner.load_known()}
    assert known, "known.toml lists nothing"
    assert _readme_regressions() == known


def test_known_toml_entries_need_a_suite_a_test_and_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "known.toml"
    bad.write_text('[[regression]]\nsuite = "rq"\ntest = "tests/x.py::t"\n')
    with pytest.raises(ValueError, match="lacks reason"):
        runner.load_known(bad)


def test_a_pool_option_the_pools_do_not_name_is_refused_before_any_suite_runs() -> None:
    asyncio_suite = [runner.SUITES["redis-py-asyncio"]]
    assert runner.check_pool_options({"acquire_timeout": 2}, asyncio_suite) is None
    refused = runner.check_pool_options({"no_such_option": True}, asyncio_suite)
    assert refused == "sharedpool.asyncio.async_pool.SharedConnectionPool has no 'no_such_option' argument"


CLIENT_AUTOPIPELINE = textwrap.dedent(
    """
    import asyncio, sys
    from sharedpool.dev.suites import swap
    swap.install_from_env()
    import redis.asyncio

    async def main():
        client = redis.asyncio.Redis(port=int(sys.argv[1]), db=4)
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(64)))
        replies = await asyncio.gather(*(client.get(f"k{i}") for i in range(64)))
        assert replies == [str(i).encode() for i in range(64)], replies
        batcher = client.__dict__["_suite_autopipeline"]
        print("batches", batcher.batches, "commands", batcher.commands)
        await client.aclose()

    asyncio.run(main())
    """
)


def test_client_autopipelining_batches_a_plain_asyncio_clients_commands(
    manager: ManagerProcess, redis_server: Any, tmp_path: Path
) -> None:
    script = tmp_path / "autopipeline.py"
    script.write_text(CLIENT_AUTOPIPELINE)
    env = {**suite_env("shared", redis_server.port, manager.socket_path), swap.CLIENT_AUTOPIPELINE_ENV: "1"}
    done = subprocess.run([sys.executable, str(script), str(redis_server.port)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    batches, commands = (int(word) for word in done.stdout.split()[1::2])
    assert commands == 128 and batches < commands, done.stdout


def test_a_known_regression_with_a_failure_matches_only_that_failure(tmp_path: Path) -> None:
    plain = runner.Outcomes({"t::a": "passed", "t::b": "passed", "t::c": "passed"})
    shared = runner.Outcomes(
        {"t::a": "failed", "t::b": "failed", "t::c": "failed"},
        {"t::a": "sharedpool.errors.PoolTimeout: no lease from pool 'p' within 5.00 s", "t::b": "AssertionError: assert 1 == 2"},
    )
    known = [runner.Known("s", "t::*", "leaked leases", failure="PoolTimeout: no lease from pool")]
    verdict = runner.Verdict("s", plain, shared, known, {})
    assert verdict.unexpected == ["t::b", "t::c"]
    assert verdict.reason("t::a") == "leaked leases"
    (tmp_path / "k.toml").write_text(
        '[[regression]]\nsuite = "s"\ntest = "t::*"\nfailure = "PoolTimeout"\nreason = "r"\n'
    )
    assert runner.load_known(tmp_path / "k.toml") == [runner.Known("s", "t::*", "r", "PoolTimeout")]
