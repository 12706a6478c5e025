"""Fixtures of the chaos scenarios, and the report of their figures.

Each scenario's figures are printed (visible with ``-s``), listed in a "chaos figures"
section at the end of the pytest output, and appended as a JSON line to the file named
by ``CHAOS_REPORT`` when that is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .checks import missing
from .figures import Figures
from .redis_server import RedisServer
from .rig import ChaosRig

FIGURES = pytest.StashKey[list[Figures]]()

Report = Callable[[Figures], None]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: worker replicas as processes killed, restarted and starved against real "
        "RabbitMQ and Redis (slow; select with -m chaos, leave out with -m 'not chaos')",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.write_sep("=", "chaos figures")
        for one in figures:
            terminalreporter.write_line(one.summary())


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Record a scenario's figures (printed, summarised at the end, CHAOS_REPORT)."""

    def record(figures: Figures) -> None:
        request.config.stash.setdefault(FIGURES, []).append(figures)
        print(figures.summary())
        path = os.environ.get("CHAOS_REPORT")
        if path:
            with Path(path).open("a") as out:
                out.write(figures.as_json() + "\n")

    return record


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the scenario's own (``redis_server.py``), killed whatever happens."""
    binary = RedisServer.binary_path()
    if binary is None:
        missing("redis-server is not installed here (bash .ci/services installs it)")
    assert binary is not None
    server = RedisServer(tmp_path, binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def rig(
    request: pytest.FixtureRequest, amqp_url: str, redis_url: str, tmp_path: Path
) -> Iterator[ChaosRig]:
    """A scenario's world, torn down (every process killed) whatever happens."""
    scenario = request.node.name.removeprefix("test_")
    chaos_rig = ChaosRig(scenario, amqp_url, redis_url, tmp_path)
    try:
        yield chaos_rig
    finally:
        chaos_rig.close()
