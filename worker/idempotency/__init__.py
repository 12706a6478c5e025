"""The idempotency store (``store.py``: the protocol, and what a claim decides), with
its backends: SQLite (``sqlite.py``) and Redis (``redis.py``); and the claim on one key
as the handler and the vendor side use it (``claim.py``)."""

from __future__ import annotations

from pathlib import Path

from worker.idempotency.claim import Claim, ClaimOutcome, Claims
from worker.idempotency.sqlite import SqliteStore
from worker.idempotency.store import (
    Claimed,
    ClaimResult,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    RetryNote,
    StoredRecord,
    claim_key,
    command_ref,
    fingerprint,
    keep_retry_note,
    replica_of,
    tenant_scoped,
)
from worker.settings import TlsFiles

__all__ = [
    "Claim",
    "ClaimOutcome",
    "ClaimResult",
    "Claimed",
    "Claims",
    "Completed",
    "Conflict",
    "IdempotencyStore",
    "InProgress",
    "RetryNote",
    "SqliteStore",
    "StoredRecord",
    "claim_key",
    "command_ref",
    "fingerprint",
    "keep_retry_note",
    "open_store",
    "replica_of",
    "tenant_scoped",
]


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SQLITE_SCHEME = "sqlite:///"


def open_store(
    url: str, lease_s: float, retention_s: float, tls: TlsFiles | None = None
) -> IdempotencyStore:
    """The store of ``url``; ``tls``: the CA and client certificate of ``rediss://``
    (``Settings.tls.redis``), whose certificate and name are verified either way."""
    if url.startswith(REDIS_SCHEMES):
        from worker.idempotency.redis import RedisStore  # the redis extra: a fleet only

        return RedisStore(url, lease_s, retention_s, tls)
    if url.startswith(SQLITE_SCHEME):
        return SqliteStore(Path(url.removeprefix(SQLITE_SCHEME)), lease_s, retention_s)
    raise ValueError(f"unsupported idempotency store URL {url!r}: use sqlite:/// or redis://")
