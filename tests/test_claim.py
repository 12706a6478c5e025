"""The claim's lifecycle: what each step allows, as the store then shows it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from worker.idempotency import Claim, Claims, InProgress, RetryNote, SqliteStore, StoredRecord
from worker.ops.outage import Outage

KEY = "acme/key-1"
NOTE = RetryNote(attempts=1, error_code="vendor_unavailable", error_message="eset answered 503",
                 next_try_at=2_000_000_000.0)


def scenario(tmp_path: Path, steps: Callable[[Claims, SqliteStore], Awaitable[object]]) -> object:
    async def main() -> object:
        store = SqliteStore(tmp_path / "claims.sqlite3", lease_s=30, retention_s=600)
        try:
            return await steps(Claims(store, "replica", Outage({}), 5.0), store)
        finally:
            await store.close()

    return asyncio.run(main())


async def taken(claims: Claims) -> Claim:
    claim = await claims.take(KEY, "fingerprint")
    assert isinstance(claim, Claim)
    return claim


def test_a_claim_nothing_was_sent_under_is_given_back(tmp_path: Path):
    async def steps(claims: Claims, store: SqliteStore) -> StoredRecord | None:
        await (await taken(claims)).release()
        return await store.find(KEY)

    assert scenario(tmp_path, steps) is None


def test_a_sent_claim_is_never_given_back_without_an_outcome(tmp_path: Path):
    async def steps(claims: Claims, store: SqliteStore) -> object:
        claim = await taken(claims)
        assert await claim.sending()
        await claim.release()
        return await claims.take(KEY, "fingerprint")

    assert isinstance(scenario(tmp_path, steps), InProgress)


def test_a_transient_failure_gives_a_sent_claim_back_but_not_a_202(tmp_path: Path):
    async def steps(claims: Claims, store: SqliteStore) -> tuple[object, object]:
        sent = await taken(claims)
        await sent.sending()
        await sent.release_for_retry(NOTE)
        retried = await taken(claims)  # free again: the retry takes it
        assert await retried.sending()
        assert await retried.accepted("response-1")
        await retried.release_for_retry(NOTE)
        record = await store.find(KEY)
        return retried.sent, record and record.response_id

    assert scenario(tmp_path, steps) == (True, "response-1")


def test_a_claim_taken_over_carries_what_its_dead_holder_set_going(tmp_path: Path):
    async def steps(claims: Claims, store: SqliteStore) -> tuple[bool, str | None]:
        dead = await taken(claims)
        await dead.accepted("response-7")
        await store._run(lambda: store._db.execute("UPDATE claims SET lease_until = 0"))
        taker = await taken(claims)
        return taker.taken_after_send, taker.response_id

    assert scenario(tmp_path, steps) == (True, "response-7")


def test_a_lost_claim_says_no_before_a_send(tmp_path: Path):
    async def steps(claims: Claims, store: SqliteStore) -> tuple[bool, bool]:
        starved = await taken(claims)
        await store._run(lambda: store._db.execute("UPDATE claims SET lease_until = 0"))
        await taken(claims)  # another holder takes the key over
        return await starved.sending(), starved.lost

    assert scenario(tmp_path, steps) == (False, True)
