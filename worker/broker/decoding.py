"""From a raw broker message to a validated command, or to the reason it is not one.

Everything here treats the message as hostile: the size is checked before anything is
parsed, the body must be UTF-8 JSON (no UTF-16/32 guessing, no lone surrogates, no NaN),
nesting is bounded, and no part of the input is copied whole into the reason given back,
since that reason travels in an event and a log line.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from schemas.commands import COMMAND_TYPES, MAX_ID_LENGTH, TENANT_PATTERN, Command, parse_command
from schemas.events import ErrorCode
from worker.errors import CommandRejected
from worker.replies import nested_deeper_than
from worker.results import CommandFields, Rejected

MAX_PROBLEMS = 5
MAX_JSON_DEPTH = 32  # the deepest valid command is 5 levels; Spaaza's `target` may nest
MAX_PREVIEW_CHARS = 40  # how much of a wrong value a rejection quotes
# What a publisher may say the body is: JSON, or the generic labels client libraries put
# on raw bytes and text (kombu: application/data, binary; pika and others: nothing).
ACCEPTED_CONTENT_TYPES = frozenset(
    {"", "application/json", "text/json", "text/plain", "application/octet-stream",
     "application/data"}
)
ACCEPTED_CONTENT_ENCODINGS = frozenset({"", "utf-8", "utf8", "binary"})


def decode_message(
    body: bytes | str,
    message_id: str | None,
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    max_bytes: int = 256 * 1024,
    unreadable: str | None = None,
) -> Command | Rejected:
    """The command in a message, or why it is not one (and whom to tell).

    ``unreadable``: what of the message's AMQP properties could not be read
    (``frames.Damage.describe``); such a message is rejected for it, once its envelope
    and JSON are checked (its event then goes to the id in its body)."""
    message_id = usable_text(message_id)
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    data: Any = None
    try:
        _check_envelope(raw, content_type, content_encoding, max_bytes)
        data = _parse_json(raw)
        if unreadable is not None:
            raise CommandRejected(ErrorCode.INVALID_COMMAND, unreadable)
        command = _validate(data)
    except CommandRejected as error:
        fields = fields_of(data, message_id)
        return Rejected(error, fields, _digest(fields["command_id"], raw, unreadable))
    resolved: Command = command.with_defaults(message_id)
    return resolved


def _digest(command_id: str, raw: bytes, unreadable: str | None) -> str:
    """What tells one rejected message from another: its id and body, and what of its
    properties could not be read (the same body with them mended is another message)."""
    parts = [command_id.encode(), raw]
    if unreadable is not None:
        parts.append(unreadable.encode("utf-8", "surrogatepass"))
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _check_envelope(
    raw: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int
) -> None:
    if len(raw) > max_bytes:
        raise CommandRejected(
            ErrorCode.INVALID_COMMAND,
            f"the message is {len(raw)} bytes; commands are at most {max_bytes} bytes",
        )
    media_type, _, parameters = (content_type or "").partition(";")
    charset = parameters.strip().lower().removeprefix("charset=").strip('"')
    if media_type.strip().lower() not in ACCEPTED_CONTENT_TYPES or charset not in ("", "utf-8"):
        raise CommandRejected(
            ErrorCode.INVALID_COMMAND,
            f"content_type {preview(content_type)} is not accepted; send application/json "
            "in UTF-8",
        )
    if (content_encoding or "").lower() not in ACCEPTED_CONTENT_ENCODINGS:
        raise CommandRejected(
            ErrorCode.INVALID_COMMAND,
            f"content_encoding {preview(content_encoding)} is not accepted; send the JSON "
            "as UTF-8 without compression",
        )


def _parse_json(raw: bytes) -> Any:
    try:
        # Strict UTF-8, no lone surrogates, no NaN/Infinity, a nesting limit of its own.
        data = from_json(raw, allow_inf_nan=False, cache_strings="keys")
    except ValueError as error:
        raise CommandRejected(
            ErrorCode.INVALID_JSON, f"the message body is not UTF-8 JSON: {error}"
        ) from error
    if nested_deeper_than(data, MAX_JSON_DEPTH):
        raise CommandRejected(
            ErrorCode.INVALID_JSON, f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"
        )
    return data


def _validate(data: Any) -> Command:
    if not isinstance(data, dict):
        raise CommandRejected(
            ErrorCode.INVALID_COMMAND,
            f"a command is a JSON object, not a {type(data).__name__}",
        )
    if data.get("type") not in COMMAND_TYPES:
        raise CommandRejected(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown command type {preview(data.get('type'))}; expected one of "
            + ", ".join(COMMAND_TYPES),
        )
    try:
        return parse_command(data)
    except ValidationError as error:
        raise CommandRejected(ErrorCode.INVALID_COMMAND, describe(error)) from error


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
    # A hostile key name is input too: keep each part short.
    return ".".join(part[:MAX_PREVIEW_CHARS] for part in parts) or "(message)"


def preview(value: object) -> str:
    """A short, printable quote of a wrong value, for a rejection's message."""
    text = ascii(value)
    if len(text) > MAX_PREVIEW_CHARS:
        return f"{text[:MAX_PREVIEW_CHARS]}… ({len(text)} characters)"
    return text


def usable_text(value: object, max_length: int = MAX_ID_LENGTH) -> str | None:
    """``value`` when it can address an event: a short string of valid Unicode."""
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not text an event can carry
        return None
    return value


def fields_of(data: Any, message_id: str | None) -> CommandFields:
    """Whatever can be trusted of a rejected message, to address its event: values
    copied only when they are what the contract allows there."""
    data = data if isinstance(data, dict) else {}
    command_id = usable_text(data.get("id")) or message_id or str(uuid.uuid4())
    command_type = data.get("type")
    tenant = data.get("tenant", "default" if data else None)
    key = usable_text(data.get("idempotency_key")) or usable_text(data.get("idempotencyKey"))
    return {
        "command_id": command_id,
        "command_type": command_type if command_type in COMMAND_TYPES else None,
        "tenant": tenant if isinstance(tenant, str) and TENANT_PATTERN.fullmatch(tenant) else None,
        "idempotency_key": key or command_id,
    }
