"""One command, from claim to stored result.

The handler runs on the asyncio loop; it never touches the broker. It returns a
:class:`Settlement` that the consumer carries out (publish, then ack, dead-letter or
requeue), so one place settles messages.

Once a request may have reached the vendor, every way out of :meth:`Handler._run_claimed`
stores an outcome, or leaves the claim held for the holder that takes it over: an error
is the event's error, a bug after the send is ``result_lost``, and a cancellation (the
process stopping) keeps the claim (its lease runs out, and the next holder collects the
202 or reports the result lost). Only what never left the process is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

from opentelemetry import trace

from schemas.commands import Command
from schemas.events import ErrorCode, ErrorInfo, ResultEvent
from worker.errors import (
    CommandRejected,
    PermanentFailure,
    RelayError,
    StoreUnavailable,
    Withheld,
)
from worker.idempotency import (
    Claim,
    Claims,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    RetryNote,
    claim_key,
    command_ref,
    fingerprint,
    tenant_scoped,
)
from worker.ops.outage import Outage
from worker.redaction import Redactor
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
        # This process is ``owner``; each claim it takes is held in a name of its own.
        # Store calls are held through an outage as long as a delivery may work.
        self._claims = Claims(store, owner, outage, timings.command_timeout_s)
        self._vendors = vendors
        self._redactor: Redactor = vendors.redactor
        self._policy = policy
        self._timings = timings
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
            call = self._vendors.call_for(command)  # tenant, account and region, checked once
        except CommandRejected as error:
            return await self._store_rejection(
                rejection_digest(command), self._rejected(command, error)
            )
        deadline = self._budget_deadline(command)
        while True:
            taken = await self._claims.take(
                claim_key(command), fingerprint(command), command_ref(command)
            )
            # When the store answered, and what: the wait before a command started shows
            # in its trace (the delivery's span) up to this point.
            answer = "Claimed" if isinstance(taken, Claim) else type(taken).__name__
            trace.get_current_span().add_event("relay.claim", {"relay.claim.answer": answer})
            match taken:
                case Completed(event=stored):
                    return Settlement.for_event(replay_for(command.command_id, stored))
                case Conflict():
                    return await self._store_rejection(
                        rejection_digest(command), self._conflict(command)
                    )
                case Claim(taken_after_send=True, response_id=None) if call.request.is_mutation:
                    return await self._after_dead_holder(command, taken)
                case Claim(taken_after_send=False) if (late := _deadline_passed(command)):
                    # Judged after the claim: a command that was done before its deadline
                    # is replayed when it comes again after it, never rejected.
                    await taken.release()
                    return await self._store_rejection(
                        rejection_digest(command), self._rejected(command, late),
                        replace_ref=True,
                    )
                case Claim():
                    # With a response_id the dead holder's 202 is collected, not resent.
                    try:
                        return await self._run_claimed(command, call, taken, deadline, delivery)
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

    async def _store_rejection(
        self, digest: str, event: ResultEvent, replace_ref: bool = False
    ) -> Settlement:
        """The rejection, stored under the message's own digest, so that a redelivery of
        the same message gets it again, marked replayed, rather than a second one. Its
        id is indexed only where no work of that id is (a rejected message never hides
        the result of the command whose id it names), unless ``replace_ref``: the
        command's own claim was given up for it."""
        key = REJECTION_KEY_PREFIX + digest
        reference = tenant_scoped(event.data.tenant, event.data.command_id)
        while True:
            taken = await self._claims.take(key, digest)
            match taken:
                case Completed(event=stored):
                    return Settlement.for_event(replay_for(event.data.command_id, stored))
                case InProgress(lease_left_s=lease_left_s):  # another delivery, storing it
                    await self._policy.sleep(min(self._timings.defer_poll_s, lease_left_s))
                case Claim():
                    await taken.complete(event, reference, replace_ref=replace_ref)
                    return Settlement.for_event(event)
                case Conflict():  # the digest is the fingerprint: the same message again
                    raise AssertionError("a rejection's digest conflicted with itself")

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
        claim: Claim,
        deadline: float,
        delivery: DeliveryInfo,
    ) -> Settlement:
        """The command's vendor call under its claim, to its stored event (or a delayed
        retry). Every way out of a call that may have reached the vendor is an event, but
        a cancellation, which leaves the claim held for the holder that takes it over."""
        started_at, budget = now(), self._budget(deadline, delivery)
        async with claim.kept_alive(self._timings.claim_lease_s):
            try:
                async with self._within(deadline):
                    if delivery.last_delivery:
                        event = self._delivery_limit_reached(command, delivery)
                    elif claim.response_id is None:
                        reply = await self._vendors.run(call, budget, claim)
                        event = self._event(command, started_at, delivery, budget, reply=reply)
                    else:
                        reply = await self._collect_for_dead_holder(command, call, claim, budget)
                        event = self._event(command, started_at, delivery, budget, reply=reply)
            except (Withheld, StoreUnavailable):
                # Withheld: the claim is another worker's now. A store outage is never an
                # outcome: the command is held, or goes back to the queue.
                await claim.release()
                raise
            except RelayError as error:
                delay_s = self._next_delay_s(command, delivery) if error.retryable else None
                if delay_s is not None:
                    return await self._retry_later(command, claim, error, delay_s, delivery,
                                                   budget)
                event = self._event(command, started_at, delivery, budget, error=error)
            except Exception as bug:
                if not claim.sent:
                    await claim.release()  # nothing left the process: a redelivery may retry
                    raise
                log.exception("the worker failed after sending a command to its vendor",
                              extra=dict(command_fields(command)))
                event = self._event(command, started_at, delivery, budget,
                                    error=_lost_after(bug, call))
            except BaseException:  # cancelled (the process stops): held, unless unsent
                await claim.release()
                raise
            # The outbox: stored before it is published, so a crash after this point
            # replays the event instead of calling the vendor again.
            await claim.complete(event, command_ref(command))
        return Settlement.for_event(event)

    async def _retry_later(
        self,
        command: Command,
        claim: Claim,
        error: RelayError,
        delay_s: float,
        delivery: DeliveryInfo,
        budget: CallBudget,
    ) -> Settlement:
        log.info("retrying later", extra={**command_fields(command), "delay_s": delay_s})
        attempts = delivery.attempts + budget.attempts
        # The retry claims it again; meanwhile the key says why it waits, and until when.
        await claim.release_for_retry(RetryNote.after(error, attempts, delay_s))
        return Settlement(
            None, Action.DELAY, delay_s, delivery.retries + 1,
            attempts,
        )

    async def _collect_for_dead_holder(
        self, command: Command, call: VendorCall, claim: Claim, budget: CallBudget
    ) -> VendorReply:
        # Taken over from a holder that died collecting a 202: keep the response-id with
        # this claim too, then collect the answer it was waiting for.
        log.info("collecting a dead holder's 202", extra=dict(command_fields(command)))
        response_id = claim.response_id
        assert response_id is not None
        if not await claim.accepted(response_id):
            raise Withheld(f"{command.key!r} was taken over while collecting its 202")
        return await self._vendors.collect(call, response_id, budget)

    @contextlib.asynccontextmanager
    async def _within(self, deadline: float) -> AsyncIterator[None]:
        """End the work one HTTP timeout after the deadline, whatever the vendor does: no
        call starts after the deadline, and this bounds the one that is running (and the
        waits for a token, a rate slot or a collect in between)."""
        left_s = deadline - self._policy.clock() + self._timings.http_timeout_s
        try:
            async with asyncio.timeout(max(left_s, 0.0)) as bound:
                yield
        except TimeoutError:
            if not bound.expired():
                raise
            raise PermanentFailure(
                ErrorCode.DEADLINE_EXCEEDED,
                "the command's deadline passed while its vendor call was under way; the "
                "request may have reached the vendor: check before re-sending",
            ) from None

    def _budget(self, deadline: float, delivery: DeliveryInfo) -> CallBudget:
        retry_deadline = deadline
        if self._timings.retry_delays_s:  # back-off in process is short: delays follow
            retry_deadline = min(deadline, self._policy.clock() + self._timings.retry_in_process_s)
        return CallBudget(deadline, retry_deadline, prior_attempts=delivery.attempts)

    def _event(
        self,
        command: Command,
        started_at: datetime,
        delivery: DeliveryInfo,
        budget: CallBudget,
        reply: VendorReply | None = None,
        error: RelayError | None = None,
    ) -> ResultEvent:
        """The command's terminal event: the vendor's answer, or the error it ended on,
        with nothing in it that the worker knows as a secret."""
        fields = command_fields(command)
        outcome = "succeeded" if error is None else outcome_of(error)
        extra = {**fields, "outcome": outcome, "attempts": budget.attempts}
        if error is not None:
            extra["error_code"] = str(error.code)
        log.info("command %s", outcome, extra=extra)
        info = None if error is None else error.info()
        if info is not None:
            info = info.model_copy(update={"message": self._redactor.text(info.message)})
        vendor_reply = reply if error is None else error.reply
        if vendor_reply is not None and vendor_reply.response_id is not None:
            vendor_reply = replace(
                vendor_reply, response_id=self._redactor.text(vendor_reply.response_id)
            )
        return result_event(
            **fields,
            outcome=outcome,
            started_at=started_at,
            attempts=delivery.attempts + budget.attempts,
            reply=vendor_reply,
            error=info,
        )

    async def _after_dead_holder(self, command: Command, claim: Claim) -> Settlement:
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
        await claim.complete(event, command_ref(command))
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

    def _delivery_limit_reached(self, command: Command, delivery: DeliveryInfo) -> ResultEvent:
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
            started_at=now(),
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
                "of this tenant (type or params differ); use a new key for new work",
            ),
        )


def _deadline_passed(command: Command) -> CommandRejected | None:
    """The rejection of a command taken up after its deadline, or None."""
    if command.deadline is None or command.deadline > now():
        return None
    return CommandRejected(
        ErrorCode.DEADLINE_PASSED,
        f"the command's deadline {command.deadline.isoformat()} had passed when it was "
        "taken up; send it again with a later deadline if it is still wanted",
    )


def _lost_after(bug: Exception, call: VendorCall) -> PermanentFailure:
    """What a failure of the worker's own, after the request may have reached the vendor,
    makes of the command: its answer is unknown, and it is not sent again."""
    return PermanentFailure(
        ErrorCode.RESULT_LOST,
        f"the worker failed on {call.request.vendor}'s answer ({type(bug).__name__}) after "
        "sending the request; it may or may not have taken effect, so it was not sent "
        "again: check before re-sending",
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
