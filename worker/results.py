"""Building result events: the one shape every outcome takes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypedDict

from schemas.commands import Command
from schemas.events import ErrorCode, ErrorInfo, Outcome, ResultData, ResultEvent, VendorAnswer
from worker.errors import CommandRejected, RelayError
from worker.replies import VendorReply


class CommandFields(TypedDict):
    """What addresses an event to its command."""

    command_id: str
    idempotency_key: str | None
    command_type: str | None
    tenant: str | None


def command_fields(command: Command) -> CommandFields:
    """What addresses the event of a valid command."""
    return {
        "command_id": command.command_id,
        "idempotency_key": command.key,
        "command_type": command.type,
        "tenant": command.tenant,
    }


def now() -> datetime:
    return datetime.now(UTC)


def vendor_answer(reply: VendorReply | None) -> VendorAnswer | None:
    if reply is None:
        return None
    return VendorAnswer(
        name=reply.vendor,
        status=reply.status,
        request_id=reply.request_id,
        response_id=reply.response_id,
        body=reply.body,
    )


def result_event(
    *,
    command_id: str,
    idempotency_key: str | None,
    command_type: str | None,
    tenant: str | None,
    outcome: Outcome,
    started_at: datetime,
    attempts: int = 0,
    reply: VendorReply | None = None,
    error: ErrorInfo | None = None,
) -> ResultEvent:
    return ResultEvent.for_result(
        ResultData(
            command_id=command_id,
            idempotency_key=idempotency_key,
            type=command_type,
            tenant=tenant,
            outcome=outcome,
            attempts=attempts,
            started_at=started_at,
            finished_at=now(),
            vendor=vendor_answer(reply),
            error=error,
        )
    )


def outcome_of(error: RelayError) -> Outcome:
    return "rejected" if isinstance(error, CommandRejected) else "failed"


def rejection(
    code: ErrorCode,
    message: str,
    *,
    command_id: str,
    command_type: str | None = None,
    tenant: str | None = None,
    idempotency_key: str | None = None,
) -> ResultEvent:
    """The event for a message that never became a command: nothing was sent anywhere."""
    return result_event(
        command_id=command_id,
        idempotency_key=idempotency_key,
        command_type=command_type,
        tenant=tenant,
        outcome="rejected",
        started_at=now(),
        error=ErrorInfo(code=code, message=message),
    )


@dataclass(frozen=True)
class Rejected:
    """A message that is not a command: why, and what addresses its event."""

    error: CommandRejected
    fields: CommandFields
    digest: str  # of the command id and the body: the same message again has the same
