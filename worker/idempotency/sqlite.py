"""The SQLite backend of the idempotency store: one host, the default."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from schemas.events import ResultEvent
from worker.errors import StoreUnavailable
from worker.idempotency.store import (
    Claimed,
    ClaimResult,
    Conflict,
    Record,
    RetryNote,
    StoredRecord,
    _decide,
)


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
        # The key of each command id, kept as long as the key's record.
        db.execute(
            "CREATE TABLE IF NOT EXISTS command_ids (command_id TEXT PRIMARY KEY,"
            " key TEXT NOT NULL, expires_at REAL NOT NULL)"
        )
        # The note of a key waiting for a delayed retry (RetryNote, as JSON).
        db.execute(
            "CREATE TABLE IF NOT EXISTS retry_notes (key TEXT PRIMARY KEY, note TEXT NOT NULL,"
            " expires_at REAL NOT NULL)"
        )
        return db

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as error:  # locked past the timeout, disk away
            raise StoreUnavailable("idempotency", error) from error

    async def claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None = None
    ) -> ClaimResult:
        result: ClaimResult = await self._run(self._claim, key, fingerprint, owner, command_ref)
        return result

    def _claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None
    ) -> ClaimResult:
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
            if command_ref is not None and not isinstance(decided, Conflict):
                self._index(command_ref, key, now, replace=True)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return decided

    def _index(self, command_ref: str, key: str, now: float, replace: bool) -> None:
        upsert = (
            "INSERT INTO command_ids VALUES (?, ?, ?) ON CONFLICT(command_id) DO UPDATE SET"
            " key = excluded.key, expires_at = excluded.expires_at"
        )
        expires_at = now + self._retention_s
        if replace:
            self._db.execute(upsert, (command_ref, key, expires_at))
        else:  # a live entry stays as it is; an expired one is taken
            self._db.execute(upsert + " WHERE command_ids.expires_at <= ?",
                             (command_ref, key, expires_at, now))

    async def complete(
        self, key: str, owner: str, event: ResultEvent, command_ref: str,
        replace_ref: bool = True,
    ) -> None:
        await self._run(
            self._complete, key, event.model_dump_json(), command_ref, replace_ref
        )

    def _complete(self, key: str, event_json: str, command_ref: str, replace_ref: bool) -> None:
        # Stored whoever holds the lease now: the work is done and its answer is the truth.
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cursor = self._db.execute(
                "UPDATE claims SET event = ?, expires_at = ? WHERE key = ?",
                (event_json, now + self._retention_s, key),
            )
            if cursor.rowcount:
                self._index(command_ref, key, now, replace_ref)
            self._db.execute("DELETE FROM retry_notes WHERE key = ?", (key,))  # done waiting
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

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

    async def note_retry(self, key: str, note: RetryNote) -> None:
        await self._run(self._note_retry, key, note.to_json(), time.time())

    def _note_retry(self, key: str, note_json: str, now: float) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # Notes are deleted when their result is stored; those of work never finished
            # (its message purged) go once expired, so the table holds few rows.
            self._db.execute("DELETE FROM retry_notes WHERE expires_at <= ?", (now,))
            self._db.execute(
                "INSERT OR REPLACE INTO retry_notes VALUES (?, ?, ?)",
                (key, note_json, now + self._retention_s),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def find(self, key: str) -> StoredRecord | None:
        row, noted = await self._run(self._find, key, time.time())
        retry = RetryNote.from_json(noted[0]) if noted else None
        if row is None:
            return None if retry is None else StoredRecord.waiting(key, retry)
        _, owner, lease_until, event, sent, response_id = row
        return StoredRecord(
            key=key,
            event=ResultEvent.model_validate_json(event) if event is not None else None,
            holder=owner,
            lease_left_s=lease_until - time.time(),
            sent=bool(sent),
            response_id=response_id,
            retry=retry,
        )

    def _find(self, key: str, now: float) -> tuple[Any, Any]:
        """The key's claim row and its retry note's, read in one transaction."""
        self._db.execute("BEGIN")
        try:
            row = self._db.execute(
                "SELECT fingerprint, owner, lease_until, event, sent, response_id FROM claims"
                " WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            noted = self._db.execute(
                "SELECT note FROM retry_notes WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
        finally:
            self._db.execute("COMMIT")
        return row, noted

    async def key_of(self, command_ref: str) -> str | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT key FROM command_ids WHERE command_id = ? AND expires_at > ?",
                (command_ref, time.time()),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def discard(self, key: str, event_id: str) -> bool:
        cursor = await self._run(
            lambda: self._db.execute(
                "DELETE FROM claims WHERE key = ? AND event IS NOT NULL"
                " AND json_extract(event, '$.id') = ?",
                (key, event_id),
            )
        )
        return bool(cursor.rowcount == 1)

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)
