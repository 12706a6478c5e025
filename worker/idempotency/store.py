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

Keys and command ids live in their tenant's namespace (:func:`claim_key`,
:func:`command_ref`): two tenants never collide on a key, nor learn that the other used it.

While the work of a key waits for a delayed retry (its claim released, the command in a
delay queue), a :class:`RetryNote` is kept with the key (``note_retry``): attempts so far,
the last error, when the next try is due. :meth:`IdempotencyStore.find` returns it, so an
operator sees why a command is still running; storing the result forgets it.

Each record is also found by the id of the command that claimed or completed it
(``claim(..., command_ref=…)`` and ``complete(..., command_ref)``), for as long as the
record is kept, so an operator can look a result up (``command-relay result ID``).

The claim's lifecycle, as the handler and the vendor side use it, is the
:class:`~worker.idempotency.claim.Claim` object (``claim.py``).

This module holds the protocol and the decision both backends make: SQLite
(``sqlite.py``; one host, the default) and Redis (``redis.py``; a fleet).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from schemas.commands import Command
from schemas.events import ResultEvent
from worker.errors import RelayError, StoreUnavailable

NOTE_MESSAGE_CHARS = 500  # of the last error's message kept in a retry note
LATEST_TIME_S = 253402300799.0  # 9999-12-31T23:59:59Z: the last time a datetime holds


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


@dataclass(frozen=True)
class RetryNote:
    """Why a key's work is waiting for a delayed retry, and until when: kept with the key
    for the operator's eyes (``command-relay result``, ``send --wait``), never decisive."""

    attempts: int  # vendor calls made for the key so far, over every delivery
    error_code: str  # the last error's (the contract's ErrorCode)
    error_message: str  # the last error's, at most NOTE_MESSAGE_CHARS
    next_try_at: float  # Unix time the retry is due back from its delay queue

    @classmethod
    def after(cls, error: RelayError, attempts: int, delay_s: float) -> RetryNote:
        """The note of a retry scheduled ``delay_s`` from now after ``error``."""
        return cls(attempts, str(error.code), error.message[:NOTE_MESSAGE_CHARS],
                   time.time() + delay_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> RetryNote | None:
        """The note stored as ``text``; None when there is none, or it is not one (a
        note is for display: an unreadable one is left out, never an error)."""
        if text is None:
            return None
        try:
            fields: Any = json.loads(text)
            note = cls(
                attempts=int(fields["attempts"]),
                error_code=str(fields["error_code"]),
                error_message=str(fields["error_message"])[:NOTE_MESSAGE_CHARS],
                next_try_at=float(fields["next_try_at"]),
            )
        except (ValueError, TypeError, KeyError, OverflowError):
            return None
        in_range = math.isfinite(note.next_try_at) and 0 <= note.next_try_at <= LATEST_TIME_S
        return note if in_range and note.attempts >= 0 else None


@dataclass(frozen=True)
class StoredRecord:
    """What the store holds for a key: its event once done, else who is working on it,
    or (``holder`` None) that it waits for a delayed retry, with the ``retry`` note."""

    key: str
    event: ResultEvent | None  # None: not finished
    holder: str | None  # None: not claimed now (released for a delayed retry)
    lease_left_s: float  # 0 or less: the holder's lease ran out (it stopped), or no holder
    sent: bool  # the mutation may have reached the vendor
    response_id: str | None  # the vendor's 202 being collected
    retry: RetryNote | None = None  # the last delayed retry scheduled for it, if any

    @classmethod
    def waiting(cls, key: str, retry: RetryNote) -> StoredRecord:
        """A key released for a delayed retry: no claim, only its note."""
        return cls(key, None, None, 0.0, False, None, retry)


def replica_of(holder: str) -> str:
    """The worker process a claim's holder name belongs to: the name less its last part,
    which tells that process's claims apart (``Handler._new_holder``)."""
    replica, separator, _ = holder.rpartition(":")
    return replica if separator else holder


def fingerprint(command: Command) -> str:
    """What makes two commands the same work: type, tenant (its canonical, lower-case
    name) and params; not id or deadline."""
    payload = command.model_dump(mode="json", include={"type", "tenant", "params"})
    payload["tenant"] = command.tenant.lower()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def tenant_scoped(tenant: str | None, name: str) -> str:
    """``name`` (an idempotency key, a command id) in its tenant's own namespace, so that
    tenants never collide on, nor learn of, each other's keys and ids. Tenant names are
    case-insensitive and never hold ``/``; a message without a usable tenant gets the
    empty scope."""
    return f"{(tenant or '').lower()}/{name}"


def claim_key(command: Command) -> str:
    """The store's key of a command's work: its tenant and its idempotency key."""
    return tenant_scoped(command.tenant, command.key)


def command_ref(command: Command) -> str:
    """How the store finds a command by its id: its tenant and its id."""
    return tenant_scoped(command.tenant, command.command_id)


class IdempotencyStore(Protocol):
    async def claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None = None
    ) -> ClaimResult:
        """Take the key for ``owner``, or say why not. ``command_ref`` is recorded as the
        key's command (found by :meth:`key_of`), unless the key is another work's
        (:class:`Conflict`)."""
        ...

    async def complete(
        self, key: str, owner: str, event: ResultEvent, command_ref: str,
        replace_ref: bool = True,
    ) -> None:
        """Store the terminal event with the claim; it is replayed from now on, and the
        key is found by ``command_ref`` (:func:`command_ref`: the tenant's command id),
        which keeps pointing where it did when ``replace_ref`` is off and it points
        somewhere already (a rejection must not hide the work of the id it names)."""
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

    async def note_retry(self, key: str, note: RetryNote) -> None:
        """Keep ``note`` with the key: its work waits for a delayed retry. :meth:`find`
        returns it until the key's result is stored, or the retention runs out."""
        ...

    async def find(self, key: str) -> StoredRecord | None:
        """The key's record, with its retry note; a key released for a delayed retry is
        a record without a holder. None when there is nothing (never claimed, released
        without a note, expired)."""
        ...

    async def key_of(self, command_ref: str) -> str | None:
        """The key the command ``command_ref`` (its tenant and id) claimed or completed,
        while it is kept."""
        ...

    async def discard(self, key: str, event_id: str) -> bool:
        """Forget the key's stored result if it is still the event ``event_id``, so the
        work can be done again (a dead letter replayed); False when it was not."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


async def keep_retry_note(store: IdempotencyStore, key: str, note: RetryNote) -> None:
    """:meth:`IdempotencyStore.note_retry`, unless the store is away: the note is for an
    operator's eyes, and the retry goes ahead without it."""
    with contextlib.suppress(StoreUnavailable):
        await store.note_retry(key, note)


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
