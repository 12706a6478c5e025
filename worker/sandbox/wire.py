"""Answers as bytes on the wire: what hostile faults send, past what an HTTP server lets an
app say (CR/LF or NUL in a header, a status line dripped one byte at a time, a connection
cut in the middle of a body).

A `Wire` is a plain value (the exact bytes, and how to send them); `send_wire` writes one
on a connection taken over from the HTTP server (`connections.RawChannel`) and ends it.
Nothing here checks or escapes a byte: that is the point.
"""

import asyncio
import http
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

Header = tuple[bytes, bytes]
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Segment:
    """`unit` repeated `count` times: a body of any size, held in a few bytes."""

    unit: bytes
    count: int = 1

    @property
    def size(self) -> int:
        return len(self.unit) * self.count


@dataclass(frozen=True, slots=True)
class Wire:
    """One answer as sent: `head` (the status line and header lines, blank line included)
    and `body`, exactly these bytes.

    `head_interval_s` / `body_interval_s` > 0 send that part one byte per interval (a
    drip). `cut_at` ends the connection once that many bytes of head and body are out
    (None: after all of them). `abortive` ends it with a TCP reset (RST), else with a
    close (FIN). The connection always ends after a wire: no keep-alive.
    """

    head: bytes
    body: tuple[Segment, ...] = ()
    head_interval_s: float = 0
    body_interval_s: float = 0
    cut_at: int | None = None
    abortive: bool = False

    @property
    def body_size(self) -> int:
        return sum(segment.size for segment in self.body)

    def dripping(self, *, head_s: float = 0, body_s: float = 0) -> "Wire":
        """This wire with its head and/or body sent one byte per interval."""
        return replace(self, head_interval_s=head_s, body_interval_s=body_s)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """`HTTP/1.1 <status> <reason>` and CRLF; the standard reason phrase unless given."""
    if reason is None:
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def http_head(status: int, headers: Iterable[Header]) -> bytes:
    """The status line and `name: value` lines, bytes as given, and the blank line."""
    lines = [status_line(status), *(name + b": " + value + b"\r\n" for name, value in headers)]
    return b"".join(lines) + b"\r\n"


def http_message(
    status: int,
    headers: Iterable[Header],
    body: tuple[Segment, ...] = (),
    *,
    content_type: bytes | None = None,
) -> Wire:
    """A whole answer: `headers`, then Content-Type (when given), Content-Length and
    Connection: close, then `body`."""
    size = sum(segment.size for segment in body)
    framing = [
        *([(b"content-type", content_type)] if content_type is not None else []),
        (b"content-length", str(size).encode()),
        (b"connection", b"close"),
    ]
    return Wire(http_head(status, [*headers, *framing]), body)


def chunks(body: Iterable[Segment]) -> Iterator[bytes]:
    """The body's bytes in pieces of about `CHUNK_BYTES` (never the whole of a huge body)."""
    for segment in body:
        if segment.size <= CHUNK_BYTES:
            if segment.size:
                yield segment.unit * segment.count
            continue
        per_chunk = max(1, CHUNK_BYTES // len(segment.unit))
        full, rest = divmod(segment.count, per_chunk)
        block = segment.unit * per_chunk
        for _ in range(full):
            yield block
        if rest:
            yield segment.unit * rest


class Channel(Protocol):
    """A client connection taken over from the HTTP server (see `connections.RawChannel`)."""

    @property
    def lost(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    async def drained(self) -> None: ...

    async def end(self, *, abortive: bool) -> None: ...


async def send_wire(channel: Channel, wire: Wire) -> None:
    """Write `wire` on `channel` as it says, then end the connection.

    Returns early when the client goes away. A dripped part sleeps `interval` after each
    byte; other parts go out in chunks, each once the previous one has left (a client that
    stops reading holds this coroutine, not memory).
    """
    budget = _Budget(wire.cut_at)
    try:
        if await _send_part(channel, (wire.head,), wire.head_interval_s, budget):
            await _send_part(channel, chunks(wire.body), wire.body_interval_s, budget)
    finally:
        await channel.end(abortive=wire.abortive)


class _Budget:
    """How many bytes may still go out before the cut."""

    def __init__(self, cut_at: int | None) -> None:
        self._left = cut_at

    def take(self, data: bytes) -> bytes:
        if self._left is None:
            return data
        taken = data[: self._left]
        self._left -= len(taken)
        return taken

    @property
    def spent(self) -> bool:
        return self._left == 0


async def _send_part(
    channel: Channel, pieces: Iterable[bytes], interval_s: float, budget: _Budget
) -> bool:
    """Send `pieces`; False once the connection must end (cut reached or client gone)."""
    for piece in pieces:
        data = budget.take(piece)
        if interval_s > 0:
            for index in range(len(data)):
                if channel.lost:
                    return False
                channel.write(data[index : index + 1])
                await asyncio.sleep(interval_s)
        elif data:
            channel.write(data)
            await channel.drained()
        if channel.lost or budget.spent:
            return False
    return True
