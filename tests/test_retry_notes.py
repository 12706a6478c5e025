"""The note a key keeps while its work waits for a delayed retry (attempts so far, the
last error, when the next try is due): written by the handler, kept by the SQLite and
the Redis store alike, returned by ``find``, forgotten once the result is stored, and
said by ``command-relay result``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from worker.admin.results import describe_retry, look_up
from worker.handler import Handler
from worker.idempotency import Claimed, RetryNote, SqliteStore, claim_key, open_store
from worker.idempotency.store import NOTE_MESSAGE_CHARS
from worker.ops.outage import Outage
from worker.settings import EsetAccount, Settings, Tenant
from worker.settlement import Action
from worker.vendors.retries import RetryPolicy

from .command_line import cli_env, run_cli
from .harness import embedded
from .test_handler_outcomes import Clock, Vendor, command
from .test_idempotency import FP, LONG_S, stores
from .test_idempotency_index import failed, unique
from .test_vendor_calls import vendors_for


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:///{tmp_path / 'idempotency.sqlite3'}"


NOTE = RetryNote(attempts=2, error_code="vendor_unavailable",
                 error_message="fylr answered 503", next_try_at=2_000_000_000.0)


def test_a_key_released_for_a_retry_is_found_with_its_note(store_url: str):
    key = unique("key")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1:claim-1", unique("id"))
            await store.release(key, "worker-1:claim-1")
            assert await store.find(key) is None  # released, and nothing noted
            await store.note_retry(key, NOTE)
            waiting = await store.find(key)
            assert waiting is not None
            assert (waiting.holder, waiting.event, waiting.retry) == (None, None, NOTE)

    asyncio.run(scenario())


def test_the_retry_that_claims_the_key_keeps_its_note(store_url: str):
    key = unique("key")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.note_retry(key, NOTE)
            assert isinstance(await store.claim(key, FP, "worker-2:claim-2"), Claimed)
            running = await store.find(key)
            assert running is not None
            assert (running.holder, running.retry) == ("worker-2:claim-2", NOTE)

    asyncio.run(scenario())


def test_storing_the_result_forgets_the_note(store_url: str):
    key, command_id = unique("key"), unique("id")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.note_retry(key, NOTE)
            await store.claim(key, FP, "worker-2:claim-2", command_id)
            await store.complete(key, "worker-2:claim-2", failed(command_id, key), command_id)
            done = await store.find(key)
            assert done is not None and done.event is not None and done.retry is None
            assert await store.discard(key, done.event.id)
            assert await store.find(key) is None  # no note left to stand for the key

    asyncio.run(scenario())


def test_the_note_expires_with_the_retention(store_url: str):
    key = unique("key")

    async def scenario() -> None:
        store = open_store(store_url, lease_s=LONG_S, retention_s=0.3)
        try:
            await store.note_retry(key, NOTE)
            assert await store.find(key) is not None
            await asyncio.sleep(0.5)
            assert await store.find(key) is None
        finally:
            await store.close()

    asyncio.run(scenario())


ANY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
NOTE_LIKE = st.fixed_dictionaries({
    "attempts": st.integers() | ANY_JSON, "error_code": ANY_JSON,
    "error_message": st.text(min_size=400) | ANY_JSON,
    "next_try_at": st.floats() | st.integers() | ANY_JSON,
})


@given(st.one_of(st.none(), st.text(), st.binary(), ANY_JSON.map(json.dumps),
                 NOTE_LIKE.map(json.dumps)))
def test_whatever_is_stored_as_a_note_reads_as_a_note_that_can_be_said_or_none(stored: object):
    """Reading never raises, and a note read can always be said (a time a datetime
    holds, a message no longer than a note keeps)."""
    assert stored is None or isinstance(stored, (str, bytes))
    note = RetryNote.from_json(stored)
    if note is not None:
        assert len(note.error_message) <= NOTE_MESSAGE_CHARS
        assert "next try due at" in describe_retry(note)


def test_the_handler_notes_the_delayed_retry_it_schedules(tmp_path: Path):
    """Five 503s within the delivery: a delayed retry in 5 s, noted with the five
    attempts and the last error."""
    cmd = command("batch-delete")

    async def scenario() -> tuple[Action, RetryNote | None]:
        clock = Clock()
        policy = RetryPolicy(max_attempts=5, initial_wait_s=0.5, max_wait_s=30,
                             sleep=clock.sleep, clock=clock)
        settings = Settings(
            tenants={"default": Tenant(eset=EsetAccount(username="api@example.com",
                                                        password=SecretStr("pw")))},
            rate_limits={}, collect_interval_s=0,
        )
        store = SqliteStore(tmp_path / "claims.sqlite3", lease_s=30, retention_s=600)
        vendors = vendors_for(settings, policy, httpx.MockTransport(Vendor([503] * 5)))
        timings = replace(settings.handler_timings, command_timeout_s=60,
                          retry_in_process_s=20, retry_delays_s=(5.0,), claim_lease_s=30)
        try:
            handler = Handler(store, vendors, policy, timings, "this-replica", Outage({}))
            settlement = await handler.handle(cmd)
            found = await store.find(claim_key(cmd))
            return settlement.action, None if found is None else found.retry
        finally:
            await vendors.aclose()
            await store.close()

    before_s = time.time()
    action, note = asyncio.run(scenario())
    after_s = time.time()
    assert action is Action.DELAY
    assert note is not None
    assert (note.attempts, note.error_code) == (5, "vendor_unavailable")
    assert "503" in note.error_message
    assert before_s + 5 <= note.next_try_at <= after_s + 5


def test_result_says_what_a_command_waiting_for_a_retry_waits_for(tmp_path: Path):
    settings = Settings(**embedded(tmp_path))
    command_id, key = str(uuid.uuid4()), f"default/key-{uuid.uuid4()}"
    due_s = time.time() + 3600

    async def waiting_for_a_retry() -> None:
        store = open_store(settings.idempotency_url, 30, 3600)
        try:
            await store.claim(key, FP, "host:1234:abc:claim", f"default/{command_id}")
            await store.release(key, "host:1234:abc:claim")
            await store.note_retry(key, replace(NOTE, next_try_at=due_s))
            found = await look_up(store, command_id)
            assert found.state == "waiting"
        finally:
            await store.close()

    asyncio.run(waiting_for_a_retry())
    done = run_cli("result", command_id, env=cli_env(tmp_path, settings))
    assert done.returncode == 3, done.stderr
    said = done.stdout.strip()
    assert said.startswith("still running: waiting to be tried again")
    assert "2 attempts so far" in said and "vendor_unavailable (fylr answered 503)" in said
    due = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(due_s))
    assert f"next try due at {due}" in said
