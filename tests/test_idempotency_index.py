"""Results found by command id (``command-relay result``) and released for a dead letter's
replay, in the SQLite and the Redis store alike: the id's entry is kept as long as its
key's record, and a conflicting command never takes a key over."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from schemas.events import ErrorCode, ErrorInfo, ResultEvent
from worker.idempotency import Claimed, Completed, Conflict, open_store
from worker.results import now, result_event

from .test_idempotency import FP, LONG_S, OTHER_FP, stores


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:///{tmp_path / 'idempotency.sqlite3'}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def failed(command_id: str, key: str) -> ResultEvent:
    return result_event(
        command_id=command_id, idempotency_key=key, command_type="cancel-task",
        tenant="default", outcome="failed", started_at=now(),
        error=ErrorInfo(code=ErrorCode.VENDOR_REJECTED, message="refused"),
    )


def test_a_claim_is_found_by_its_command_id_while_running_and_once_done(store_url: str):
    key, command_id = unique("key"), unique("id")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            assert await store.key_of(command_id) is None
            assert isinstance(await store.claim(key, FP, "worker-1", command_id), Claimed)
            assert await store.key_of(command_id) == key
            running = await store.find(key)
            assert running is not None and running.event is None
            assert running.holder == "worker-1" and 0 < running.lease_left_s <= LONG_S
            event = failed(command_id, key)
            await store.complete(key, "worker-1", event, event.data.command_id)
            done = await store.find(key)
            assert done is not None and done.event is not None and done.event.id == event.id

    asyncio.run(scenario())


def test_a_duplicate_is_indexed_to_the_key_it_replays_a_conflict_is_not(store_url: str):
    key, first, duplicate, conflicting = unique("key"), unique("a"), unique("b"), unique("c")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1", first)
            await store.complete(key, "worker-1", failed(first, key), first)
            assert isinstance(await store.claim(key, FP, "worker-2", duplicate), Completed)
            assert await store.key_of(duplicate) == key
            assert isinstance(await store.claim(key, OTHER_FP, "worker-3", conflicting), Conflict)
            assert await store.key_of(conflicting) is None

    asyncio.run(scenario())


def test_complete_indexes_the_command_it_is_given(store_url: str):
    """A rejection is stored under a key of its own and claimed without an id: its
    completion names the command."""
    key, command_id = unique("rejected:key"), unique("id")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.complete(key, "worker-1", failed(command_id, key), command_id)
            assert await store.key_of(command_id) == key

    asyncio.run(scenario())


def test_discard_forgets_only_the_event_it_names(store_url: str):
    key, command_id = unique("key"), unique("id")

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            assert not await store.discard(key, "no-such-event")
            await store.claim(key, FP, "worker-1", command_id)
            assert not await store.discard(key, "no-such-event")  # running: not a result
            event = failed(command_id, key)
            await store.complete(key, "worker-1", event, event.data.command_id)
            assert not await store.discard(key, "another-event")
            assert await store.discard(key, event.id)
            assert await store.find(key) is None
            assert isinstance(await store.claim(key, FP, "worker-2", command_id), Claimed)

    asyncio.run(scenario())


def test_the_id_entry_expires_with_the_retention(store_url: str):
    key, command_id = unique("key"), unique("id")

    async def scenario() -> None:
        store = open_store(store_url, lease_s=LONG_S, retention_s=0.3)
        try:
            await store.claim(key, FP, "worker-1", command_id)
            await store.complete(key, "worker-1", failed(command_id, key), command_id)
            assert await store.key_of(command_id) == key
            await asyncio.sleep(0.5)
            assert await store.key_of(command_id) is None
            assert await store.find(key) is None
        finally:
            await store.close()

    asyncio.run(scenario())
