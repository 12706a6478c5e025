"""Reading the properties of a delivery that py-amqp can not read, instead of losing the
connection over them.

py-amqp reads a delivery's properties (its headers table included) while it takes frames
off the socket, and offers no lenient mode: a value it can not turn into a Python object
raises out of ``drain_events``. RabbitMQ passes on values py-amqp can not read: a
timestamp past the year 9999 (where ``datetime`` ends), a short string that is not UTF-8,
tables nested past Python's recursion limit. The connection then ends with every delivery
on it, the message comes back, and it happens again, to every command near it. Values
py-amqp does read must also fit in a frame when the worker publishes its copy of the
message (lane, delay queue, dead-letter queue): RabbitMQ ends the connection of a header
frame larger than its ``frame_max``, and py-amqp re-encodes some values larger than they
came (a one-byte integer takes five).

:func:`install` puts :func:`decode_properties` in py-amqp's place. py-amqp's own reader
goes first; when it raises (whatever it raises), or what it read is larger
(:data:`MAX_HEADERS_BYTES`) or deeper (:data:`MAX_HEADER_DEPTH`) than the worker can
carry on, :func:`read_properties` reads the properties again. That reader never raises:
it keeps every value it can read as py-amqp would, puts ``None`` in place of each one it
can not (an unknown field type, after which nothing more of its table can be found, or
a table cut short), and notes each in a :class:`Damage` kept in the properties under
:data:`DAMAGE_KEY`. No AMQP property has that name, so a publisher can not set it; the
consumer rejects a damaged message alone (:func:`damage_of`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from amqp import serialization
from amqp.spec import Basic

from worker.broker.decoding import preview
from worker.replies import nested_deeper_than

DAMAGE_KEY = "relay-damage"  # in a delivery's properties; no AMQP property is named so
MAX_HEADERS_BYTES = 32 * 1024  # as sent; py-amqp may re-encode them in 2.5 times that
MAX_HEADER_DEPTH = 32  # tables and arrays inside one another, the headers table included
MAX_PROBLEMS_SHOWN = 3
SHORT_STRING_BYTES = 255
# The properties of AMQP 0-9-1's basic class, by flag bit, in frame order.
_PROPERTIES = (
    (0x8000, "content_type"), (0x4000, "content_encoding"), (0x2000, "application_headers"),
    (0x1000, "delivery_mode"), (0x0800, "priority"), (0x0400, "correlation_id"),
    (0x0200, "reply_to"), (0x0100, "expiration"), (0x0080, "message_id"),
    (0x0040, "timestamp"), (0x0020, "type"), (0x0010, "user_id"), (0x0008, "app_id"),
    (0x0004, "cluster_id"),
)
_OCTETS = {"delivery_mode", "priority"}
# Field types whose value is one number, as py-amqp reads them (``_read_item``).
_NUMBERS = {"b": ">b", "B": ">B", "s": ">h", "U": ">h", "u": ">H", "I": ">i", "i": ">I",
            "L": ">q", "l": ">q", "f": ">f", "d": ">d"}

_strict_properties = serialization.decode_properties_basic


@dataclass(frozen=True)
class Damage:
    """What of a delivery's properties could not be read, one problem a line: where
    (property or header, quoted at most 40 characters), what, and what to send instead."""

    problems: tuple[str, ...]

    def describe(self) -> str:
        shown = "; ".join(self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        suffix = f" (and {more} more)" if more > 0 else ""
        return f"the message's AMQP properties could not all be read: {shown}{suffix}"


def damage_of(properties: Mapping[str, Any] | None) -> Damage | None:
    """The damage :func:`decode_properties` noted in a delivery's properties; None when
    they were read whole."""
    damage = (properties or {}).get(DAMAGE_KEY)
    return damage if isinstance(damage, Damage) else None


def unreadable(properties: Mapping[str, Any] | None) -> str | None:
    """What of a delivery's properties could not be read, in words for its rejection;
    None when they were read whole."""
    damage = damage_of(properties)
    return None if damage is None else damage.describe()


def install() -> None:
    """Read every delivery's properties with :func:`decode_properties` (idempotent)."""
    serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = decode_properties


def decode_properties(buf: bytes, offset: int) -> tuple[dict[str, Any], int]:
    """py-amqp's reading of the properties at ``offset`` (the rest of a content header
    frame), or, when it raises, read past the frame or more than the worker carries on,
    the tolerant reading with its :class:`Damage`."""
    if len(buf) - offset > MAX_HEADERS_BYTES:  # the headers may be larger: read them so
        return read_properties(buf, offset)
    try:
        properties, end = _strict_properties(buf, offset)
    except Exception:  # anything py-amqp raises on a publisher's bytes: read them again
        return read_properties(buf, offset)
    # py-amqp reads a string the frame cuts short as what there is of it, and goes on.
    headers = properties.get("application_headers")
    if end > len(buf) or nested_deeper_than(headers, MAX_HEADER_DEPTH):
        return read_properties(buf, offset)
    return properties, end


def read_properties(buf: bytes, offset: int) -> tuple[dict[str, Any], int]:
    """The properties at ``offset``, whatever the bytes: each value as py-amqp reads it,
    ``None`` in place of one that can not be read, and, when any could not, a
    :class:`Damage` under :data:`DAMAGE_KEY`. Never raises."""
    reader = _Reader(bytes(buf))
    properties, end = reader.properties(offset)
    if reader.problems:
        properties[DAMAGE_KEY] = Damage(tuple(reader.problems))
    return properties, end


class _CutShort(Exception):
    """A value runs past the end of the frame, or of the table or array holding it."""


class _Unknown(Exception):
    """A field type py-amqp does not know: nothing after it in its table can be found."""


@dataclass
class _Reader:
    buf: bytes
    problems: list[str] = field(default_factory=list)

    def properties(self, offset: int) -> tuple[dict[str, Any], int]:
        end = len(self.buf)
        properties: dict[str, Any] = {}
        try:
            (flags,), offset = self._unpack(">H", offset, end)
        except _CutShort:
            self.problems.append("the properties are cut short (no property flags)")
            return properties, end
        for bit, name in _PROPERTIES:
            if not flags & bit:
                continue
            try:
                properties[name], offset = self._property(name, offset, end)
            except _CutShort:
                self.problems.append(f"property {name} is cut short: the frame ends in it; "
                                     "nothing after it could be read")
                return properties, end
        return properties, offset

    def _property(self, name: str, offset: int, end: int) -> tuple[Any, int]:
        if name == "application_headers":
            return self._headers(offset, end)
        if name in _OCTETS:
            (value,), offset = self._unpack(">B", offset, end)
            return value, offset
        if name == "timestamp":  # py-amqp hands the property over as seconds, not a datetime
            (value,), offset = self._unpack(">Q", offset, end)
            return value, offset
        raw, offset = self._short_bytes(offset, end)
        return self._short_text(raw, f"property {name}"), offset

    def _short_text(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8", "surrogatepass")  # as py-amqp reads short strings
        except UnicodeDecodeError:
            self.problems.append(f"{where} is not UTF-8 ({preview(raw)}); send UTF-8 text")
            # U+FFFD for what is not UTF-8, within the 255 bytes AMQP sends again.
            text = raw.decode("utf-8", "replace").encode()[:SHORT_STRING_BYTES]
            return text.decode("utf-8", "ignore")

    def _headers(self, offset: int, end: int) -> tuple[dict[Any, Any], int]:
        (size,), start = self._unpack(">I", offset, end)
        table_end = min(start + size, end)
        if start + size > end:
            self.problems.append("the headers table is cut short: the frame ends in it")
        if size > MAX_HEADERS_BYTES:
            self.problems.append(
                f"the headers take {size} bytes: only the first {MAX_HEADERS_BYTES} are read, "
                "the headers past them are dropped; send smaller headers"
            )
        read_end = min(table_end, start + MAX_HEADERS_BYTES)
        # A header the end of what is read cuts in two is said above already.
        said = read_end < start + size
        return self._table(start, read_end, None, 1, said), table_end

    def _table(
        self, offset: int, end: int, top: Any, depth: int, said: bool = False
    ) -> dict[Any, Any]:
        """The entries of a table up to ``end``; ``top``: the header it is in (None: the
        headers table itself); ``said``: that the table is cut short is noted already."""
        table: dict[Any, Any] = {}
        while offset < end:
            try:
                raw_key, offset = self._short_bytes(offset, end)
            except _CutShort:
                if not said:
                    self._note(top, depth, "is cut short: a table ends in a header's name")
                break
            key = _key(raw_key)
            where = key if top is None else top
            try:
                table[key], offset = self._item(offset, end, where, depth)
            except _CutShort:
                if not said:
                    self._note(where, depth, "is cut short: its table ends in it")
                table[key] = None
                break
            except _Unknown:
                table[key] = None
                break
        return table

    def _item(self, offset: int, end: int, where: Any, depth: int) -> tuple[Any, int]:
        (tag,), offset = self._unpack(">B", offset, end)
        kind = chr(tag)
        if kind in _NUMBERS:
            (value,), offset = self._unpack(_NUMBERS[kind], offset, end)
            return value, offset
        if kind in "Sx":
            (size,), offset = self._unpack(">I", offset, end)
            raw, offset = self._take(size, offset, end)
            return (_key(raw) if kind == "S" else raw), offset
        if kind == "t":
            (value,), offset = self._unpack(">B", offset, end)
            return bool(value), offset
        if kind == "V":
            return None, offset
        if kind == "D":
            (scale, digits), offset = self._unpack(">Bi", offset, end)
            return self._decimal(digits, scale, where, depth), offset
        if kind == "T":
            (seconds,), offset = self._unpack(">Q", offset, end)
            return self._timestamp(seconds, where, depth), offset
        if kind in "FA":
            return self._container(kind, offset, end, where, depth + 1)
        self._note(where, depth, f"has field type {preview(kind)}, which AMQP 0-9-1 does not "
                   "define, and what follows it in its table is lost; send the field types "
                   "RabbitMQ documents")
        raise _Unknown

    def _decimal(self, digits: int, scale: int, where: Any, depth: int) -> Decimal | None:
        try:
            return Decimal(digits) / Decimal(10**scale)  # as py-amqp reads it
        except ArithmeticError as error:  # in a decimal context set to trap, say
            self._note(where, depth, f"is a decimal that can not be read ({preview(error)})")
            return None

    def _timestamp(self, seconds: int, where: Any, depth: int) -> datetime | None:
        try:
            # As py-amqp reads it: UTC, without a time zone.
            return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None)
        except (OverflowError, ValueError, OSError):
            self._note(where, depth, f"is a timestamp past the year 9999 ({seconds} seconds); "
                       "send one from 1970 to 9999")
            return None

    def _container(
        self, kind: str, offset: int, end: int, where: Any, depth: int
    ) -> tuple[Any, int]:
        (size,), start = self._unpack(">I", offset, end)
        container_end = start + size
        if container_end > end:
            raise _CutShort
        if depth > MAX_HEADER_DEPTH:
            self._note(where, depth, f"nests tables and arrays more than {MAX_HEADER_DEPTH} "
                       "levels deep; send flatter headers")
            return None, container_end
        if kind == "F":
            return self._table(start, container_end, where, depth), container_end
        return self._array(start, container_end, where, depth), container_end

    def _array(self, offset: int, end: int, where: Any, depth: int) -> list[Any]:
        array: list[Any] = []
        while offset < end:
            try:
                value, offset = self._item(offset, end, where, depth)
            except _CutShort:
                self._note(where, depth, "is cut short: an array in it ends in a value")
                array.append(None)
                break
            except _Unknown:
                array.append(None)
                break
            array.append(value)
        return array

    def _note(self, where: Any, depth: int, problem: str) -> None:
        """A problem with a header: ``where`` is its name in the headers table (None: the
        table itself), ``depth`` how deep in it the problem is."""
        name = "the headers table" if where is None else f"header {preview(where)}"
        inside = f" (in a table or array {depth - 1} level(s) down)" if depth > 1 else ""
        self.problems.append(f"{name}{inside} {problem}")

    def _unpack(self, layout: str, offset: int, end: int) -> tuple[tuple[Any, ...], int]:
        raw, after = self._take(struct.calcsize(layout), offset, end)
        return struct.unpack(layout, raw), after

    def _short_bytes(self, offset: int, end: int) -> tuple[bytes, int]:
        (size,), offset = self._unpack(">B", offset, end)
        return self._take(size, offset, end)

    def _take(self, size: int, offset: int, end: int) -> tuple[bytes, int]:
        after = offset + size
        if after > end:
            raise _CutShort
        return self.buf[offset:after], after


def _key(raw: bytes) -> str | bytes:
    """Text as py-amqp reads a long string or a table's key: UTF-8 (lone surrogates
    allowed), else the bytes as they are."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw
