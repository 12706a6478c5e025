"""The idempotency store, SQLite and Redis alike: claim, complete, release, lease, retention.

Every test runs against both backends. Redis is shared, so each test uses its own key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from schemas.events import ResultEvent
from worker.idempotency import (
    Claimed,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    open_store,
)
from worker.replies import VendorReply
from worker.results import now, result_event

LONG_S = 60.0  # a lease or retention that does not run out during a test
FP, OTHER_FP = "a" * 64, "b" * 64


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:///{tmp_path / 'idempotency.sqlite3'}"


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4()}"


@asynccontextmanager
async def stores(
    url: str, count: int = 1, lease_s: float = LONG_S, retention_s: float = LONG_S
) -> AsyncIterator[list[IdempotencyStore]]:
    """``count`` independent stores over one backend, as separate workers would hold them
    (own SQLite connection on the same file, own Redis client)."""
    async with AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            store = open_store(url, lease_s=lease_s, retention_s=retention_s)
            stack.push_async_callback(store.close)
            opened.append(store)
        yield opened


def event(key: str) -> ResultEvent:
    return result_event(
        command_id=str(uuid.uuid4()),
        idempotency_key=key,
        command_type="cancel-task",
        tenant="default",
        outcome="succeeded",
        started_at=now(),
        attempts=1,
        reply=VendorReply(vendor="fylr", status=200, body={"status": {"acknowledged": "ok"}}),
    )


def test_first_claim_is_claimed(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url) as (store,):
            assert await store.claim(key, FP, "worker-1") == Claimed()

    asyncio.run(scenario())


def test_claim_while_another_holds_the_lease_is_in_progress(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            result = await store.claim(key, FP, "worker-2")
            assert isinstance(result, InProgress)
            assert result.holder == "worker-1"
            assert 0 < result.lease_left_s <= LONG_S

    asyncio.run(scenario())


def test_claim_after_complete_replays_the_stored_event(store_url: str, key: str) -> None:
    stored = event(key)

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.complete(key, "worker-1", stored, stored.data.command_id)
            assert await store.claim(key, FP, "worker-2") == Completed(stored)
            assert await store.claim(key, FP, "worker-1") == Completed(stored)

    asyncio.run(scenario())


@pytest.mark.parametrize("completed", [False, True], ids=["in-progress", "completed"])
def test_claim_with_a_different_fingerprint_is_a_conflict(
    store_url: str, key: str, completed: bool
) -> None:
    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            if completed:
                await store.complete(key, "worker-1", event(key), f"id-of-{key}")
            assert await store.claim(key, OTHER_FP, "worker-2") == Conflict()

    asyncio.run(scenario())


def test_expired_lease_is_taken_over(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url, lease_s=0.05) as (store,):
            await store.claim(key, FP, "worker-1")
            await asyncio.sleep(0.1)
            assert await store.claim(key, FP, "worker-2") == Claimed()
            # The new holder's lease is live: the old holder can not take it back.
            assert isinstance(await store.claim(key, FP, "worker-1"), InProgress)

    asyncio.run(scenario())


def test_a_renewed_lease_is_not_taken_over(store_url: str, key: str) -> None:
    """A live holder working longer than one lease keeps its claim."""

    async def scenario() -> None:
        async with stores(store_url, lease_s=0.3) as (store,):
            await store.claim(key, FP, "worker-1")
            for _ in range(3):
                await asyncio.sleep(0.15)
                await store.renew(key, "worker-1")
            assert isinstance(await store.claim(key, FP, "worker-2"), InProgress)

    asyncio.run(scenario())


def test_taking_over_after_a_send_says_so(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url, lease_s=0.05) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.mark_sent(key, "worker-1")
            await asyncio.sleep(0.1)
            assert await store.claim(key, FP, "worker-2") == Claimed(after_send=True)

    asyncio.run(scenario())


def test_taking_over_a_collect_gives_the_response_id(store_url: str, key: str) -> None:
    """A holder that died collecting a 202 leaves its response-id for the next one."""

    async def scenario() -> None:
        async with stores(store_url, lease_s=0.05) as (store,):
            await store.claim(key, FP, "worker-1")
            assert await store.mark_accepted(key, "worker-2", "r-1") is False
            assert await store.mark_accepted(key, "worker-1", "r-1") is True
            await asyncio.sleep(0.1)
            taken = await store.claim(key, FP, "worker-2")
            assert taken == Claimed(after_send=True, response_id="r-1")
            await asyncio.sleep(0.1)  # the taker died too, before it did anything
            assert await store.claim(key, FP, "worker-3") == taken

    asyncio.run(scenario())


def test_only_the_holder_can_renew_or_mark(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url, lease_s=0.05) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.renew(key, "worker-2")
            assert await store.mark_sent(key, "worker-2") is False  # it must not send
            assert await store.mark_sent(key, "worker-1") is True
            await asyncio.sleep(0.1)
            assert await store.claim(key, FP, "worker-3") == Claimed(after_send=True)

    asyncio.run(scenario())


def test_release_lets_the_key_be_claimed_again(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.release(key, "worker-1")
            assert await store.claim(key, FP, "worker-2") == Claimed()

    asyncio.run(scenario())


def test_release_by_another_owner_leaves_the_claim(store_url: str, key: str) -> None:
    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.release(key, "worker-2")
            assert isinstance(await store.claim(key, FP, "worker-2"), InProgress)

    asyncio.run(scenario())


def test_release_after_complete_keeps_the_result(store_url: str, key: str) -> None:
    stored = event(key)

    async def scenario() -> None:
        async with stores(store_url) as (store,):
            await store.claim(key, FP, "worker-1")
            await store.complete(key, "worker-1", stored, stored.data.command_id)
            await store.release(key, "worker-1")
            assert await store.claim(key, FP, "worker-2") == Completed(stored)

    asyncio.run(scenario())


@pytest.mark.parametrize("completed", [False, True], ids=["claimed", "completed"])
def test_records_vanish_after_the_retention_period(
    store_url: str, key: str, completed: bool
) -> None:
    async def scenario() -> None:
        async with stores(store_url, retention_s=0.1) as (store,):
            await store.claim(key, FP, "worker-1")
            if completed:
                await store.complete(key, "worker-1", event(key), f"id-of-{key}")
            await asyncio.sleep(0.2)
            # Gone: neither replayed, nor in progress, nor a conflict for another payload.
            assert await store.claim(key, OTHER_FP, "worker-2") == Claimed()

    asyncio.run(scenario())


def test_concurrent_claims_of_one_key_give_exactly_one_claimed(store_url: str, key: str) -> None:
    """Eight workers, each with its own store (connection or client), claim at once."""

    async def scenario() -> None:
        async with stores(store_url, count=8) as opened:
            results = await asyncio.gather(
                *(store.claim(key, FP, f"worker-{n}") for n, store in enumerate(opened))
            )
        assert results.count(Claimed()) == 1
        winner = f"worker-{results.index(Claimed())}"
        # Everyone else is told the winner holds the key.
        assert [r.holder for r in results if isinstance(r, InProgress)] == [winner] * 7

    asyncio.run(scenario())
