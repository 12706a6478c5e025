"""Logging: plain text for people, JSON lines for machines, secrets scrubbed either way.

A line about a command carries its id, type, tenant, outcome and error code: JSON lines as
fields, text lines as ``name=value`` pairs after the message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from worker.redaction import Redactor

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The ``extra`` fields a text line shows after its message, in this order.
CONTEXT_FIELDS = (
    "command_id", "idempotency_key", "command_type", "tenant", "outcome", "error_code",
    "attempts", "delay_s", "queue",
)
PLAIN_VALUE = re.compile(r"[^\s\"'=\\]+")


def redact(text: str) -> str:
    """``text`` without secret-shaped values (what the worker does not know itself)."""
    return Redactor().text(text)


class RedactingFilter(logging.Filter):
    """Scrubs the rendered message (and exception text) of every record it sees: of
    every secret the process knows (``redactor``) and of secret-shaped values."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redactor.text(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self._redactor.text(text)
            record.exc_info = None
        return True


class TraceContextFilter(logging.Filter):
    """Adds the current trace and span ids, so a log line leads to its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class TextFormatter(logging.Formatter):
    """The plain line, then ``name=value`` for each context field the record carries
    (quoted as JSON when the value has spaces, quotes or control characters, so a
    command's id can not forge a line); the key only when it is not the id."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = []
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None or (
                name == "idempotency_key" and value == getattr(record, "command_id", None)
            ):
                continue
            pairs.append(f"{name}={_quoted(value)}")
        if not pairs:
            return line
        head, newline, rest = line.partition("\n")  # an exception's traceback stays below
        return f"{head} {redact(' '.join(pairs))}{newline}{rest}"


def _quoted(value: object) -> str:
    text = str(value)
    return text if PLAIN_VALUE.fullmatch(text) and text.isprintable() else json.dumps(text)


def handler_for(
    fmt: str, stream: TextIO = sys.stderr, redactor: Redactor | None = None
) -> logging.Handler:
    """A handler writing ``text`` or ``json`` lines, trace ids added, secrets scrubbed
    (those ``redactor`` knows, and secret-shaped values)."""
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(TraceContextFilter())
    handler.addFilter(RedactingFilter(redactor))
    return handler


def configure(level: str = "INFO", fmt: str = "text", redactor: Redactor | None = None) -> None:
    handler = handler_for(fmt, redactor=redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; the worker logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
