"""The SQLite idempotency store deletes what its retention no longer keeps, so its file
stays bounded under a steady load; the clock is a fake one, so nothing waits for it.

``pytest -q -s tests/test_sqlite_store_growth.py`` prints the rows and file sizes."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

from schemas.events import ResultEvent
from worker.idempotency import SqliteStore
from worker.idempotency.sqlite import PURGE_BATCH, PURGE_EVERY_S
from worker.replies import VendorReply
from worker.results import now, result_event

RETENTION_S = 5.0
LEASE_S = 30.0
ROUND = PURGE_BATCH + PURGE_BATCH // 2  # commands per round: more than one purge batch
FP = "a" * 64


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self) -> None:
        self.now_s = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def open_store(path: Path, clock: FakeClock) -> SqliteStore:
    return SqliteStore(path, lease_s=LEASE_S, retention_s=RETENTION_S, clock=clock)


async def complete_commands(store: SqliteStore, count: int) -> list[str]:
    """``count`` commands claimed and completed, each with its own key and command id;
    their keys."""
    keys = []
    for _ in range(count):
        key, command_id = f"key-{uuid.uuid4()}", str(uuid.uuid4())
        await store.claim(key, FP, "worker-1", command_id)
        await store.complete(key, "worker-1", event(key, command_id), command_id)
        keys.append(key)
    return keys


def event(key: str, command_id: str) -> ResultEvent:
    return result_event(
        command_id=command_id,
        idempotency_key=key,
        command_type="cancel-task",
        tenant="default",
        outcome="succeeded",
        started_at=now(),
        attempts=1,
        reply=VendorReply(vendor="fylr", status=200, body={"status": {"acknowledged": "ok"}}),
    )


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def file_bytes(path: Path) -> int:
    """The database file's size once its write-ahead log is written back into it."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path.stat().st_size


def test_expired_rows_are_deleted_by_later_calls(tmp_path: Path):
    path, clock = tmp_path / "idempotency.sqlite3", FakeClock()

    async def scenario() -> None:
        store = open_store(path, clock)
        try:
            await complete_commands(store, ROUND)
            assert (rows(path, "claims"), rows(path, "command_ids")) == (ROUND, ROUND)
            clock.advance(RETENTION_S + PURGE_EVERY_S)
            await complete_commands(store, ROUND)
        finally:
            await store.close()

    asyncio.run(scenario())
    # Only the second round is left: the first one's claims and command ids are gone.
    assert (rows(path, "claims"), rows(path, "command_ids")) == (ROUND, ROUND)


def test_the_file_stops_growing_under_a_steady_load(tmp_path: Path):
    """Round after round of commands, each outliving the retention: the file keeps the
    size of one round (the freed pages are reused)."""
    path, clock = tmp_path / "idempotency.sqlite3", FakeClock()
    sizes = []

    async def scenario() -> None:
        store = open_store(path, clock)
        try:
            for _ in range(4):
                await complete_commands(store, ROUND)
                sizes.append(file_bytes(path))
                clock.advance(RETENTION_S + PURGE_EVERY_S)
        finally:
            await store.close()

    asyncio.run(scenario())
    print(f"\nfile bytes after each round of {ROUND} commands: {sizes}")
    assert max(sizes) <= sizes[0] * 1.05, sizes


def test_a_burst_s_free_pages_go_back_to_the_file_system(tmp_path: Path):
    """After a burst has expired, a few more calls give most of its pages back."""
    path, clock = tmp_path / "idempotency.sqlite3", FakeClock()
    burst = 3 * ROUND
    sizes = {}

    async def scenario() -> None:
        store = open_store(path, clock)
        try:
            await complete_commands(store, burst)
            sizes["burst"] = file_bytes(path)
            clock.advance(RETENTION_S + PURGE_EVERY_S)
            for _ in range(20):  # a quiet spell: a call every purge interval
                await complete_commands(store, 1)
                clock.advance(PURGE_EVERY_S)
            sizes["after"] = file_bytes(path)
        finally:
            await store.close()

    asyncio.run(scenario())
    print(f"\nfile bytes after a burst of {burst} commands, then after 20 quiet calls: {sizes}")
    assert rows(path, "claims") <= 20
    assert sizes["after"] < sizes["burst"] / 4, sizes


def test_a_claim_whose_lease_is_live_is_kept_past_its_retention(tmp_path: Path):
    """Its holder is still at work (renewing its lease) and will store its outcome."""
    path, clock = tmp_path / "idempotency.sqlite3", FakeClock()

    async def scenario() -> None:
        store = open_store(path, clock)
        try:
            await store.claim("held", FP, "worker-1")
            clock.advance(RETENTION_S + PURGE_EVERY_S)
            await store.renew("held", "worker-1")
            await store.ping()  # a later call, which purges
        finally:
            await store.close()

    asyncio.run(scenario())
    assert rows(path, "claims") == 1


def test_a_claim_whose_holder_is_gone_is_deleted_past_its_retention(tmp_path: Path):
    path, clock = tmp_path / "idempotency.sqlite3", FakeClock()

    async def scenario() -> None:
        store = open_store(path, clock)
        try:
            await store.claim("abandoned", FP, "worker-1")
            clock.advance(max(RETENTION_S, LEASE_S) + PURGE_EVERY_S)
            await store.ping()
        finally:
            await store.close()

    asyncio.run(scenario())
    assert rows(path, "claims") == 0
