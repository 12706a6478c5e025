"""From a raw broker message to a validated command, or to the reason it is not one."""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError

from schemas.commands import COMMAND_TYPES, Command, parse_command
from schemas.events import ErrorCode
from worker.errors import CommandRejected
from worker.results import CommandFields

MAX_PROBLEMS = 5


def decode_command(body: bytes | str, message_id: str | None) -> Command:
    """The command in ``body``; raises :class:`CommandRejected` saying what to fix."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise CommandRejected(
            ErrorCode.INVALID_JSON, f"the message body is not UTF-8 JSON: {error}"
        ) from error
    if not isinstance(data, dict):
        raise CommandRejected(
            ErrorCode.INVALID_COMMAND,
            f"a command is a JSON object, not a {type(data).__name__}",
        )
    if data.get("type") not in COMMAND_TYPES:
        raise CommandRejected(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown command type {data.get('type')!r}; expected one of "
            + ", ".join(COMMAND_TYPES),
        )
    try:
        command = parse_command(data)
    except ValidationError as error:
        raise CommandRejected(ErrorCode.INVALID_COMMAND, describe(error)) from error
    resolved: Command = command.with_defaults(message_id)
    return resolved


def describe(error: ValidationError) -> str:
    """Each problem as ``field.path: what is wrong``, the first few only."""
    problems = [f"{_path(e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)]
    more = len(problems) - MAX_PROBLEMS
    text = "; ".join(problems[:MAX_PROBLEMS])
    return f"{text} (and {more} more)" if more > 0 else text


def _path(loc: tuple[int | str, ...]) -> str:
    # The union tags (command type, ESET/Spaaza provider) are not fields: leave them out.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in COMMAND_TYPES else [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "params" and parts[1] in ("eset", "spaaza"):
        del parts[1]
    return ".".join(parts) or "(message)"


def identity(body: bytes | str, message_id: str | None) -> CommandFields:
    """Whatever can be read of a rejected message, to address its event."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    data = data if isinstance(data, dict) else {}

    def text(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) and len(value) <= 200 else None

    command_id = text("id") or message_id or str(uuid.uuid4())
    return {
        "command_id": command_id,
        "command_type": text("type"),
        "tenant": text("tenant") or ("default" if data else None),
        "idempotency_key": text("idempotency_key") or text("idempotencyKey") or command_id,
    }
