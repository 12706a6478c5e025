"""Fixtures shared by the whole suite.

Servers: tests that need RabbitMQ or Redis read ``RELAY_TEST_AMQP_URL`` and
``RELAY_TEST_REDIS_URL`` (defaults: the local servers). Without a reachable server they
skip, saying why; with ``CI`` set they fail instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from worker.sandbox import SandboxConfig, SandboxServer

from .servers import unavailable

AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")
REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://localhost:6379/15")


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    address = (parsed.hostname or "localhost", parsed.port or default_port)
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, url: str, default_port: int) -> str:
    if _reachable(url, default_port):
        return url
    unavailable(f"{name} is not reachable at {url} (start it with: bash .ci/services)")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return require_server("RabbitMQ", AMQP_URL, 5672)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_server("Redis", REDIS_URL, 6379)


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(pending_s=0.1)) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    """The shared sandbox, with counters, caches, tokens and faults cleared."""
    sandbox_server.state.reset()
    return sandbox_server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
