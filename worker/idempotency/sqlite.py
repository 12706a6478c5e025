"""The SQLite backend of the idempotency store: one host, the default.

Expired rows are deleted on the store's own thread, during the calls it serves: at most
:data:`PURGE_BATCH` rows of each table per call, once every :data:`PURGE_EVERY_S`, and on
every call while a batch comes back full (a backlog is worked off a batch per call, so no
call waits long for it). The freed pages are reused by new rows, so under a steady load
the file stays at the size of what the retention keeps. A file this store creates uses
incremental auto-vacuum: when more than half of its pages are free (after a burst), up
to :data:`RELEASE_PAGES` of them are given back to the file system per purge. (A file
from before keeps ``auto_vacuum=NONE``, which only a ``VACUUM`` changes; it reuses its
free pages but does not shrink.)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
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

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000  # how long a call waits for another process's write lock
PURGE_EVERY_S = 1.0  # how often expired rows are looked for (when the store is used)
PURGE_BATCH = 1000  # rows of one table deleted by one call, at most
RELEASE_PAGES = 1024  # free pages (4 MiB) given back to the file system per purge, at most
MAX_WAL_BYTES = 16 * 1024 * 1024  # the write-ahead log is cut back to this after a checkpoint


class SqliteStore:
    """SQLite in WAL mode, used from one thread so calls never share a connection.
    ``clock`` (Unix seconds) decides what has expired; tests pass a fake one."""

    def __init__(
        self, path: Path, lease_s: float, retention_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lease_s = lease_s
        self._retention_s = retention_s
        self._clock = clock
        self._purge_due_at = 0.0  # on the first call
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempotency")
        self._db = self._executor.submit(self._connect, path).result()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        # Takes effect in a new file only (before its first table); see the module's docstring.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA journal_size_limit={MAX_WAL_BYTES}")
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
        # What the purge looks for, without reading the whole table.
        db.execute("CREATE INDEX IF NOT EXISTS claims_expiry ON claims (expires_at)")
        db.execute("CREATE INDEX IF NOT EXISTS command_ids_expiry ON command_ids (expires_at)")
        db.execute("CREATE INDEX IF NOT EXISTS retry_notes_expiry ON retry_notes (expires_at)")
        return db

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._purging_before, fn, *args
            )
        except sqlite3.OperationalError as error:  # locked past the timeout, disk away
            raise StoreUnavailable("idempotency", error) from error

    def _purging_before(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, after a purge of expired rows when one is due (on this thread,
        so the purge shares the store's one connection)."""
        now = self._clock()
        if now >= self._purge_due_at:
            self._purge_due_at = now + PURGE_EVERY_S
            try:
                if self._purge(now):
                    self._purge_due_at = now  # more to delete: again on the next call
            except sqlite3.OperationalError:  # another process writes: the next purge will
                log.debug("expired rows not purged this time", exc_info=True)
        return fn(*args)

    def _purge(self, now: float) -> bool:
        """Delete a batch of expired rows from each table; True when more may be left.

        A claim whose lease is live is kept even past its retention: its holder is still
        at work and will store its outcome in it (``claim`` already ignores it). It never
        waits for another process's write lock: the call it comes before would wait too."""
        self._db.execute("PRAGMA busy_timeout=0")
        try:
            return self._purge_batch(now)
        finally:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _purge_batch(self, now: float) -> bool:
        claims = self._db.execute(
            "DELETE FROM claims WHERE rowid IN (SELECT rowid FROM claims WHERE expires_at <= ?"
            " AND (event IS NOT NULL OR lease_until <= ?) LIMIT ?)",
            (now, now, PURGE_BATCH),
        ).rowcount
        command_ids, notes = (
            self._db.execute(
                f"DELETE FROM {table} WHERE rowid IN"
                f" (SELECT rowid FROM {table} WHERE expires_at <= ? LIMIT ?)",
                (now, PURGE_BATCH),
            ).rowcount
            for table in ("command_ids", "retry_notes")
        )
        self._release_free_pages()
        return max(claims, command_ids, notes) == PURGE_BATCH

    def _release_free_pages(self) -> None:
        """Give free pages back to the file system once they are more than half the file
        (a burst is over); fewer are kept for the rows to come."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        total = self._db.execute("PRAGMA page_count").fetchone()[0]
        if free * 2 > total:
            # As a script: one execute() runs the pragma one step, which frees one page.
            self._db.executescript(f"PRAGMA incremental_vacuum({RELEASE_PAGES});")

    async def claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None = None
    ) -> ClaimResult:
        result: ClaimResult = await self._run(self._claim, key, fingerprint, owner, command_ref)
        return result

    def _row(self, key: str, now: float) -> Any:
        """The key's claim, unless it expired."""
        return self._db.execute(
            "SELECT fingerprint, owner, lease_until, event, sent, response_id FROM claims"
            " WHERE key = ? AND expires_at > ?",
            (key, now),
        ).fetchone()

    def _claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None
    ) -> ClaimResult:
        now = self._clock()
        self._db.execute("BEGIN IMMEDIATE")  # other processes on this file wait here
        try:
            row = self._row(key, now)
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
        now = self._clock()
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
                (self._clock() + self._lease_s, key, owner),
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
        await self._run(self._note_retry, key, note.to_json(), self._clock())

    def _note_retry(self, key: str, note_json: str, now: float) -> None:
        # Notes are deleted when their result is stored; those of work never finished
        # (its message purged) are purged once expired, like the other rows.
        self._db.execute(
            "INSERT OR REPLACE INTO retry_notes VALUES (?, ?, ?)",
            (key, note_json, now + self._retention_s),
        )

    async def find(self, key: str) -> StoredRecord | None:
        row, noted = await self._run(self._find, key, self._clock())
        retry = RetryNote.from_json(noted[0]) if noted else None
        if row is None:
            return None if retry is None else StoredRecord.waiting(key, retry)
        _, owner, lease_until, event, sent, response_id = row
        return StoredRecord(
            key=key,
            event=ResultEvent.model_validate_json(event) if event is not None else None,
            holder=owner,
            lease_left_s=lease_until - self._clock(),
            sent=bool(sent),
            response_id=response_id,
            retry=retry,
        )

    def _find(self, key: str, now: float) -> tuple[Any, Any]:
        """The key's claim row and its retry note's, read in one transaction."""
        self._db.execute("BEGIN")
        try:
            row = self._row(key, now)
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
                (command_ref, self._clock()),
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
