"""The idempotency store: one claim per idempotency key, and the outbox of its result.

A handler claims the key before calling a vendor, marks the claim "sent" just before a
mutation goes out, renews the lease while it works, and stores the result event with the
claim before that event is published, so a crash between publish and ack re-publishes
the stored event instead of calling the vendor again. A claim carries a lease: a claim
whose holder died is taken over once the lease has run out. Records expire after the
retention period.

``claim`` answers what happened, atomically, and races are settled by the store:

* :class:`Claimed`: this worker now holds the key and must do the work; ``after_send``
  says it took the key over from a holder that died after it may have called the vendor,
  and ``response_id`` the ESET 202 that holder was collecting, if it got that far;
* :class:`InProgress`: a live holder is doing it: defer, do not call the vendor;
* :class:`Completed`: done before: replay the stored event;
* :class:`Conflict`: the key was used for a different payload: reject.

Backends: SQLite (one host; the default) and Redis (a fleet), chosen by URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas.commands import Command
from schemas.events import ResultEvent
from worker.errors import StoreUnavailable


@dataclass(frozen=True)
class Claimed:
    after_send: bool = False  # taken over from a holder that had (maybe) sent the mutation
    response_id: str | None = None  # the vendor's 202 that holder was collecting


@dataclass(frozen=True)
class InProgress:
    holder: str
    lease_left_s: float


@dataclass(frozen=True)
class Completed:
    event: ResultEvent


@dataclass(frozen=True)
class Conflict:
    pass


ClaimResult = Claimed | InProgress | Completed | Conflict


def fingerprint(command: Command) -> str:
    """What makes two commands the same work: type, tenant and params (not id or deadline)."""
    payload = command.model_dump(mode="json", include={"type", "tenant", "params"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class IdempotencyStore(Protocol):
    async def claim(self, key: str, fingerprint: str, owner: str) -> ClaimResult:
        """Take the key for ``owner``, or say why not."""
        ...

    async def complete(self, key: str, owner: str, event: ResultEvent) -> None:
        """Store the terminal event with the claim; it is replayed from now on."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give the claim up without a result, so the work can be tried again."""
        ...

    async def renew(self, key: str, owner: str) -> None:
        """Extend ``owner``'s lease: it is alive and still working."""
        ...

    async def mark_sent(self, key: str, owner: str) -> bool:
        """Record that the vendor may act, just before the mutation is sent; False when
        ``owner`` no longer holds the claim (it must then not send)."""
        ...

    async def mark_accepted(self, key: str, owner: str, response_id: str) -> bool:
        """Record the vendor's 202 ``response-id`` (and "sent") before collecting it, so a
        worker that takes the key over collects it instead of giving the result up;
        False when ``owner`` no longer holds the claim."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def open_store(url: str, lease_s: float, retention_s: float) -> IdempotencyStore:
    if url.startswith(("redis://", "rediss://", "unix://")):
        from worker.idempotency_redis import RedisStore

        return RedisStore(url, lease_s, retention_s)
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")), lease_s, retention_s)
    raise ValueError(f"unsupported idempotency store URL {url!r}: use sqlite:/// or redis://")


# fingerprint, owner, lease, event, sent, response_id
Record = tuple[str, str, float, str | None, bool, str | None]


def _decide(row: Record | None, fingerprint: str, now: float) -> ClaimResult:
    """What an existing record (or none) means for a new claim; :class:`Claimed` means
    the caller takes the key."""
    if row is None:
        return Claimed()
    stored_fingerprint, holder, lease_until, event, sent, response_id = row
    if stored_fingerprint != fingerprint:
        return Conflict()
    if event is not None:
        return Completed(ResultEvent.model_validate_json(event))
    if lease_until > now:
        return InProgress(holder, lease_until - now)
    # The holder's lease ran out: take over.
    return Claimed(after_send=sent, response_id=response_id if sent else None)


class SqliteStore:
    """SQLite in WAL mode, used from one thread so calls never share a connection."""

    def __init__(self, path: Path, lease_s: float, retention_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lease_s = lease_s
        self._retention_s = retention_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempotency")
        self._db = self._executor.submit(self._connect, path).result()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
            " owner TEXT NOT NULL, lease_until REAL NOT NULL, event TEXT,"
            " expires_at REAL NOT NULL, sent INTEGER NOT NULL DEFAULT 0, response_id TEXT)"
        )
        columns = {row[1] for row in db.execute("PRAGMA table_info(claims)")}
        if "response_id" not in columns:  # a file from before 202s were kept with the claim
            db.execute("ALTER TABLE claims ADD COLUMN response_id TEXT")
        return db

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as error:  # locked past the timeout, disk away
            raise StoreUnavailable("idempotency", error) from error

    async def claim(self, key: str, fingerprint: str, owner: str) -> ClaimResult:
        result: ClaimResult = await self._run(self._claim, key, fingerprint, owner)
        return result

    def _claim(self, key: str, fingerprint: str, owner: str) -> ClaimResult:
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")  # other processes on this file wait here
        try:
            row = self._db.execute(
                "SELECT fingerprint, owner, lease_until, event, sent, response_id FROM claims"
                " WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            record: Record | None = (*row[:4], bool(row[4]), row[5]) if row else None
            decided = _decide(record, fingerprint, now)
            if isinstance(decided, Claimed):
                # A taker inherits what a dead holder may have set going ("sent", a 202).
                self._db.execute(
                    "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                    (key, fingerprint, owner, now + self._lease_s, now + self._retention_s,
                     int(decided.after_send), decided.response_id),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return decided

    async def complete(self, key: str, owner: str, event: ResultEvent) -> None:
        await self._run(self._complete, key, event.model_dump_json())

    def _complete(self, key: str, event_json: str) -> None:
        # Stored whoever holds the lease now: the work is done and its answer is the truth.
        self._db.execute(
            "UPDATE claims SET event = ?, expires_at = ? WHERE key = ?",
            (event_json, time.time() + self._retention_s, key),
        )

    async def release(self, key: str, owner: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "DELETE FROM claims WHERE key = ? AND owner = ? AND event IS NULL", (key, owner)
            )
        )

    async def renew(self, key: str, owner: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE claims SET lease_until = ? WHERE key = ? AND owner = ? AND event IS NULL",
                (time.time() + self._lease_s, key, owner),
            )
        )

    async def mark_sent(self, key: str, owner: str) -> bool:
        cursor = await self._run(
            lambda: self._db.execute(
                "UPDATE claims SET sent = 1 WHERE key = ? AND owner = ? AND event IS NULL",
                (key, owner),
            )
        )
        return bool(cursor.rowcount == 1)

    async def mark_accepted(self, key: str, owner: str, response_id: str) -> bool:
        cursor = await self._run(
            lambda: self._db.execute(
                "UPDATE claims SET sent = 1, response_id = ?"
                " WHERE key = ? AND owner = ? AND event IS NULL",
                (response_id, key, owner),
            )
        )
        return bool(cursor.rowcount == 1)

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)
