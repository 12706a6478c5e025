"""One command, from claim to stored result.

The handler runs on the asyncio loop; it never touches the broker. It returns a
:class:`Settlement` that the connection thread carries out (publish, then ack,
dead-letter or requeue), so one place settles messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from schemas.commands import Command
from schemas.events import ErrorCode, ResultEvent
from worker.errors import CommandRejected, RelayError
from worker.idempotency import (
    Claimed,
    Completed,
    Conflict,
    IdempotencyStore,
    InProgress,
    fingerprint,
)
from worker.results import CommandFields, now, outcome_of, rejection, result_event
from worker.retries import RetryPolicy
from worker.vendors import Vendors
from worker.vendors.http import CallBudget

log = logging.getLogger(__name__)


class Action(Enum):
    ACK = "ack"
    DEAD_LETTER = "dead_letter"  # the original is kept in the dead-letter queue
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Settlement:
    """What becomes of a delivery: the event to publish (if any), then the action."""

    event: ResultEvent | None
    action: Action

    @classmethod
    def for_event(cls, event: ResultEvent) -> Settlement:
        keep = event.data.outcome != "succeeded" and not event.data.replayed
        return cls(event, Action.DEAD_LETTER if keep else Action.ACK)


@dataclass(frozen=True)
class HandlerTimings:
    command_timeout_s: float  # the in-process budget of one command
    defer_poll_s: float = 0.5  # how often a duplicate looks whether the holder finished


class Handler:
    def __init__(
        self,
        store: IdempotencyStore,
        vendors: Vendors,
        policy: RetryPolicy,
        timings: HandlerTimings,
        owner: str,
    ) -> None:
        self._store = store
        self._vendors = vendors
        self._policy = policy
        self._timings = timings
        self._owner = owner  # this process, as the holder of idempotency claims

    async def handle(self, command: Command) -> Settlement:
        """Claim the key, run the command (or replay / defer / reject), store the event."""
        try:
            self._check_acceptable(command)
        except CommandRejected as error:
            return Settlement.for_event(self._rejected(command, error))
        deadline = self._budget_deadline(command)
        while True:
            claim = await self._store.claim(command.key, fingerprint(command), self._owner)
            match claim:
                case Completed(event=stored):
                    return Settlement.for_event(replay_for(command, stored))
                case Conflict():
                    return Settlement.for_event(self._conflict(command))
                case Claimed():
                    return Settlement.for_event(await self._run_claimed(command, deadline))
                case InProgress(lease_left_s=lease_left_s):
                    # Another delivery of this key is being worked on: wait for its result
                    # rather than call the vendor a second time.
                    if self._policy.clock() + self._timings.defer_poll_s >= deadline:
                        return Settlement(None, Action.REQUEUE)
                    await self._policy.sleep(min(self._timings.defer_poll_s, lease_left_s))

    def _check_acceptable(self, command: Command) -> None:
        self._vendors.tenant(command.tenant)
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

    async def _run_claimed(self, command: Command, deadline: float) -> ResultEvent:
        started_at = now()
        budget = CallBudget(deadline=deadline)
        try:
            event = await self._execute(command, budget, started_at)
        except BaseException:
            await self._store.release(command.key, self._owner)  # let a redelivery retry
            raise
        # The outbox: stored before it is published, so a crash after this point
        # replays the event instead of calling the vendor again.
        await self._store.complete(command.key, self._owner, event)
        return event

    async def _execute(
        self, command: Command, budget: CallBudget, started_at: datetime
    ) -> ResultEvent:
        fields = _event_fields(command)
        try:
            reply = await self._vendors.execute(command, budget)
        except RelayError as error:
            log.info(
                "command %s", outcome_of(error),
                extra={**fields, "error_code": str(error.code), "attempts": budget.attempts},
            )
            return result_event(
                **fields,
                outcome=outcome_of(error),
                started_at=started_at,
                attempts=budget.attempts,
                reply=error.reply,
                error=error.info(),
            )
        log.info("command succeeded", extra={**fields, "attempts": budget.attempts})
        return result_event(
            **fields,
            outcome="succeeded",
            started_at=started_at,
            attempts=budget.attempts,
            reply=reply,
        )

    def _rejected(self, command: Command, error: CommandRejected) -> ResultEvent:
        log.info("command rejected", extra={**_event_fields(command), "error_code": error.code})
        return rejection(error.code, error.message, **_event_fields(command))

    def _conflict(self, command: Command) -> ResultEvent:
        return self._rejected(
            command,
            CommandRejected(
                ErrorCode.IDEMPOTENCY_KEY_CONFLICT,
                f"idempotency key {command.key!r} was already used for a different command "
                "(type, tenant or params differ); use a new key for new work",
            ),
        )


def _event_fields(command: Command) -> CommandFields:
    return {
        "command_id": command.command_id,
        "idempotency_key": command.key,
        "command_type": command.type,
        "tenant": command.tenant,
    }


def replay_for(command: Command, stored: ResultEvent) -> ResultEvent:
    """The stored event again, marked replayed, addressed to this command's id (so each
    command id still gets exactly one terminal event of its own)."""
    replay = stored.as_replay()
    data = replay.data.model_copy(update={"command_id": command.command_id})
    return replay.model_copy(update={"data": data, "subject": command.command_id})
