"""Liveness sees a stuck handler loop: ``/healthz`` is served from a thread of its own,
so it fails (503, with the reason) once the loop has not stamped its heartbeat for
``RELAY_LIVENESS_STALL_S``, and answers 200 again once the loop runs; readiness keeps
its own checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from worker.sandbox import SandboxServer

from .harness import RunningRelay, embedded, running_relay

PATIENCE_S = 30.0  # how long a probe is retried for an answer to change: a loaded machine


@pytest.fixture
def relay(sandbox: SandboxServer, tmp_path: Path) -> Iterator[RunningRelay]:
    with running_relay(
        sandbox, **embedded(tmp_path, health_port=0, health_host="127.0.0.1",
                            liveness_stall_s=1.0)
    ) as running:
        yield running


def base_url(relay: RunningRelay) -> str:
    server = relay.service.health
    assert server is not None
    return f"http://127.0.0.1:{server.port}"


def answer_once(url: str, status: int) -> httpx.Response:
    """The first answer of ``url`` with ``status``, asked again until it comes (or the
    patience runs out, and the last answer is returned)."""
    give_up_at = time.monotonic() + PATIENCE_S
    while True:
        answer = httpx.get(url, timeout=PATIENCE_S)
        if answer.status_code == status or time.monotonic() > give_up_at:
            return answer
        time.sleep(0.1)


def test_healthz_fails_while_the_handler_loop_is_blocked_and_recovers_after(
    relay: RunningRelay,
):
    base = base_url(relay)
    assert answer_once(f"{base}/healthz", 200).status_code == 200
    unblock = threading.Event()
    # A blocking call on the loop, as a bug would make one: nothing else runs meanwhile.
    relay.service.loop.loop.call_soon_threadsafe(unblock.wait, PATIENCE_S * 2)
    try:
        stalled = answer_once(f"{base}/healthz", 503)
    finally:
        unblock.set()
    assert stalled.status_code == 503
    body = stalled.json()
    assert body["status"] == "stalled"
    assert body["reason"].startswith("the handler loop has not run for ")
    assert "RELAY_LIVENESS_STALL_S=1" in body["reason"]
    assert answer_once(f"{base}/healthz", 200).json() == {"status": "ok"}


def test_readiness_keeps_its_own_checks_while_the_loop_is_blocked_and_after(
    relay: RunningRelay,
):
    """Liveness adds no check to readiness: it asks the store on the loop, so a blocked
    loop leaves it not ready for the store (as it did before), and ready once it runs."""
    base = base_url(relay)
    unblock = threading.Event()
    relay.service.loop.loop.call_soon_threadsafe(unblock.wait, PATIENCE_S * 2)
    try:
        assert answer_once(f"{base}/healthz", 503).status_code == 503
        blocked = httpx.get(f"{base}/readyz", timeout=PATIENCE_S)
    finally:
        unblock.set()
    assert blocked.status_code == 503
    assert blocked.json()["checks"] == {"broker": True, "store": False}
    ready = answer_once(f"{base}/readyz", 200)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"broker": True, "store": True}}
