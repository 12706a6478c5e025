"""The handler's answers to a store that goes away and to a rejected message sent again:
a command is held through an outage (never failed for it), and a rejection is stored
and replayed like any other outcome."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from schemas.events import ResultEvent
from worker.broker.decoding import decode_message
from worker.errors import StoreUnavailable
from worker.handler import Handler
from worker.idempotency import ClaimResult, SqliteStore
from worker.ops.outage import Outage
from worker.sandbox import SandboxServer
from worker.settlement import Action, Settlement
from worker.vendors.retries import RetryPolicy

from .test_vendor_calls import cancel_task, settings_for, vendors_for


class FlakyStore(SqliteStore):
    """A SQLite store whose first ``down_for`` calls find it unreachable."""

    def __init__(self, path: Path, down_for: int) -> None:
        super().__init__(path, lease_s=30, retention_s=600)
        self.down_for = down_for
        self.refused = 0

    def _away(self) -> None:
        if self.refused < self.down_for:
            self.refused += 1
            raise StoreUnavailable("idempotency", ConnectionRefusedError())

    async def claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None = None
    ) -> ClaimResult:
        self._away()
        return await super().claim(key, fingerprint, owner, command_ref)

    async def complete(
        self, key: str, owner: str, event: ResultEvent, command_ref: str,
        replace_ref: bool = True,
    ) -> None:
        self._away()
        await super().complete(key, owner, event, command_ref, replace_ref)

    async def ping(self) -> None:
        self._away()


def run(sandbox: SandboxServer, store: SqliteStore, *messages: Any) -> list[Settlement]:
    settings = settings_for(sandbox)
    policy = RetryPolicy(max_attempts=2, initial_wait_s=0.01, max_wait_s=0.05)

    async def main() -> list[Settlement]:
        outage = Outage({"idempotency": store.ping}, probe_interval_s=0.01)
        vendors = vendors_for(settings, policy)
        timings = replace(settings.handler_timings, command_timeout_s=10)
        handler = Handler(store, vendors, policy, timings, "test-owner", outage)
        try:
            return [await handler.handle(message) for message in messages]
        finally:
            await vendors.aclose()
            await store.close()

    return asyncio.run(main())


def test_a_command_is_held_through_a_store_outage_and_then_done_once(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    store = FlakyStore(tmp_path / "store.sqlite3", down_for=5)
    (settlement,) = run(sandbox, store, cancel_task(4242).with_defaults("m-held"))
    assert store.refused == 5
    assert settlement.event is not None and settlement.event.data.outcome == "succeeded"
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"4242": 1}


def test_a_rejected_message_sent_again_gets_its_rejection_replayed(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    body = json.dumps({"type": "cancel-task", "params": {"task_id": "12"}}).encode()
    store = SqliteStore(tmp_path / "store.sqlite3", lease_s=30, retention_s=600)
    first, again = run(
        sandbox, store, decode_message(body, "same-message"), decode_message(body, "same-message")
    )
    assert first.event is not None and again.event is not None
    assert (first.event.data.outcome, first.event.data.replayed) == ("rejected", False)
    assert first.action is Action.DEAD_LETTER
    assert (again.event.data.outcome, again.event.data.replayed) == ("rejected", True)
    assert again.action is Action.ACK  # the original is in the dead-letter queue already
    assert again.event.data.command_id == "same-message"


def test_a_fixed_command_under_the_same_key_is_judged_afresh(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    bad = {"type": "cancel-task", "idempotency_key": "k-fix", "params": {"task_id": "13"}}
    good = {**bad, "params": {"task_id": 13}}
    store = SqliteStore(tmp_path / "store.sqlite3", lease_s=30, retention_s=600)
    rejected, done = run(
        sandbox, store,
        decode_message(json.dumps(bad).encode(), "m-1"),
        decode_message(json.dumps(good).encode(), "m-2"),
    )
    assert rejected.event is not None and rejected.event.data.outcome == "rejected"
    assert done.event is not None and done.event.data.outcome == "succeeded"
