"""One command, from claim to stored result.

The handler runs on the asyncio loop; it never touches the broker. It returns a
:class:`Settlement` that the consumer carries out (publish, then ack, dead-letter or
requeue), so one place settles messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TypeVar

from opentelemetry import trace

from schemas.commands import Command
from schemas.events import ErrorCode, ErrorInfo, ResultEvent
from worker.errors import CommandRejected, RelayError, StoreUnavailable, Withheld
from worker.idempotency import (
    Claimed,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    fingerprint,
)
from worker.ops.outage import Outage
from worker.replies import VendorReply
from worker.results import Rejected, command_fields, now, outcome_of, rejection, result_event
from worker.settings import HandlerTimings, PublisherBinding
from worker.settlement import Action, DeliveryInfo, Settlement
from worker.vendors import VendorCall, Vendors
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import CallBudget

log = logging.getLogger(__name__)

# Rejections are stored apart from the keys of work: a fixed command sent again under its
# key is judged afresh, while a redelivery of the rejected message replays its event.
REJECTION_KEY_PREFIX = "rejected:"
T = TypeVar("T")


class Handler:
    """Decides what becomes of one decoded delivery: claims its idempotency key, runs the
    command against its vendor (or replays, defers or rejects it), stores the result
    with the claim (the outbox), and returns the :class:`~worker.settlement.Settlement`
    for the consumer to carry out. It never touches the broker."""

    def __init__(
        self,
        store: IdempotencyStore,
        vendors: Vendors,
        policy: RetryPolicy,
        timings: HandlerTimings,
        owner: str,
        outage: Outage,
        publishers: PublisherBinding | None = None,
    ) -> None:
        self._store = store
        self._vendors = vendors
        self._policy = policy
        self._timings = timings
        self._owner = owner  # this process; each claim it makes is held in a name of its own
        self._outage = outage  # the stores' outage: calls to them are held through it
        self._publishers = publishers  # who may act for which tenant; None: not checked

    async def handle(
        self, decoded: Command | Rejected, delivery: DeliveryInfo | None = None
    ) -> Settlement:
        """Claim the key, run the command (or replay / defer / reject), store the event."""
        if isinstance(decoded, Rejected):
            event = rejection(decoded.error.code, decoded.error.message, **decoded.fields)
            return await self._store_rejection(decoded.digest, event)
        command, delivery = decoded, delivery or DeliveryInfo()
        try:
            self._check_publisher(command, delivery)
            self._check_deadline(command)
            call = self._vendors.call_for(command)  # tenant, account and region, checked once
        except CommandRejected as error:
            return await self._store_rejection(
                rejection_digest(command), self._rejected(command, error)
            )
        deadline = self._budget_deadline(command)
        while True:
            holder = self._new_holder()
            claim = await self._held_through_outage(
                partial(self._store.claim, command.key, fingerprint(command), holder,
                        command.command_id),
                nothing_held=True,
            )
            # When the store answered, and what: the wait before a command started shows
            # in its trace (the delivery's span) up to this point.
            trace.get_current_span().add_event(
                "relay.claim", {"relay.claim.answer": type(claim).__name__}
            )
            match claim:
                case Completed(event=stored):
                    return Settlement.for_event(replay_for(command.command_id, stored))
                case Conflict():
                    return await self._store_rejection(
                        rejection_digest(command), self._conflict(command)
                    )
                case Claimed(after_send=True, response_id=None) if call.request.is_mutation:
                    return await self._after_dead_holder(command, holder)
                case Claimed(response_id=response_id):
                    # With a response_id the dead holder's 202 is collected, not resent.
                    try:
                        return await self._run_claimed(
                            command, call, holder, deadline, delivery, response_id
                        )
                    except Withheld:
                        continue  # another worker has the key now: see what it says
                case InProgress(lease_left_s=lease_left_s):
                    # Another delivery of this key is being worked on: come back for its
                    # result rather than call the vendor a second time.
                    if self._timings.retry_delays_s:
                        return Settlement(
                            None, Action.DELAY, self._timings.defer_s,
                            delivery.retries, delivery.attempts,
                        )
                    if self._policy.clock() + self._timings.defer_poll_s >= deadline:
                        return Settlement(None, Action.REQUEUE)
                    await self._policy.sleep(min(self._timings.defer_poll_s, lease_left_s))

    async def _store_rejection(self, digest: str, event: ResultEvent) -> Settlement:
        """The rejection, stored under the message's own digest, so that a redelivery of
        the same message gets it again, marked replayed, rather than a second one."""
        key = REJECTION_KEY_PREFIX + digest
        while True:
            holder = self._new_holder()
            claim = await self._held_through_outage(
                partial(self._store.claim, key, digest, holder), nothing_held=True
            )
            match claim:
                case Completed(event=stored):
                    return Settlement.for_event(replay_for(event.data.command_id, stored))
                case InProgress(lease_left_s=lease_left_s):  # another delivery, storing it
                    await self._policy.sleep(min(self._timings.defer_poll_s, lease_left_s))
                case _:
                    await self._complete(key, holder, event)
                    return Settlement.for_event(event)

    async def _held_through_outage(
        self, call: Callable[[], Awaitable[T]], nothing_held: bool = False
    ) -> T:
        """A store call, held through an outage for as long as a delivery may work; then
        StoreUnavailable, and the command goes back to the queue. ``nothing_held`` (taking
        a claim): not held once this replica gives back the work it has not started."""
        return await self._outage.held(
            call, self._timings.command_timeout_s, nothing_held=nothing_held
        )

    def _new_holder(self) -> str:
        """A name for one claim. Per claim, not per process: a delivery still running on
        a lost connection (or starved past its lease) then can not mark, renew or release
        the claim its own redelivery took in the same process."""
        return f"{self._owner}:{uuid.uuid4().hex[:12]}"

    async def _complete(self, key: str, holder: str, event: ResultEvent) -> None:
        await self._held_through_outage(lambda: self._store.complete(key, holder, event))

    def _check_publisher(self, command: Command, delivery: DeliveryInfo) -> None:
        """A tenant bound to its publishers takes commands from them only: before the
        claim, so another tenant's publisher learns nothing of its work, not even a
        replay."""
        binding, publisher = self._publishers, delivery.publisher
        if binding is None or binding.allows(command.tenant, publisher):
            return
        tenant = command.tenant.lower()
        setting = f"RELAY_TENANTS__{tenant.upper()}__PUBLISHERS"
        if not binding.publishers.get(tenant):
            fix = (f"tenant {tenant!r} names no publishers and this worker takes commands "
                   f"only for tenants that do: its operator must name in {setting} the AMQP "
                   "users that may act for it")
        elif publisher is None:
            fix = (f"tenant {tenant!r} takes commands only from its publishers, and this one "
                   "has no user_id: publish it with the AMQP property user_id set to the "
                   "user you connect as")
        else:
            fix = (f"the AMQP user {publisher[:64]!a} may not act for tenant {tenant!r}: "
                   f"publish as one of the users {setting} names")
        log.warning("publisher %a refused for tenant %r", publisher and publisher[:64], tenant,
                    extra=dict(command_fields(command)))
        raise CommandRejected(ErrorCode.FORBIDDEN_TENANT, fix)

    def _check_deadline(self, command: Command) -> None:
        if command.deadline is not None and command.deadline <= now():
            raise CommandRejected(
                ErrorCode.DEADLINE_PASSED,
                f"the command's deadline {command.deadline.isoformat()} had passed when it "
                "was taken up; send it again with a later deadline if it is still wanted",
            )

    def _budget_deadline(self, command: Command) -> float:
        """A :attr:`RetryPolicy.clock` reading after which no vendor call starts."""
        budget_s = self._timings.command_timeout_s
        if command.deadline is not None:
            budget_s = min(budget_s, (command.deadline - now()).total_seconds())
        return self._policy.clock() + budget_s

    async def _run_claimed(
        self,
        command: Command,
        call: VendorCall,
        holder: str,
        deadline: float,
        delivery: DeliveryInfo,
        accepted_as: str | None = None,
    ) -> Settlement:
        """The command's vendor call under its claim, to its stored event (or a delayed
        retry). ``accepted_as``: a dead holder's 202, collected instead of sent."""
        started_at = now()
        budget = self._budget(deadline, delivery)
        marks = ClaimMarks(self, command.key, holder)
        renewing = asyncio.create_task(self._keep_lease(command.key, holder))
        try:
            if delivery.last_delivery:
                event = self._delivery_limit_reached(command, started_at, delivery)
            elif accepted_as is None:
                reply = await self._vendors.run(call, budget, marks)
                event = self._event(command, started_at, delivery, budget, reply=reply)
            else:
                reply = await self._collect_for_dead_holder(command, call, budget, marks,
                                                            accepted_as)
                event = self._event(command, started_at, delivery, budget, reply=reply)
        except Withheld:
            raise  # the claim is another worker's now: not ours to release
        except StoreUnavailable:
            await self._let_go(command.key, holder, budget)
            raise  # held, or back to the queue: a store outage is never an outcome
        except RelayError as error:
            delay_s = self._next_delay_s(command, delivery) if error.retryable else None
            if delay_s is None:
                event = self._event(command, started_at, delivery, budget, error=error)
            else:
                log.info("retrying later", extra={**command_fields(command), "delay_s": delay_s})
                await self._release(command.key, holder)  # the retry claims it again
                return Settlement(
                    None, Action.DELAY, delay_s, delivery.retries + 1,
                    delivery.attempts + budget.attempts,
                )
        except BaseException:
            await self._let_go(command.key, holder, budget)
            raise
        finally:
            renewing.cancel()
        # The outbox: stored before it is published, so a crash after this point
        # replays the event instead of calling the vendor again.
        await self._complete(command.key, holder, event)
        return Settlement.for_event(event)

    def _budget(self, deadline: float, delivery: DeliveryInfo) -> CallBudget:
        retry_deadline = deadline
        if self._timings.retry_delays_s:  # back-off in process is short: delays follow
            retry_deadline = min(deadline, self._policy.clock() + self._timings.retry_in_process_s)
        return CallBudget(deadline, retry_deadline, prior_attempts=delivery.attempts)

    async def _let_go(self, key: str, holder: str, budget: CallBudget) -> None:
        """Let a redelivery retry; but a 202'd request stays claimed (with its
        response-id), so whoever takes it next collects it instead of resending."""
        if budget.accepted_as is None:
            await self._release(key, holder)

    async def _release(self, key: str, holder: str) -> None:
        # With the store away the claim stays until its lease runs out; the redelivery
        # then takes it over (or waits for it), which is all a release would allow sooner.
        with contextlib.suppress(StoreUnavailable):
            await self._store.release(key, holder)

    def _event(
        self,
        command: Command,
        started_at: datetime,
        delivery: DeliveryInfo,
        budget: CallBudget,
        reply: VendorReply | None = None,
        error: RelayError | None = None,
    ) -> ResultEvent:
        """The command's terminal event: the vendor's answer, or the error it ended on."""
        fields = command_fields(command)
        outcome = "succeeded" if error is None else outcome_of(error)
        extra = {**fields, "outcome": outcome, "attempts": budget.attempts}
        if error is not None:
            extra["error_code"] = str(error.code)
        log.info("command %s", outcome, extra=extra)
        return result_event(
            **fields,
            outcome=outcome,
            started_at=started_at,
            attempts=delivery.attempts + budget.attempts,
            reply=reply if error is None else error.reply,
            error=None if error is None else error.info(),
        )

    async def _collect_for_dead_holder(
        self, command: Command, call: VendorCall, budget: CallBudget, marks: ClaimMarks,
        response_id: str,
    ) -> VendorReply:
        # Taken over from a holder that died collecting a 202: keep the response-id with
        # this claim too, then collect the answer it was waiting for.
        log.info("collecting a dead holder's 202", extra=dict(command_fields(command)))
        budget.accepted_as = response_id
        if not await marks.accepted(response_id):
            raise Withheld(f"{command.key!r} was taken over while collecting its 202")
        return await self._vendors.collect(call, response_id, budget)

    async def mark_accepted(self, key: str, holder: str, response_id: str) -> bool:
        return await self._held_through_outage(
            lambda: self._store.mark_accepted(key, holder, response_id)
        )

    async def mark_sent(self, key: str, holder: str) -> bool:
        return await self._held_through_outage(lambda: self._store.mark_sent(key, holder))

    async def _keep_lease(self, key: str, holder: str) -> None:
        """Renew the claim while this worker is alive and working, so a slow vendor call
        is never mistaken for a dead holder (and done a second time)."""
        while True:
            await asyncio.sleep(self._timings.claim_lease_s / 3)
            try:
                await self._store.renew(key, holder)
            except StoreUnavailable as error:
                self._outage.report(error)  # renewed on the next round, if it is back

    async def _after_dead_holder(self, command: Command, holder: str) -> Settlement:
        # The holder died after the mutation may have reached the vendor, and before it
        # stored the answer: sending it again could act twice, so the command fails as
        # "result lost", exactly as after a 202 whose answer is gone.
        log.warning("taken over after a holder died mid-call", extra=dict(command_fields(command)))
        event = result_event(
            **command_fields(command),
            outcome="failed",
            started_at=now(),
            error=ErrorInfo(
                code=ErrorCode.RESULT_LOST,
                message="the worker running this command stopped after sending it to the "
                "vendor and before recording the answer; it may or may not have taken "
                "effect, so it was not sent again: check before re-sending",
            ),
        )
        await self._complete(command.key, holder, event)
        return Settlement.for_event(event)

    def _next_delay_s(self, command: Command, delivery: DeliveryInfo) -> float | None:
        """The wait before the next delayed retry, or None when none is left."""
        delays = self._timings.retry_delays_s
        if delivery.retries >= len(delays):
            return None
        delay_s = delays[delivery.retries]
        too_late = (
            command.deadline is not None
            and (command.deadline - now()).total_seconds() <= delay_s
        )
        return None if too_late else delay_s  # None: it would come back too late to start

    def _delivery_limit_reached(
        self, command: Command, started_at: datetime, delivery: DeliveryInfo
    ) -> ResultEvent:
        # A command that keeps crashing or hanging workers is not tried once more: it
        # gets a failed event and goes to the dead-letter queue.
        log.warning("delivery limit reached", extra=dict(command_fields(command)))
        error = ErrorInfo(
            code=ErrorCode.DELIVERY_LIMIT,
            message="the command was delivered too many times without finishing (a worker "
            "crashed or hung on it); it was not run again",
            retryable=False,
        )
        return result_event(
            **command_fields(command),
            outcome="failed",
            started_at=started_at,
            attempts=delivery.attempts,
            error=error,
        )

    def _rejected(self, command: Command, error: CommandRejected) -> ResultEvent:
        log.info("command rejected", extra={**command_fields(command), "error_code": error.code})
        return rejection(error.code, error.message, **command_fields(command))

    def _conflict(self, command: Command) -> ResultEvent:
        return self._rejected(
            command,
            CommandRejected(
                ErrorCode.IDEMPOTENCY_KEY_CONFLICT,
                f"idempotency key {command.key!r} was already used for a different command "
                "(type, tenant or params differ); use a new key for new work",
            ),
        )


def replay_for(command_id: str, stored: ResultEvent) -> ResultEvent:
    """The stored event again, marked replayed, addressed to this command id (so each
    command id still gets exactly one terminal event of its own)."""
    replay = stored.as_replay()
    data = replay.data.model_copy(update={"command_id": command_id})
    return replay.model_copy(update={"data": data, "subject": command_id})


def rejection_digest(command: Command) -> str:
    """What makes a rejected command the same message again: its id and its content."""
    return hashlib.sha256(f"{command.command_id}\0{fingerprint(command)}".encode()).hexdigest()


@dataclass
class ClaimMarks:
    """The vendor call's marks, kept with this holder's claim: "sent" (once, before the
    mutation first goes out) and the 202's response-id. False from either: a worker
    starved past its lease lost the key to another one, which does the work instead."""

    handler: Handler
    key: str
    holder: str
    sent: bool = False

    async def sending(self) -> bool:
        if not self.sent:
            self.sent = await self.handler.mark_sent(self.key, self.holder)
        return self.sent

    async def accepted(self, response_id: str) -> bool:
        return await self.handler.mark_accepted(self.key, self.holder, response_id)
