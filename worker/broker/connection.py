"""Opening a broker connection the same way everywhere (worker, client, tests)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from amqp import serialization
from amqp.spec import Basic
from kombu import Connection

from worker.settings import AMQP_SCHEMES

EMBEDDED_SCHEME = "sqla+sqlite:///"


def is_amqp(url: str) -> bool:
    return url.startswith(AMQP_SCHEMES)


def embedded_path(url: str) -> Path | None:
    """The file of an embedded (SQLite) broker URL; None for any other."""
    path = url.removeprefix(EMBEDDED_SCHEME)
    return Path(path) if url.startswith(EMBEDDED_SCHEME) and path else None


def connect(
    url: str,
    poll_interval_s: float = 0.02,
    heartbeat_s: int = 30,
    wait_for_confirms: bool = True,
) -> Connection:
    """A kombu connection (not yet connected).

    RabbitMQ: heartbeats on, and each publish waits for its confirm (kombu leaves confirms
    off, and without them a published event can vanish silently), unless
    ``wait_for_confirms`` is off because the caller tracks confirms itself. The embedded
    broker polls its SQLite file; ``poll_interval_s`` bounds how late it notices a new
    message.
    """
    if is_amqp(url):
        options = {"confirm_publish": wait_for_confirms}
        return Connection(url, transport_options=options, heartbeat=heartbeat_s)
    path = embedded_path(url)
    if path is not None:  # SQLite creates the file, not the directory it goes in
        path.parent.mkdir(parents=True, exist_ok=True)
    connection = Connection(url)
    # The SQLAlchemy transport hands its transport options to create_engine, so the
    # polling interval is set on the transport itself.
    connection.transport.polling_interval = poll_interval_s
    return connection


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _with_lenient_text(decode: Any) -> Any:
    """``decode`` with its short strings read leniently: a copy of the function whose
    global ``pstr_t`` (py-amqp's strict UTF-8 decoding) is replaced, nothing patched."""
    return types.FunctionType(
        decode.__code__, {**decode.__globals__, "pstr_t": _lenient_text}, decode.__name__
    )


_strict_properties = serialization.decode_properties_basic
_lenient_properties = _with_lenient_text(_strict_properties)


def _decode_properties(buf: bytes, offset: int) -> Any:
    """py-amqp raises while reading a frame whose ``message_id`` (or another short string
    property) is not UTF-8, and that ends the connection of every delivery on it. Such
    properties are read with U+FFFD in place of the bad bytes instead; the message then
    reaches the consumer, which rejects or runs it like any other."""
    try:
        return _strict_properties(buf, offset)
    except UnicodeDecodeError:
        return _lenient_properties(buf, offset)


serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = _decode_properties
