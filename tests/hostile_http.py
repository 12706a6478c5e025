"""A vendor that answers with any bytes, at any pace: a raw asyncio HTTP/1.1 server standing
in for ESET, fylr and Spaaza, and the hypothesis strategies of what it answers.

The server writes every byte of an answer itself, so nothing between it and the worker
tidies an answer up: a status line with any code from 100 to 999 and any reason, any
headers (duplicates, huge, odd bytes, lines that are no headers at all), any body, framed
by an honest ``Content-Length``, chunked, until the connection closes, or by a
``Content-Length`` that lies, and written at any pace (a delay before the first byte, a
drip of a few bytes at a time, a close in the middle).

Each request the worker sends has a *role*: ``token`` (ESET's and fylr's token endpoints),
``call`` (a command's API request), ``collect`` (ESET's 202 collect: the same request with a
``response-id`` header) and ``confirm`` (fylr's task read after a refused cancel). Each
role answers from its script, in order, then with its ``then`` answer. Placeholders in an
answer's head, headers and body are filled in per request: the request's Authorization
header (``@AUTH@``, without its scheme ``@BEARER@``), its body (``@FORM@``: a token
request's form holds the account's password) and freshly issued tokens (``@ACCESS@``,
``@REFRESH@``), which the server remembers as secrets the worker must never show.

Every exchange is recorded (:class:`Exchange`): what arrived, what was meant to be sent,
how much of it was written and when, so a test can tell what the worker can have seen.
The server runs on a loop of its own, in a thread, so a worker that blocks its loop does
not also slow its vendor down.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import strategies as st

T = TypeVar("T")

# --- what the server answers ---------------------------------------------------------

ROLES = ("token", "call", "collect", "confirm")
AUTH, BEARER, FORM, ACCESS, REFRESH = b"@AUTH@", b"@BEARER@", b"@FORM@", b"@ACCESS@", b"@REFRESH@"
# The framings of a body: an honest Content-Length, chunked, until the connection closes,
# a Content-Length promising more than is sent (then a close), or less (the rest is left
# on the connection, where the next answer's reader finds it).
FRAMINGS = ("length", "chunked", "close", "short", "long")
# A header no request may carry: only a token or an id with CRLF in it can put it there.
INJECTED_HEADER = "x-injected"


def _short(data: bytes, keep: int = 48) -> str:
    """bytes for a falsifying example's repr: long ones cut, with their length."""
    if len(data) <= keep:
        return repr(data)
    return f"{data[:keep]!r}…({len(data)} bytes)"


@dataclass(frozen=True)
class Timing:
    """When an answer's bytes go out: after ``delay_s``, then ``drip_bytes`` at a time
    every ``drip_interval_s`` (0 bytes: all at once)."""

    delay_s: float = 0.0
    drip_bytes: int = 0
    drip_interval_s: float = 0.0

    @property
    def instant(self) -> bool:
        return self.delay_s == 0 and self.drip_bytes == 0

    def __repr__(self) -> str:
        parts = [f"delay_s={self.delay_s}"] if self.delay_s else []
        if self.drip_bytes:
            parts.append(f"drip={self.drip_bytes}B/{self.drip_interval_s}s")
        return f"Timing({', '.join(parts)})"


@dataclass(frozen=True)
class Answer:
    """One answer, as bytes to write. ``head``: raw bytes written instead of the status
    line and headers (then the body, then a close); ``cut_after``: the connection is
    closed after this many bytes of the answer."""

    status: int = 200
    reason: bytes = b"OK"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    framing: str = "length"
    head: bytes | None = None
    timing: Timing = Timing()
    cut_after: int | None = None

    def __repr__(self) -> str:
        parts = [str(self.status)]
        if self.reason != b"OK":
            parts.append(f"reason={_short(self.reason)}")
        if self.headers:
            shown = [f"({_short(n, 24)}, {_short(v, 24)})" for n, v in self.headers[:4]]
            more = f", …{len(self.headers)} headers" if len(self.headers) > 4 else ""
            parts.append(f"headers=[{', '.join(shown)}{more}]")
        if self.body:
            parts.append(f"body={_short(self.body)}")
        if self.framing != "length":
            parts.append(f"framing={self.framing!r}")
        if self.head is not None:
            parts.append(f"head={_short(self.head)}")
        if not self.timing.instant:
            parts.append(repr(self.timing))
        if self.cut_after is not None:
            parts.append(f"cut_after={self.cut_after}")
        return f"Answer({', '.join(parts)})"

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass(frozen=True)
class Script:
    """A role's answers, in order; ``then`` answers every request after them."""

    answers: tuple[Answer, ...]
    then: Answer


@dataclass
class Exchange:
    """One request and the answer it got, as the server saw and sent it."""

    role: str
    method: str
    path: str
    request_headers: list[tuple[str, str]]
    request_body: bytes
    answer: Answer
    arrived_at: float  # time.monotonic()
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # as sent, filled in
    body: bytes = b""  # the body as sent (placeholders filled in), before framing
    head_bytes: int = 0  # how many of the answer's bytes are its head
    full_bytes: int = 0  # the whole answer's
    total_bytes: int = 0  # what was to be written of it (less when it is cut)
    sent_bytes: int = 0
    finished_at: float | None = None  # when its last byte was written
    desynced: bool = False  # bytes an earlier answer left on the connection came first
    leaves_bytes: bool = False  # it sent more than it framed: a reader finds them next
    issued: list[str] = field(default_factory=list)  # tokens minted for it

    def request_header(self, name: str) -> str | None:
        values = [v for n, v in self.request_headers if n == name]
        return values[0] if values else None

    @property
    def written(self) -> bool:
        """Every byte of the answer went out."""
        return self.finished_at is not None and self.sent_bytes == self.total_bytes

    @property
    def complete(self) -> bool:
        """The whole answer went out, uncut."""
        return self.written and self.total_bytes == self.full_bytes

    @property
    def body_bytes_sent(self) -> int:
        return max(0, self.sent_bytes - self.head_bytes)

    @property
    def duration_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.arrived_at

    def __repr__(self) -> str:
        sent = "all" if self.complete else f"{self.sent_bytes}/{self.total_bytes} bytes"
        extra = " desynced" if self.desynced else ""
        return f"<{self.role} {self.method} {self.path}: {self.answer!r}, sent {sent}{extra}>"


# --- the server ---------------------------------------------------------------------


class HostileVendor:
    """The raw HTTP/1.1 server, on a loop of its own in a thread. :meth:`play` sets the
    scripts of one example, :meth:`finish` ends its connections and returns what was
    exchanged."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile-vendor",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._scripts: dict[str, Script] = {}
        self._served: dict[str, int] = {}
        self.exchanges: list[Exchange] = []
        self.issued: list[str] = []  # every token it ever minted
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"HostileVendor({self.base_url})"

    def start(self) -> HostileVendor:
        self._thread.start()
        self._server = self._on_loop(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.finish()
        server = self._server
        if server is not None:
            server.close()
            self._on_loop(server.wait_closed())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def play(self, scripts: Mapping[str, Script]) -> None:
        """Answer from these scripts (by role) from now on, with a fresh record."""
        self._on_loop(self._set(dict(scripts)))

    def finish(self) -> list[Exchange]:
        """End every connection (answers still being written stop there) and return the
        exchanges since :meth:`play`."""
        return self._on_loop(self._close_connections())

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0, limit=1 << 20)

    async def _set(self, scripts: dict[str, Script]) -> None:
        self._scripts, self._served, self.exchanges = scripts, {}, []

    async def _close_connections(self) -> list[Exchange]:
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return list(self.exchanges)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        desynced = False  # an answer left bytes behind: what follows is read out of step
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                exchange = self._exchange(*request, desynced=desynced)
                keep_open, leaves_bytes = await self._answer(exchange, writer)
                desynced = desynced or leaves_bytes
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            return
        except asyncio.CancelledError:
            return  # finish(): the example is over (and 3.11's start_server would log it)
        finally:
            self._connections.discard(task)
            writer.close()

    def _exchange(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
        desynced: bool,
    ) -> Exchange:
        role = role_of(method, path, dict(headers))
        served = self._served.get(role, 0)
        self._served[role] = served + 1
        script = self._scripts.get(role) or Script((), Answer(404, b"Not Found"))
        answer = script.answers[served] if served < len(script.answers) else script.then
        exchange = Exchange(role, method, path, headers, body, answer, time.monotonic(),
                            desynced=desynced)
        self.exchanges.append(exchange)
        return exchange

    async def _answer(self, exchange: Exchange, writer: asyncio.StreamWriter) -> tuple[bool, bool]:
        """Write the exchange's answer; whether the connection stays open, and whether
        the answer left bytes its reader will take for the next answer's."""
        answer = exchange.answer
        fill = self._filler(exchange)
        exchange.headers = [(name, fill(value)) for name, value in answer.headers]
        exchange.body = fill(answer.body)
        head, body = _framed(answer, exchange.headers, exchange.body, fill)
        data = head + body
        if answer.cut_after is not None:
            data = data[: answer.cut_after]
        exchange.head_bytes, exchange.full_bytes = len(head), len(head) + len(body)
        exchange.total_bytes = len(data)
        timing = answer.timing
        if timing.delay_s:
            await asyncio.sleep(timing.delay_s)
        step = timing.drip_bytes or max(1, len(data))
        for start in range(0, len(data), step):
            if start and timing.drip_interval_s:
                await asyncio.sleep(timing.drip_interval_s)
            writer.write(data[start:start + step])
            await writer.drain()
            exchange.sent_bytes = min(len(data), start + step)
        exchange.finished_at = time.monotonic()
        closes = (answer.head is not None or answer.cut_after is not None
                  or answer.framing in ("close", "short"))
        no_body = 100 <= answer.status < 200 or answer.status in (204, 304)
        exchange.leaves_bytes = answer.framing == "long" or (no_body and bool(exchange.body))
        return not closes, exchange.leaves_bytes

    def _filler(self, exchange: Exchange) -> Callable[[bytes], bytes]:
        authorization = (exchange.request_header("authorization") or "").encode("latin-1")
        minted: dict[bytes, bytes] = {}

        def token(placeholder: bytes) -> bytes:
            if placeholder not in minted:
                prefix = "acc" if placeholder == ACCESS else "ref"
                value = f"{prefix}{secrets.token_hex(12)}"
                exchange.issued.append(value)
                self.issued.append(value)
                minted[placeholder] = value.encode()
            return minted[placeholder]

        def fill(data: bytes) -> bytes:
            if b"@" not in data:
                return data
            data = data.replace(AUTH, authorization)
            data = data.replace(BEARER, authorization.partition(b" ")[2])
            data = data.replace(FORM, exchange.request_body)
            for placeholder in (ACCESS, REFRESH):
                if placeholder in data:
                    data = data.replace(placeholder, token(placeholder))
            return data

        return fill


def role_of(method: str, path: str, headers: Mapping[str, str]) -> str:
    """What a request is, from its method, path and headers."""
    if path.endswith(("/oauth/token", "/oauth2/token")):
        return "token"
    if method == "GET" and path.startswith("/fylr/api/v1/task/"):
        return "confirm"
    if "response-id" in headers:
        return "collect"
    return "call"


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """The next request on the connection, or None once the client has closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = [(name.strip().lower(), value.strip())
               for name, _, value in (line.partition(":") for line in lines)]
    fields = dict(headers)
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        length = int(fields.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _framed(
    answer: Answer, headers: list[tuple[bytes, bytes]], body: bytes,
    fill: Callable[[bytes], bytes],
) -> tuple[bytes, bytes]:
    """The answer's head and its body as framed on the wire."""
    if answer.head is not None:
        return fill(answer.head), body
    framing: list[tuple[bytes, bytes]] = {
        "length": [(b"Content-Length", b"%d" % len(body))],
        "chunked": [(b"Transfer-Encoding", b"chunked")],
        "close": [(b"Connection", b"close")],
        "short": [(b"Content-Length", b"%d" % (len(body) + 10))],
        "long": [(b"Content-Length", b"%d" % (len(body) // 2))],
    }[answer.framing]
    lines = [b"HTTP/1.1 %d %s\r\n" % (answer.status, answer.reason)]
    lines += [name + b": " + value + b"\r\n" for name, value in [*framing, *headers]]
    head = b"".join(lines) + b"\r\n"
    if answer.framing == "chunked":
        pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return head, body


# --- how well-formed an answer is ----------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\x20-\x7e\t]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [\x20-\x7e\t]*)?\r\n")
FRAMING_HEADERS = (b"content-length", b"transfer-encoding")
MAX_PLAIN_HEADERS = 100
MAX_PLAIN_FIELD_BYTES = 4096


def status_of(exchange: Exchange) -> int | None:
    """The status the answer's first line names, if it is a status line at all."""
    answer = exchange.answer
    if answer.head is None:
        return answer.status
    match = _STATUS_LINE.match(answer.head)
    return int(match.group(1)) if match else None


def plainly_formed(exchange: Exchange) -> bool:
    """A head any HTTP/1.1 client reads the same way: a reason and headers of plain
    printable ASCII, a few, short, none that frames the body a second time. (Anything
    else may be read, or refused, either way.)"""
    answer = exchange.answer
    if answer.head is not None or not _FIELD_VALUE.fullmatch(answer.reason):
        return False
    if len(exchange.headers) > MAX_PLAIN_HEADERS:
        return False
    return all(
        _TOKEN.fullmatch(name)
        and _FIELD_VALUE.fullmatch(value)
        and len(name) + len(value) <= MAX_PLAIN_FIELD_BYTES
        and name.lower() not in FRAMING_HEADERS
        and name.lower() != b"connection"
        for name, value in exchange.headers
    )


# --- strategies: what a hostile vendor answers ---------------------------------------

INTERESTING_STATUSES = (
    100, 101, 102, 103, 199, 200, 201, 202, 203, 204, 206, 226, 299, 300, 301, 302, 303,
    304, 305, 307, 308, 399, 400, 401, 403, 404, 408, 409, 418, 429, 499, 500, 501, 502,
    503, 504, 505, 599, 600, 700, 999,
)
statuses = st.one_of(st.sampled_from(INTERESTING_STATUSES), st.integers(100, 999))
# Each of these draws something plain about half the time, so that one odd byte does not
# hide what the rest of an answer does to the worker.
reasons = st.one_of(
    st.just(b"OK"),
    st.sampled_from([b"", b"Moved Permanently", b"Accepted", b"\xff\xfe", b"caf\xc3\xa9",
                     b"\x00", b"a\rb", b"Accepted " * 40]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)
HEADER_NAMES = (
    b"request-id", b"response-id", b"retry-after", b"content-type", b"location",
    b"www-authenticate", b"connection", b"content-encoding", b"set-cookie", b"x-request-id",
    b"Content-Length", b"Transfer-Encoding", b"Response-Id", b"Retry-After",
)
HEADER_VALUES = (
    b"", b" ", b"\xc2\xb2", b"-1", b"1e9", b"NaN", b"inf", b"99999999999999999999999", b"0",
    b"0.01", b"3", b"Wed, 21 Oct 2015 07:28:00 GMT", b"Fri, 31 Dec 9999 23:59:59 GMT",
    b"application/json", b"text/html", b"application/json; charset=utf-16", b"gzip",
    b"chunked", b"close", b"keep-alive", b"upgrade", b"http://evil.example/steal",
    b"\x00", b"\x7f", b"\xff", b"a\x01b", b"caf\xc3\xa9", b"cached-1", AUTH, BEARER,
)
header_names = st.one_of(
    st.sampled_from(HEADER_NAMES),
    st.binary(min_size=1, max_size=16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
header_values = st.one_of(
    st.sampled_from(HEADER_VALUES),
    st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
HUGE_HEADER = ((b"x-huge", b"h" * 65536),)
MANY_HEADERS = tuple((b"x-h%d" % i, b"v") for i in range(2000))
PLAIN_VALUES = tuple(v for v in HEADER_VALUES if re.fullmatch(rb"[\x21-\x7e]+", v))
plain_headers = st.lists(
    st.tuples(st.sampled_from([n for n in HEADER_NAMES
                               if n.lower() not in (b"content-length", b"transfer-encoding")]),
              st.sampled_from(PLAIN_VALUES)),
    max_size=4,
).map(tuple)
header_lists = st.one_of(
    plain_headers,
    st.lists(st.tuples(header_names, header_values), max_size=5).map(tuple),
    st.sampled_from([HUGE_HEADER, MANY_HEADERS]),
)
JSON_TYPE = ((b"content-type", b"application/json"),)

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.text(max_size=12), st.sampled_from(["@AUTH@", "@BEARER@", "@FORM@"]),
)
_json_keys = st.one_of(
    st.sampled_from(["message", "description", "error", "error_description", "task", "status",
                     "patchingDetails", "run_canceled_at", "code"]),
    st.text(max_size=8),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_json_keys, inner, max_size=3),
    max_leaves=10,
)


def nested(opening: str, depth: int) -> bytes:
    """JSON nested ``depth`` levels: arrays (``[[[…]]]``) or objects (``{"a":{"a":…}}``)."""
    if opening == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def bodies(max_response_bytes: int) -> st.SearchStrategy[bytes]:
    """Bodies of any bytes and JSON of any shape and depth, some echoing the request,
    some around the worker's body limit."""
    return st.one_of(
        st.just(b""),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda key, text: json.dumps({key: text}).encode(),
                  st.sampled_from(["message", "description", "error", "error_description"]),
                  st.sampled_from(["token @AUTH@ refused", "@BEARER@", "form was @FORM@",
                                   "no such task", ""])),
        st.builds(nested, st.sampled_from("[{"), st.integers(1, 120_000)),
        st.binary(max_size=48),
        st.sampled_from([b'{"message": "\xff\xfe"}', b"\xef\xbb\xbf{}",
                         json.dumps({"message": "x"}).encode("utf-16"),
                         b"<html><body>502 Bad Gateway</body></html>", b"null", b"NaN",
                         b'{"a": 1e999999}', b"1" * 5000, b"@FORM@"]),
        st.integers(max_response_bytes - 2, max_response_bytes + 2).map(lambda n: b"x" * n),
    )


timings_instant = st.just(Timing())
timings_hostile = st.one_of(
    st.just(Timing()),
    st.builds(Timing, delay_s=st.sampled_from([0.05, 0.3, 1.5])),
    st.builds(Timing, drip_bytes=st.sampled_from([1, 3, 16]),
              drip_interval_s=st.sampled_from([0.005, 0.05, 0.2])),
)
HEADS = (
    b"", b"\x00\x01\x02garbage", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200\r\n\r\n{}",
    b"HTTP/9.9 200 OK\r\n\r\n", b"ICY 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", b"HTTP/1.1 200 OK\nBare: lf\n\n{}",
    b"HTTP/1.0 200 OK\r\n\r\n{}", b"HTTP/1.1 301 Moved\r\nLocation: http://evil.example/\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}", b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2",
)
heads = st.one_of(st.sampled_from(HEADS), st.binary(max_size=40))


def answers(
    max_response_bytes: int,
    status: st.SearchStrategy[int] = statuses,
    body: st.SearchStrategy[bytes] | None = None,
    timing: st.SearchStrategy[Timing] = timings_instant,
    broken: bool = False,
) -> st.SearchStrategy[Answer]:
    """Answers of any status, headers, body and framing; ``broken``: also raw heads and
    connections closed mid-answer."""
    made = st.builds(
        Answer,
        status=status,
        reason=reasons,
        headers=header_lists,
        body=body if body is not None else bodies(max_response_bytes),
        framing=st.sampled_from(FRAMINGS),
        timing=timing,
    )
    if not broken:
        return made
    return st.one_of(
        made,
        st.builds(Answer, head=heads, body=st.sampled_from([b"", b"{}"]), timing=timing),
        st.builds(lambda a, cut: Answer(a.status, a.reason, a.headers, a.body, a.framing,
                                        None, a.timing, cut),
                  made, st.integers(0, 120)),
    )
