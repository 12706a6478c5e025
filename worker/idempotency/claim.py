"""A claim on one idempotency key, as an object whose lifecycle can not be misused.

::

    take ─► claimed ──sending()──► sent ──accepted(id)──► accepted (a 202, collecting)
              │                      │                          │
              ├─ release()           ├─ release_for_retry()     │
              │  (nothing sent)      │  (a transient failure)   │
              └──────────────────────┴──── complete(event) ─────┴─► completed

The handler takes a claim (:meth:`Claims.take`) and hands it, as the gate a mutation must
pass, to the vendor side: :meth:`Claim.sending` marks it "sent" just before a mutation
first goes out, :meth:`Claim.accepted` keeps ESET's 202 ``response-id`` with it. Neither
side calls the other; the claim is all they share.

Once a request may have reached the vendor the claim is never let go without an
outcome: :meth:`Claim.release` does nothing after "sent" (the next holder, once the lease
ran out, collects the 202 or reports ``result_lost``), and only a transient failure, which
the contract retries, may give a sent claim back (:meth:`Claim.release_for_retry`), never
one whose 202 is being collected. Every store call is held through a store outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from schemas.events import ResultEvent
from worker.errors import StoreUnavailable
from worker.idempotency.store import (
    Claimed,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    RetryNote,
    keep_retry_note,
)
from worker.ops.outage import Outage

T = TypeVar("T")


@dataclass(eq=False)
class Claim:
    """This holder's claim on ``key``: the gate before a mutation, the outbox after it."""

    store: IdempotencyStore
    key: str
    holder: str
    outage: Outage
    hold_s: float  # how long a store call waits through an outage
    # Taken over from a holder that died after its request may have reached the vendor.
    taken_after_send: bool = False
    response_id: str | None = None  # the vendor's 202 being collected
    sent: bool = field(default=False, init=False)  # the vendor may have acted
    lost: bool = field(default=False, init=False)  # another holder has the key now

    def __post_init__(self) -> None:
        self.sent = self.taken_after_send  # the dead holder's "sent" is inherited

    async def sending(self) -> bool:
        """Mark the claim "sent" before a mutation first goes out; False when the claim
        was lost (a holder starved past its lease): the mutation must not be sent."""
        if not self.sent and not self.lost:
            marked = await self._held(lambda: self.store.mark_sent(self.key, self.holder))
            self.sent, self.lost = marked, not marked
        return self.sent and not self.lost

    async def accepted(self, response_id: str) -> bool:
        """Keep the vendor's 202 ``response_id`` with the claim before collecting it, so
        a holder taking over collects it instead of resending; False when lost."""
        kept = await self._held(
            lambda: self.store.mark_accepted(self.key, self.holder, response_id)
        )
        if kept:
            self.sent, self.response_id = True, response_id
        else:
            self.lost = True
        return kept

    async def complete(
        self, event: ResultEvent, command_ref: str, replace_ref: bool = True
    ) -> None:
        """Store the outcome (the outbox: before its event is published), found from now
        on by ``command_ref`` too (unless another key has it and not ``replace_ref``)."""
        await self._held(
            lambda: self.store.complete(self.key, self.holder, event, command_ref, replace_ref)
        )

    async def release(self) -> None:
        """Give the key up, but only while nothing may have reached the vendor."""
        if not self.sent:
            await self._let_go()

    async def release_for_retry(self, note: RetryNote) -> None:
        """Give the key up for a delayed retry after a transient failure (the contract
        retries a mutation whose answer said nothing was done or was lost in transit),
        never while a 202 is being collected: that answer is collected, never resent.
        ``note`` (attempts, last error, next try) stays with the key meanwhile, for an
        operator to see; it is best effort."""
        if self.response_id is None:
            await self._let_go()
            await keep_retry_note(self.store, self.key, note)

    @contextlib.asynccontextmanager
    async def kept_alive(self, lease_s: float) -> AsyncIterator[Claim]:
        """Renew the lease every third of it while the holder works, so a slow vendor
        call is never mistaken for a dead holder (and done a second time)."""
        renewing = asyncio.create_task(self._renew_every(lease_s / 3))
        try:
            yield self
        finally:
            renewing.cancel()

    async def _renew_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.store.renew(self.key, self.holder)
            except StoreUnavailable as error:
                self.outage.report(error)  # renewed on the next round, if it is back

    async def _let_go(self) -> None:
        # With the store away the claim stays until its lease runs out; the redelivery
        # then takes it over (or waits for it), which is all a release would allow sooner.
        with contextlib.suppress(StoreUnavailable):
            await self.store.release(self.key, self.holder)

    async def _held(self, call: Callable[[], Awaitable[T]]) -> T:
        return await self.outage.held(call, self.hold_s)


ClaimOutcome = Claim | InProgress | Completed | Conflict


@dataclass(frozen=True)
class Claims:
    """Takes claims for one process (``owner``); each claim is held in a name of its own."""

    store: IdempotencyStore
    owner: str
    outage: Outage
    hold_s: float  # how long a store call waits through an outage

    async def take(
        self, key: str, fingerprint: str, command_ref: str | None = None
    ) -> ClaimOutcome:
        """Claim ``key`` for new work; the claim, or why this worker may not do the work.
        ``command_ref`` (the tenant's command id) is indexed to the key."""
        holder = self._new_holder()
        # Nothing is held yet: once this replica gives back the work it has not started
        # (its store is away for it), the claim is not waited for either.
        decided = await self.outage.held(
            lambda: self.store.claim(key, fingerprint, holder, command_ref), self.hold_s,
            nothing_held=True,
        )
        if not isinstance(decided, Claimed):
            return decided
        return Claim(
            self.store, key, holder, self.outage, self.hold_s,
            taken_after_send=decided.after_send, response_id=decided.response_id,
        )

    def _new_holder(self) -> str:
        """A name for one claim. Per claim, not per process: a delivery still running on
        a lost connection (or starved past its lease) then can not mark, renew or release
        the claim its own redelivery took in the same process."""
        return f"{self.owner}:{uuid.uuid4().hex[:12]}"
