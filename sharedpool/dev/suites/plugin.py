"""pytest plugin: ``-p sharedpool.dev.suites.plugin`` runs a suite plain or shared (``SHAREDPOOL_SUITE_MODE``).

What it swaps is ``sharedpool.dev.suites.swap``'s; the plugin installs it
before the suite's conftest makes any pool, names the mode in the run's
header, and writes each test's outcome (node id: passed, failed, skipped,
xfailed, xpassed) as JSON to ``SHAREDPOOL_SUITE_RESULTS`` for the runner,
and beside it each failed test's exception line.
A test failed in any phase (setup, call, teardown) counts as failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sharedpool.dev.suites import swap

RESULTS_ENV = "SHAREDPOOL_SUITE_RESULTS"
_MODE = pytest.StashKey[str]()
_OUTCOMES = pytest.StashKey[dict[str, str]]()
_ERRORS = pytest.StashKey[dict[str, str]]()
# Worse outcomes win over better ones of another phase of the same test.
_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 2, "failed": 3}


def pytest_configure(config: pytest.Config) -> None:
    mode = swap.install_from_env()
    if mode is None:
        raise pytest.UsageError(f"sharedpool.dev.suites.plugin needs {swap.MODE_ENV} (one of {', '.join(swap.MODES)})")
    config.stash[_MODE] = mode
    config.stash[_OUTCOMES] = {}
    config.stash[_ERRORS] = {}


def pytest_report_header(config: pytest.Config) -> str:
    return f"sharedpool suite mode: {config.stash[_MODE]}"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG[0] if _CONFIG else None
    if config is None:
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when != "call" and report.passed:
        return  # setup and teardown passing say nothing of their own
    else:
        outcome = report.outcome
    if report.failed:
        config.stash[_ERRORS].setdefault(report.nodeid, _error_line(report.longreprtext))
    outcomes = config.stash[_OUTCOMES]
    previous = outcomes.get(report.nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        outcomes[report.nodeid] = outcome


_CONFIG: list[pytest.Config] = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path or hasattr(session.config, "workerinput"):
        return  # an xdist worker: its reports reach the controller, which writes them
    Path(path).write_text(json.dumps(session.config.stash[_OUTCOMES], indent=0, sort_keys=True))
    Path(path).with_suffix(".errors.json").write_text(json.dumps(session.config.stash[_ERRORS], indent=0, sort_keys=True))


def _error_line(text: str) -> str:
    """The exception line of a failure's report (``PoolTimeout: ...``): what known.toml's ``failure`` matches."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0].removeprefix("E").strip()
        if head.split(".")[-1].endswith(("Error", "Exception", "Timeout", "Mismatch", "Misconfigured", "Unavailable")):
            return line
    return lines[-1] if lines else ""
