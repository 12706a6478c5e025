"""``command-relay result``: a command's result, read from the idempotency store by the
command's id (or by its idempotency key), for as long as the store keeps it
(``RELAY_IDEMPOTENCY_RETENTION_S``, a day by default); and the stage it is at until then,
in the words ``result`` and ``send --wait``'s progress lines use."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from schemas.events import ResultEvent
from worker.handler import replay_for
from worker.idempotency import IdempotencyStore, RetryNote, StoredRecord, replica_of, tenant_scoped

State = Literal["done", "running", "waiting", "unknown"]


@dataclass(frozen=True)
class Lookup:
    state: State
    key: str | None = None
    event: ResultEvent | None = None  # when done
    # When done or running; when waiting for a delayed retry, the record of its note.
    record: StoredRecord | None = None

    def describe(self) -> str:
        """The state in a sentence (the event itself is printed apart)."""
        record = self.record
        if self.state == "unknown":
            return (
                "unknown or expired: no command with this id (or key) is in the idempotency "
                "store; results are kept for RELAY_IDEMPOTENCY_RETENTION_S after they finish"
            )
        if self.state == "waiting":
            line = f"still running: waiting to be tried again (key {self.key!r}"
            if record is not None and record.retry is not None:
                return f"{line}): {describe_retry(record.retry)}"
            return f"{line}: the command was taken up, and will be retried or redelivered)"
        if self.state == "running" and record is not None:
            return f"still running: key {self.key!r} is held by {record.holder}" + (
                _claim_stage(record, lease=True)
            )
        assert self.event is not None
        return f"{self.event.data.outcome} (key {self.key!r})"

    def stage(self) -> tuple[object, ...]:
        """What tells one stage of the work from the next (who holds it, sent, 202,
        which retry): the same while only the time left changes."""
        record = self.record
        if record is None:
            return (self.state,)
        return (self.state, record.holder, record.lease_left_s > 0, record.sent,
                record.response_id, record.retry)

    def progress(self) -> str | None:
        """The stage as a progress line of ``send --wait``; None while there is nothing
        to say (not taken up yet, or done: the event says it)."""
        record = self.record
        if self.state == "waiting":
            if record is None or record.retry is None:
                return "waiting to be tried again"
            return f"waiting for a delayed retry: {describe_retry(record.retry)}"
        if self.state != "running" or record is None or record.holder is None:
            return None
        return f"claimed by {replica_of(record.holder)}" + _claim_stage(record, lease=False)


def describe_retry(note: RetryNote, now_s: float | None = None) -> str:
    """``3 attempts so far, the last failed with vendor_unavailable (…); next try due at
    12:00:35 UTC (in 28s)``."""
    now_s = time.time() if now_s is None else now_s
    due = datetime.fromtimestamp(note.next_try_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    left_s = note.next_try_at - now_s
    when = f"in {left_s:.0f}s" if left_s >= 0 else f"{-left_s:.0f}s ago"
    attempts = f"{note.attempts} attempt{'s' if note.attempts != 1 else ''} so far"
    return (f"{attempts}, the last failed with {note.error_code} ({note.error_message}); "
            f"next try due at {due} ({when})")


def _claim_stage(record: StoredRecord, lease: bool) -> str:
    """What the holder of a claim has done so far, after its name."""
    line = ""
    if lease and record.lease_left_s > 0:
        line += f", lease {record.lease_left_s:.0f}s left"
    elif record.lease_left_s <= 0:
        line += ", whose worker stopped: the next delivery takes it over"
    if record.response_id:
        line += f"; collecting the vendor's answer {record.response_id} (it answered 202)"
    elif record.sent:
        line += "; sent to the vendor"
    if record.retry is not None:
        retry = record.retry
        line += (f"; tried again after {retry.attempts} attempt"
                 f"{'s' if retry.attempts != 1 else ''} (the last failed with "
                 f"{retry.error_code})")
    return line


async def look_up(
    store: IdempotencyStore,
    command_id: str | None = None,
    key: str | None = None,
    tenant: str = "default",
) -> Lookup:
    """The result of ``tenant``'s command with ``command_id``, or of its work of ``key``
    (ids and keys are each tenant's own)."""
    if command_id is not None:
        store_key = await store.key_of(tenant_scoped(tenant, command_id))
        if store_key is None:
            return Lookup("unknown")
    else:
        assert key is not None, "give a command id or a key"
        store_key = tenant_scoped(tenant, key)
    record = await store.find(store_key)
    # The key as the command named it: a work's key less its tenant's scope (a rejection
    # is stored under a digest of its own, and named by its event).
    key = store_key.partition("/")[2] or store_key
    if record is not None and record.event is not None:
        key = record.event.data.idempotency_key or key
    if record is None:
        # Known by its id: its claim was given up for a retry (or a redelivery).
        return Lookup("waiting" if command_id is not None else "unknown", key)
    if record.event is None:
        # No holder: released for a delayed retry, whose note the record carries.
        return Lookup("running" if record.holder is not None else "waiting", key,
                      record=record)
    event = record.event
    if command_id is not None and event.data.command_id != command_id:
        # Another command of the same key did the work: this one got its result replayed.
        event = replay_for(command_id, event)
    return Lookup("done", key, event, record)
