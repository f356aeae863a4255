"""Run libraries' own suites plain and shared, and judge the difference (see the package docstring).

Each suite runs from the sdist of the version installed here, in a
temporary directory, with the interpreter running this script: the suite
tests the library as it is installed, against the sharedpool of this
checkout. Its extra test requirements (pytest-asyncio for redis-py's
asyncio tests) go into a venv that sees the system's packages, so nothing
is added to the machine's Python. Both runs of a suite use one
redis-server, flushed between them, and the shared run one manager at its
defaults (every database served).

Exit status: 0 when every regression is in ``known.toml``, 1 when one is
not, 2 when a suite could not be run at all (no sdist, a plain run that
passed nothing, a pool option the pool refuses).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

import sharedpool
from sharedpool.dev.launch import ManagerProcess
from sharedpool.dev.redis_server import RedisServer
from sharedpool.dev.suites import swap
from sharedpool.dev.suites.plugin import RESULTS_ENV

KNOWN_FILE = Path(__file__).with_name("known.toml")
# One run of one suite may take this long before it is stopped (CI's budget is minutes, not hours).
RUN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Suite:
    name: str
    distribution: str
    paths: tuple[str, ...]
    args: tuple[str, ...] = ()  # "{port}" is the server's port
    requirements: tuple[str, ...] = ()  # what the suite needs beyond the test extra
    env: tuple[tuple[str, str], ...] = ()
    asyncio: bool = False  # its clients are redis.asyncio's (the asyncio pool is swapped in)
    deselect: tuple[str, ...] = ()  # not run in either mode (REFERENCE.md says why)

    def argv(self, port: int) -> list[str]:
        deselected = [arg for test in self.deselect for arg in ("--deselect", test)]
        return [arg.format(port=port) for arg in self.args] + deselected + list(self.paths)


_REDIS_PY_MODULES = ("test_commands", "test_pipeline", "test_pubsub", "test_lock", "test_scripting", "test_encoding",
                     "test_function")
# redis-py's conftest asks a live server for its version at session start,
# from --redis-url; 30 s is its own per-test timeout, kept.
_REDIS_PY_ARGS = ("--redis-url", "redis://127.0.0.1:{port}/0")

_RQ_TESTS = ("tests/test_connection.py", *(
    f"tests/test_cli.py::TestRQCli::test_cli_enqueue_schedule_{case}" for case in ("in", "at", "at_front")
))

SUITES = {
    suite.name: suite
    for suite in (
        # test_auth sets the server's requirepass and relies on redis-py's
        # reconnect with the password to undo it: through the pool a
        # connection replaced meanwhile cannot be reopened by the manager, so
        # the server stays locked and every later test fails (seen once in
        # three runs here).
        Suite("redis-py", "redis", tuple(f"tests/{m}.py" for m in _REDIS_PY_MODULES), _REDIS_PY_ARGS,
              deselect=("tests/test_commands.py::TestRedisCommands::test_auth",)),
        Suite(
            "redis-py-asyncio", "redis", tuple(f"tests/test_asyncio/{m}.py" for m in _REDIS_PY_MODULES),
            _REDIS_PY_ARGS, requirements=("pytest-asyncio>=0.24",), asyncio=True,
        ),
        # rq's own tests (slow and SSL tests off, as by default): its
        # connection handling and `rq enqueue --schedule-at/in` with the
        # scheduler, which rebuilds the client from the pool's options. Not the
        # rest: most of its worker runs end with a wait of up to 60 s for the
        # worker's pub/sub thread (rq's sleep_time), plain as shared, so
        # test_cli and test_connection alone ran 31 tests in 4.5 minutes plain
        # here, and five modules had not ended a plain run in 13.
        Suite("rq", "rq", _RQ_TESTS),
        # django-redis's own tests (its sdist ships them): every settings
        # module of its conftest, each a set of CACHES on 127.0.0.1:6379.
        # Its pyproject's addopts ask for coverage and xdist workers, not
        # needed here (xdist stays loaded: its conftest implements an xdist
        # hook); the sentinel and unix-socket settings have no server of
        # theirs here and fail plain as shared.
        # Of its twelve settings modules, the three whose clients differ in
        # how they use pools (default, herd, sharding): the others vary the
        # serializer or compressor over the default client, and all twelve
        # took 18 minutes plain here.
        Suite("django-redis", "django-redis", ("tests",),
              ("-o", "addopts=", "-k", "not (gzip or json or lz4 or msgpack or sentinel or usock or zlib or zstd)"),
              requirements=("pytest-mock>=3", "msgpack>=1", "lz4>=4", "pyzstd>=0.16")),
    )
}


@dataclass
class Outcomes:
    """Each test's outcome in one run: passed, failed, skipped, xfailed, xpassed."""

    by_test: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # a failed test's exception line

    @classmethod
    def load(cls, path: Path) -> Outcomes:
        if not path.exists():
            return cls()
        errors = path.with_suffix(".errors.json")
        return cls(json.loads(path.read_text()), json.loads(errors.read_text()) if errors.exists() else {})

    def passed(self) -> set[str]:
        return {test for test, outcome in self.by_test.items() if outcome == "passed"}

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for outcome in self.by_test.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no tests"


@dataclass(frozen=True)
class Known:
    suite: str
    test: str  # a node id, or an fnmatch pattern of node ids
    reason: str
    # When set, only a failure whose exception line contains it is known: a
    # cause that comes and goes (leases leaked by earlier tests) without
    # hiding other failures of the same tests.
    failure: str = ""

    def matches(self, suite: str, test: str, error: str | None = None) -> bool:
        if suite != self.suite or not fnmatch.fnmatchcase(test, self.test):
            return False
        return not self.failure or error is None or self.failure in error


def load_known(path: Path = KNOWN_FILE) -> list[Known]:
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    known = []
    for entry in data.get("regression", []):
        missing = {"suite", "test", "reason"} - set(entry)
        if missing:
            raise ValueError(f"{path}: an entry lacks {', '.join(sorted(missing))}: {entry}")
        known.append(Known(str(entry["suite"]), str(entry["test"]), str(entry["reason"]), str(entry.get("failure", ""))))
    return known


@dataclass
class Verdict:
    suite: str
    plain: Outcomes
    shared: Outcomes
    known: list[Known]
    seconds: dict[str, float]

    @property
    def regressions(self) -> list[str]:
        return sorted(self.plain.passed() - self.shared.passed())

    def reason(self, test: str) -> str | None:
        error = self.shared.errors.get(test, "")
        for entry in self.known:
            if entry.matches(self.suite, test, error):
                return entry.reason
        return None

    @property
    def unexpected(self) -> list[str]:
        return [test for test in self.regressions if self.reason(test) is None]

    @property
    def stale(self) -> list[Known]:
        """Entries of this suite that no regression of this run matches: fixed, or renamed."""
        mine = [entry for entry in self.known if entry.suite == self.suite]
        return [entry for entry in mine if not any(entry.matches(self.suite, test) for test in self.regressions)]

    def report(self) -> str:
        lines = [
            f"== {self.suite}: plain {self.plain.summary()} ({self.seconds.get('plain', 0):.0f} s); "
            f"shared {self.shared.summary()} ({self.seconds.get('shared', 0):.0f} s)",
            f"   {len(self.regressions)} of {len(self.plain.passed())} plain passes do not pass shared; "
            f"{len(self.unexpected)} not in known.toml",
        ]
        for test in self.regressions:
            reason = self.reason(test)
            outcome = self.shared.by_test.get(test, "not run")
            lines.append(f"   {'known     ' if reason else 'REGRESSION'} {test} ({outcome})" + (f": {reason}" if reason else ""))
        for entry in self.stale:
            lines.append(f"   did not fail in this run (fixed? remove from known.toml once it passes for good): {entry.test}")
        return "\n".join(lines)


def fetch_sdist(distribution: str, version: str, into: Path) -> Path:
    """The unpacked sdist of ``distribution==version``: its directory under ``into``."""
    download = into / f"download-{distribution}-{version}"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"{distribution}=={version}", "-d", str(download)],
        check=True, timeout=300,
    )
    archives = sorted(download.glob("*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download gave no sdist of {distribution}=={version}")
    with tarfile.open(archives[0]) as archive:
        top = archive.getnames()[0].split("/")[0]
        # The sdist comes from PyPI through pip, as any install does; "data"
        # keeps its members inside the directory (and drops device files).
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # pragma: no cover - Pythons before the filter
            archive.extractall(into)
    return into / top


def suite_python(workdir: Path, requirements: Sequence[str]) -> str:
    """An interpreter that has ``requirements``: this one, or a venv over this one's packages."""
    if not requirements:
        return sys.executable
    env_dir = workdir / "venv"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True, timeout=300)
    return str(python)


def write_sitecustomize(workdir: Path) -> Path:
    """A directory whose sitecustomize installs the swap in every interpreter the suite starts."""
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "# Written by sharedpool.dev.suites: the suite's own subprocesses get the run's swap too.\n"
        "from sharedpool.dev.suites import swap\n\nswap.install_from_env()\n"
    )
    return site


def run_pytest(
    suite: Suite, mode: str, python: str, cwd: Path, site: Path, port: int, socket_path: str, log: Path,
    pool_options: dict[str, Any], extra: Sequence[str], client_autopipeline: bool = False,
) -> Outcomes:
    results = log.with_suffix(".json")
    results.unlink(missing_ok=True)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sharedpool.__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), package_root, os.environ.get("PYTHONPATH", "")) if p),
        swap.MODE_ENV: mode,
        swap.REDIS_PORT_ENV: str(port),
        swap.POOL_OPTIONS_ENV: json.dumps(pool_options),
        swap.CLIENT_AUTOPIPELINE_ENV: "1" if client_autopipeline else "",
        RESULTS_ENV: str(results),
        "SHAREDPOOL_SOCKET_PATH": socket_path,
        **dict(suite.env),
    }
    # --tb=native: pytest's own traceback formatting parses the test's source,
    # which CPython 3.11 can fail at after a RecursionError (an INTERNALERROR
    # that ends the run).
    argv = [python, "-m", "pytest", "-p", "sharedpool.dev.suites.plugin", "-p", "no:cacheprovider", "-q", "--tb=native",
            *suite.argv(port), *extra]
    with open(log, "w") as output:
        try:
            subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                           timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            output.write(f"\n[sharedpool.dev.suites] stopped after {RUN_TIMEOUT_S:.0f} s\n")
    return Outcomes.load(results)


def check_pool_options(pool_options: dict[str, Any], suites: Sequence[Suite]) -> str | None:
    """Why the shared pools do not take ``pool_options`` (None: they do).

    A pool "takes" an option it names among its own arguments: the others
    pass through to redis-py's connections, which refuse an unknown one only
    at the first lease, in the middle of the suite.
    """
    from sharedpool import SharedConnectionPool
    from sharedpool.asyncio import SharedConnectionPool as AsyncSharedConnectionPool

    classes = {AsyncSharedConnectionPool if suite.asyncio else SharedConnectionPool for suite in suites}
    for pool_class in sorted(classes, key=lambda c: c.__module__):
        named = inspect.signature(pool_class.__init__).parameters
        for name in pool_options:
            if name not in named or named[name].kind is inspect.Parameter.VAR_KEYWORD:
                return f"{pool_class.__module__}.{pool_class.__qualname__} has no {name!r} argument"
    return None


def run_suite(
    suite: Suite, workdir: Path, known: list[Known], pool_options: dict[str, Any], extra: Sequence[str],
    manager_settings: dict[str, Any], client_autopipeline: bool = False,
) -> Verdict:
    version = importlib.metadata.version(suite.distribution)
    source = workdir / f"{suite.distribution}-{version}"
    if not source.exists():
        fetched = fetch_sdist(suite.distribution, version, workdir / "sdists")
        shutil.move(str(fetched), source)
    python = suite_python(workdir, suite.requirements)
    site = write_sitecustomize(workdir)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    server = RedisServer(directory=str(workdir / f"redis-{suite.name}"))
    server.start()
    manager = ManagerProcess(
        socket_path=str(workdir / f"sp-{suite.name}" / "sp.sock"), redis_url=server.url,
        log_path=str(logs / f"{suite.name}-manager.log"), pool_name=f"suite-{suite.name}", **manager_settings,
    )
    seconds: dict[str, float] = {}
    try:
        outcomes: dict[str, Outcomes] = {}
        for mode in swap.MODES:
            if mode == "shared":
                manager.start()
            flush = server.client()
            flush.flushall()
            flush.close()
            started = time.monotonic()
            outcomes[mode] = run_pytest(
                suite, mode, python, source, site, server.port, manager.socket_path, logs / f"{suite.name}-{mode}.log",
                pool_options, extra, client_autopipeline,
            )
            seconds[mode] = time.monotonic() - started
            print(f"   {suite.name} {mode}: {outcomes[mode].summary()} in {seconds[mode]:.0f} s "
                  f"(log: {logs / f'{suite.name}-{mode}.log'})", flush=True)
    finally:
        manager.stop(timeout=10)
        server.cleanup()
    return Verdict(suite.name, outcomes["plain"], outcomes["shared"], known, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharedpool.dev.suites", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", default=sorted(SUITES), help=f"of {', '.join(sorted(SUITES))} (default: all)")
    parser.add_argument("--workdir", help="keep the sdists, logs and results here (default: a temporary directory, removed)")
    parser.add_argument("--pool-option", action="append", default=[], metavar="NAME=JSON",
                        help="a keyword argument for every shared pool, e.g. autopipeline=true")
    parser.add_argument("--client-autopipeline", action="store_true",
                        help="redis.asyncio clients of a shared pool batch, as sharedpool.asyncio.Redis(autopipeline=True)")
    parser.add_argument("--manager-option", action="append", default=[], metavar="NAME=JSON",
                        help="a manager setting (ManagerConfig field), e.g. max_connections=8 (default: its defaults)")
    parser.add_argument("--json", help="write every suite's regressions and outcomes to this file")
    # Anything else goes to pytest, e.g. -k EXPR, -x.
    args, extra = parser.parse_known_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"no suite {', '.join(unknown)}; known: {', '.join(sorted(SUITES))}")
    pool_options = dict(_option(text, parser) for text in args.pool_option)
    manager_settings = dict(_option(text, parser) for text in args.manager_option)
    known = load_known()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sharedpool-suites-"))
    workdir.mkdir(parents=True, exist_ok=True)
    refused = check_pool_options(pool_options, [SUITES[name] for name in args.suites])
    if refused:
        print(f"the shared pools do not take {pool_options}: {refused}", file=sys.stderr)
        return 2
    status = 0
    verdicts = []
    try:
        for name in args.suites:
            verdict = run_suite(SUITES[name], workdir, known, pool_options, extra, manager_settings, args.client_autopipeline)
            verdicts.append(verdict)
            print(verdict.report(), flush=True)
            if not verdict.plain.passed():
                print(f"   {name}: the plain run passed nothing: the suite did not run (see its log)", flush=True)
                status = 2
            elif verdict.unexpected and status == 0:
                status = 1
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps([
                {"suite": v.suite, "seconds": v.seconds, "regressions": {t: v.reason(t) for t in v.regressions},
                 "plain": v.plain.by_test, "shared": v.shared.by_test}
                for v in verdicts
            ], indent=1))
        if not args.workdir and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.workdir:
            print(f"logs kept in {workdir / 'logs'}", flush=True)
    total = sum(len(v.unexpected) for v in verdicts)
    print(f"{total} regressions not in known.toml" if status != 2 else "a suite could not be run", flush=True)
    return status


def _option(text: str, parser: argparse.ArgumentParser) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        parser.error(f"{text!r}: NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value
