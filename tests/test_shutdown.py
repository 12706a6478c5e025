"""Stopping a worker with commands still running: past the grace period each handler is
cancelled while the stores are still open, and lets go of what it may; nothing is left
running on a loop that closes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pytest

from worker.idempotency import open_store, tenant_scoped
from worker.sandbox import Faults, SandboxServer, ScriptedFault

from .harness import embedded, running_relay


def test_a_read_running_past_the_grace_is_let_go_and_nothing_is_left_on_the_loop(
    sandbox: SandboxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # ESET answers 202, and the worker waits a long while between collects.
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])
    settings = embedded(tmp_path, shutdown_grace_s=0.3, collect_interval_s=30)
    key = f"patching-{uuid.uuid4()}"
    with caplog.at_level(logging.DEBUG), running_relay(sandbox, **settings) as relay:
        relay.send({"type": "fetch-patching", "idempotency_key": key, "params": {}})
        deadline = time.monotonic() + 10
        while not sandbox.state.stats()["calls"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox.state.stats()["calls"], "the call never reached the vendor"
        relay.stop()

    async def claim_left() -> object:
        store = open_store(settings["idempotency_url"], 30, 600)
        try:
            return await store.find(tenant_scoped("default", key))
        finally:
            await store.close()

    assert asyncio.run(claim_left()) is None  # a read: its claim let go, free to run again
    said = caplog.text
    assert "still in flight at shutdown" in said
    for trouble in ("Task was destroyed", "Event loop is closed", "closed database"):
        assert trouble not in said


def test_a_reply_to_that_is_not_text_is_ignored_not_a_crash(
    sandbox: SandboxServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A lone surrogate in ``reply_to`` can name no queue: the event says so, and the
    command is settled like any other (not rejected to the dead-letter queue unseen)."""
    with caplog.at_level(logging.INFO), running_relay(sandbox, **embedded(tmp_path)) as relay:
        command_id = str(uuid.uuid4())
        relay.client.publish({"type": "cancel-task", "id": command_id,
                              "params": {"task_id": 41}}, reply_to="relay.replies.\ud800")
        deadline = time.monotonic() + 15
        while "command succeeded" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # its settlement, right after
        letters = relay.dead_letters(timeout_s=0.5)
    assert "command succeeded" in caplog.text
    assert "settling failed" not in caplog.text
    assert letters == []
