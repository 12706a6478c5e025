"""``command-relay result``: a command's result, read from the idempotency store by the
command's id (or by its idempotency key), for as long as the store keeps it
(``RELAY_IDEMPOTENCY_RETENTION_S``, a day by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.events import ResultEvent
from worker.handler import replay_for
from worker.idempotency import IdempotencyStore, StoredRecord, tenant_scoped

State = Literal["done", "running", "waiting", "unknown"]


@dataclass(frozen=True)
class Lookup:
    state: State
    key: str | None = None
    event: ResultEvent | None = None  # when done
    record: StoredRecord | None = None  # when done or running

    def describe(self) -> str:
        """The state in a sentence (the event itself is printed apart)."""
        record = self.record
        if self.state == "unknown":
            return (
                "unknown or expired: no command with this id (or key) is in the idempotency "
                "store; results are kept for RELAY_IDEMPOTENCY_RETENTION_S after they finish"
            )
        if self.state == "waiting":
            return (
                f"still running: waiting to be tried again (key {self.key!r}: the command was "
                "taken up, and will be retried or redelivered)"
            )
        if self.state == "running" and record is not None:
            line = f"still running: key {self.key!r} is held by {record.holder}"
            if record.lease_left_s > 0:
                line += f", lease {record.lease_left_s:.0f}s left"
            else:
                line += ", whose worker stopped: the next delivery takes it over"
            if record.response_id:
                line += f"; collecting the vendor's answer {record.response_id}"
            elif record.sent:
                line += "; sent to the vendor"
            return line
        assert self.event is not None
        return f"{self.event.data.outcome} (key {self.key!r})"


async def look_up(
    store: IdempotencyStore,
    command_id: str | None = None,
    key: str | None = None,
    tenant: str = "default",
) -> Lookup:
    """The result of ``tenant``'s command with ``command_id``, or of its work of ``key``
    (ids and keys are each tenant's own)."""
    if command_id is not None:
        scoped = await store.key_of(tenant_scoped(tenant, command_id))
        if scoped is None:
            return Lookup("unknown")
        key = scoped.partition("/")[2]
    assert key is not None, "give a command id or a key"
    record = await store.find(tenant_scoped(tenant, key))
    if record is None:
        # Known by its id: its claim was given up for a retry (or a redelivery).
        return Lookup("waiting" if command_id is not None else "unknown", key)
    if record.event is None:
        return Lookup("running", key, record=record)
    event = record.event
    if command_id is not None and event.data.command_id != command_id:
        # Another command of the same key did the work: this one got its result replayed.
        event = replay_for(command_id, event)
    return Lookup("done", key, event, record)
