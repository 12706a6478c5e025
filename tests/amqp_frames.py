"""AMQP 0-9-1 content-header properties written byte by byte, for values no client library
will encode (timestamps past the year 9999, field types AMQP does not define, text that is
not UTF-8, tables nested 2000 levels deep), and a publisher that sends them as they are.

Each :class:`Field` carries the bytes of one field value, the value py-amqp reads from
them (``_read_item``), and whether the worker can not read it (its message is rejected)
or RabbitMQ refuses it (the publisher's connection is closed: the broker's verdict).
The strategies draw such fields, header tables of every field type, and properties.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from amqp.basic_message import Message as AmqpMessage
from hypothesis import strategies as st
from kombu import Connection

from worker.broker.connection import connect

LAST_READABLE_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
MAX_DEPTH = 32  # tables and arrays the worker reads inside one another (headers included)
MAX_HEADERS_BYTES = 32 * 1024

# --- bytes ----------------------------------------------------------------------------------


def short_string(raw: bytes) -> bytes:
    assert len(raw) <= 255
    return struct.pack(">B", len(raw)) + raw


def long_string(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table_bytes(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table (length first) of (name, encoded field value) entries."""
    return long_string(b"".join(short_string(name) + value for name, value in entries))


def as_text(raw: bytes) -> str | bytes:
    """A long string or a name as py-amqp reads it: UTF-8 (lone surrogates too), else the
    bytes as they are."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw


@dataclass(frozen=True)
class Field:
    """One encoded field value (its type's letter first)."""

    raw: bytes
    value: Any  # as py-amqp reads it; None where it can not
    unreadable: bool = False  # the worker can not read it: its message is rejected
    refused: bool = False  # RabbitMQ refuses it: the publisher's connection is closed
    depth: int = 0  # tables and arrays inside it, itself included


def number(tag: str, layout: str, value: Any) -> Field:
    raw = struct.pack(layout, value)
    return Field(tag.encode() + raw, struct.unpack(layout, raw)[0])


def timestamp(seconds: int) -> Field:
    if seconds > LAST_READABLE_TIMESTAMP:
        return Field(b"T" + struct.pack(">Q", seconds), None, unreadable=True)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)
    return Field(b"T" + struct.pack(">Q", seconds), moment)


def decimal(scale: int, digits: int) -> Field:
    return Field(b"D" + struct.pack(">Bi", scale, digits), Decimal(digits) / Decimal(10**scale))


def text(raw: bytes) -> Field:
    return Field(b"S" + long_string(raw), as_text(raw))


def byte_array(raw: bytes) -> Field:
    return Field(b"x" + long_string(raw), raw)


def table(entries: Iterable[tuple[bytes, Field]]) -> Field:
    entries = list(entries)
    value = {as_text(name): item.value for name, item in entries}
    return Field(
        b"F" + table_bytes((name, item.raw) for name, item in entries),
        value,
        unreadable=any(item.unreadable for _, item in entries),
        refused=any(item.refused for _, item in entries),
        depth=1 + max((item.depth for _, item in entries), default=0),
    )


def array(items: Iterable[Field]) -> Field:
    items = list(items)
    return Field(
        b"A" + long_string(b"".join(item.raw for item in items)),
        [item.value for item in items],
        unreadable=any(item.unreadable for item in items),
        refused=any(item.refused for item in items),
        depth=1 + max((item.depth for item in items), default=0),
    )


def nested_arrays(levels: int) -> Field:
    """``levels`` arrays inside one another, a void at the bottom, as a header: what the
    worker reads of it is the arrays within its depth limit, None in place of the next."""
    raw = b"V"
    for _ in range(levels):
        raw = b"A" + long_string(raw)
    value = None
    for _ in range(min(levels, MAX_DEPTH - 1)):  # the headers table is the first level
        value = [value]
    return Field(raw, value, unreadable=levels + 1 > MAX_DEPTH, depth=levels)


VOID = Field(b"V", None)
UNKNOWN_TYPE = Field(b"Z\x00\x00\x00\x00", None, refused=True)
U_SHORT = Field(b"U" + struct.pack(">h", 5), 5, refused=True)  # py-amqp reads it; RabbitMQ not
NAN = Field(b"d" + struct.pack(">d", float("nan")), None, refused=True)


@dataclass(frozen=True)
class Headers:
    """A header table as sent, and as py-amqp reads it."""

    raw: bytes
    value: dict[Any, Any]
    unreadable: bool
    refused: bool


def headers(entries: Iterable[tuple[bytes, Field]]) -> Headers:
    entries = list(entries)
    raw = table_bytes((name, item.raw) for name, item in entries)
    too_deep = any(item.depth + 1 > MAX_DEPTH for _, item in entries)
    return Headers(
        raw,
        {as_text(name): item.value for name, item in entries},
        unreadable=too_deep or len(raw) - 4 > MAX_HEADERS_BYTES
        or any(item.unreadable for _, item in entries),
        refused=any(item.refused for _, item in entries),
    )


# The basic class's properties: flag bit and how each is written, in frame order.
PROPERTY_LAYOUT = (
    ("content_type", 0x8000, "s"), ("content_encoding", 0x4000, "s"),
    ("application_headers", 0x2000, "F"), ("delivery_mode", 0x1000, "o"),
    ("priority", 0x0800, "o"), ("correlation_id", 0x0400, "s"), ("reply_to", 0x0200, "s"),
    ("expiration", 0x0100, "s"), ("message_id", 0x0080, "s"), ("timestamp", 0x0040, "Q"),
    ("type", 0x0020, "s"), ("user_id", 0x0010, "s"), ("app_id", 0x0008, "s"),
    ("cluster_id", 0x0004, "s"),
)


def properties(**values: Any) -> bytes:
    """Property flags and list: short strings as bytes or text, ``application_headers``
    as :class:`Headers` (or a table's bytes), octets and the timestamp as numbers."""
    flags, body = 0, b""
    for name, bit, kind in PROPERTY_LAYOUT:
        value = values.pop(name, None)
        if value is None:
            continue
        flags |= bit
        if kind == "s":
            body += short_string(value.encode() if isinstance(value, str) else value)
        elif kind == "F":
            body += value.raw if isinstance(value, Headers) else value
        elif kind == "o":
            body += struct.pack(">B", value)
        else:
            body += struct.pack(">Q", value)
    assert not values, f"not properties of the basic class: {sorted(values)}"
    return struct.pack(">H", flags) + body


# --- strategies -----------------------------------------------------------------------------

names = st.binary(max_size=24)  # any bytes: py-amqp hands one that is not UTF-8 as bytes
not_utf8 = st.binary(min_size=1, max_size=24).filter(lambda raw: isinstance(as_text(raw), bytes))


def readable_scalars() -> st.SearchStrategy[Field]:
    """A value of each field type RabbitMQ takes and py-amqp reads."""
    return st.one_of(
        st.integers(-(2**7), 2**7 - 1).map(lambda v: number("b", ">b", v)),
        st.integers(0, 2**8 - 1).map(lambda v: number("B", ">B", v)),
        st.integers(-(2**15), 2**15 - 1).map(lambda v: number("s", ">h", v)),
        st.integers(0, 2**16 - 1).map(lambda v: number("u", ">H", v)),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: number("I", ">i", v)),
        st.integers(0, 2**32 - 1).map(lambda v: number("i", ">I", v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: number("l", ">q", v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: number("L", ">q", v)),
        st.floats(width=32, allow_nan=False, allow_infinity=False).map(
            lambda v: number("f", ">f", v)),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda v: number("d", ">d", v)),
        st.builds(decimal, st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)),
        st.integers(0, LAST_READABLE_TIMESTAMP).map(timestamp),
        st.booleans().map(lambda v: Field(b"t" + bytes([v]), v)),
        st.just(VOID),
        st.text(max_size=30).map(lambda v: text(v.encode())),
        not_utf8.map(text),
        st.binary(max_size=30).map(byte_array),
    )


def hostile_scalars() -> st.SearchStrategy[Field]:
    """Values the worker can not read (RabbitMQ takes them) or RabbitMQ refuses."""
    return st.one_of(
        st.integers(LAST_READABLE_TIMESTAMP + 1, 2**64 - 1).map(timestamp),
        st.sampled_from([2**63, 2**64 - 1, LAST_READABLE_TIMESTAMP + 1]).map(timestamp),
        st.sampled_from([UNKNOWN_TYPE, U_SHORT, NAN]),
    )


def field_values(hostile: bool) -> st.SearchStrategy[Field]:
    """Scalars, tables and arrays of them, a few levels deep; with ``hostile``, a
    value the worker can not read (or the broker refuses) now and then."""
    scalars = readable_scalars()
    if hostile:
        scalars = st.one_of(scalars, scalars, scalars, hostile_scalars())
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(array),
            st.lists(st.tuples(names, inner), max_size=4).map(table),
        ),
        max_leaves=10,
    )


@st.composite
def header_tables(draw: st.DrawFn, hostile: bool = True) -> Headers:
    """A header table of every field type; with ``hostile``, now and then one the worker
    can not read: a bad value, nesting past its limit, more bytes than it carries."""
    entries = draw(st.lists(st.tuples(names, field_values(hostile)), max_size=6))
    if hostile:
        extra = draw(st.sampled_from(["none", "none", "none", "deep", "big"]))
        if extra == "deep":
            entries.append((b"deep", nested_arrays(draw(st.integers(20, 2000)))))
        elif extra == "big":
            size = draw(st.integers(MAX_HEADERS_BYTES - 2000, MAX_HEADERS_BYTES + 20000))
            entries.append((b"big", text(b"x" * size)))
    return headers(entries)


@dataclass(frozen=True)
class Properties:
    """Short-string properties and the timestamp and priority, as sent, and whether the
    worker can read them."""

    values: dict[str, Any] = field(default_factory=dict)
    unreadable: bool = False


@st.composite
def hostile_properties(draw: st.DrawFn) -> Properties:
    """``message_id``, ``correlation_id``, ``type`` and ``app_id`` as text or not UTF-8;
    any 64-bit ``timestamp``, any ``priority``. (``user_id`` and ``expiration`` are left
    out: RabbitMQ checks them itself.)"""
    values: dict[str, Any] = {}
    unreadable = False
    for name in ("message_id", "correlation_id", "type", "app_id"):
        choice = draw(st.sampled_from(["absent", "text", "text", "not utf-8"]))
        if choice == "text":
            values[name] = draw(st.text(max_size=30)).encode()
        elif choice == "not utf-8":
            values[name] = draw(not_utf8)
            unreadable = True
    if draw(st.booleans()):
        values["timestamp"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        values["priority"] = draw(st.integers(0, 255))
    return Properties(values, unreadable)


# --- publishing -----------------------------------------------------------------------------


class RawMessage(AmqpMessage):  # type: ignore[misc]
    """A py-amqp message whose properties are the bytes given, written as they are."""

    def __init__(self, body: bytes, raw_properties: bytes) -> None:
        super().__init__(body)
        self.raw_properties = raw_properties

    def _serialize_properties(self) -> bytes:
        return self.raw_properties


class RawPublisher:
    """Publishes raw frames and waits for the broker's confirm. A frame RabbitMQ refuses
    closes this publisher's connection: :meth:`publish` says so and connects again."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self.refusals: list[str] = []
        self._open()

    def _open(self) -> None:
        self._connection: Connection = connect(self._url)
        self._connection.connect()
        self._channel = self._connection.connection.channel()
        self._channel.confirm_select()

    def publish(self, body: bytes, raw_properties: bytes, exchange: str, routing_key: str) -> bool:
        """True: the broker confirmed it; False: it refused it (and closed the connection)."""
        errors = (*self._connection.connection_errors, *self._connection.channel_errors)
        try:
            self._channel.basic_publish_confirm(
                RawMessage(body, raw_properties), exchange=exchange, routing_key=routing_key,
                confirm_timeout=10,
            )
            return True
        except errors as refusal:
            self.refusals.append(repr(refusal))
            self.close()
            self._open()
            return False

    def close(self) -> None:
        errors = (*self._connection.connection_errors, *self._connection.channel_errors)
        with contextlib.suppress(*errors):  # the broker may have closed it already
            self._connection.release()
