"""Hostile faults: answers no well-behaved vendor sends, but vendors, gateways and proxies
in the wild do. Each is a validated value (put in `Faults.script`, as JSON through
`PUT /_sandbox/faults`, or from `command-relay sandbox --hostile`), and renders as the
exact bytes to send (a `Wire`), which the sandbox writes on the connection itself
(see `connections`), so nothing is refused or cleaned up on the way out.

Every fault names the calls it waits for (`route`, `path_contains`) and how many it
answers (`times`, None = all). Three of them damage the call's real answer on its way
back (the call is carried out first, and its effect applied: the vendor acted, the
answer was lost): `Drip`, `Reset`, `HugeHeaders`; `BadToken` mangles a real grant. The
others answer instead of the call (nothing is carried out).

    sandbox.state.faults = Faults(script=[Drip(part="head", interval_s=0.5)])
    PUT /_sandbox/faults {"script": [{"kind": "pending-id", "response_id": "crlf"}]}
"""

import dataclasses
import json
import uuid
from typing import ClassVar, Literal, get_args

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from worker.sandbox.answers import Answer, Vendor, vendor_error
from worker.sandbox.wire import Header, Segment, Wire, http_message

# The sandbox's routes, as its stats name them.
Route = Literal[
    "eset.token",
    "eset.update_task_triggers",
    "eset.batch_delete",
    "eset.fetch_patching",
    "fylr.token",
    "fylr.cancel",
    "fylr.get_task",
    "spaaza.update_task",
]
ROUTES: tuple[str, ...] = get_args(Route)
# Which calls a fault waits for: `api` any vendor API call, `token` any token call, a
# vendor's name its API calls, or one route.
Selector = Literal["api", "token", "eset", "fylr", "spaaza", Route]
_TOKEN_SELECTORS = frozenset({"token", "eset.token", "fylr.token"})
_ESET_API_SELECTORS = frozenset(
    {"eset", "eset.update_task_triggers", "eset.batch_delete", "eset.fetch_patching"}
)
_JSON = b"application/json"
_MAX_BODY_BYTES = 2**31  # a huge body is generated as it is sent, never held

# Retry-After values a vendor or a proxy was seen to send, by name.
RETRY_AFTER_VALUES: dict[str, str] = {
    "superscript": "²",
    "negative": "-5",
    "overflow": "1e309",
    "huge": "99999999999",
    "past-date": "Wed, 21 Oct 2015 07:28:00 GMT",
    "future-date": "Fri, 31 Dec 9999 23:59:59 GMT",
    "garbage": "soon, maybe",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """What a hostile fault sees of the call it answers: the request as received (`target`
    is the raw path and query)."""

    route: str
    method: str
    target: bytes
    headers: tuple[Header, ...]
    body: bytes

    @property
    def vendor(self) -> Vendor:
        vendor = self.route.partition(".")[0]
        return "eset" if vendor == "eset" else "fylr" if vendor == "fylr" else "spaaza"

    def stamp(self) -> list[Header]:
        """The headers every answer of this vendor carries (ESET: a fresh request-id)."""
        return [(b"request-id", str(uuid.uuid4()).encode())] if self.vendor == "eset" else []


def selects(selector: str, route: str) -> bool:
    """True when `selector` names `route` (see `Selector`)."""
    is_token = route.endswith(".token")
    if selector in ("api", "token"):
        return is_token == (selector == "token")
    return selector == route or (not is_token and route.startswith(f"{selector}."))


_CONFIG = ConfigDict(extra="forbid")


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class HostileBase:
    """What every hostile fault has: the calls it waits for and how many it answers."""

    # Each fault's tag, first in its JSON (a subclass's own declaration keeps this place).
    kind: str = ""
    route: Selector = "api"
    path_contains: str | None = None
    # Calls it answers before it is used up; None: every matching call, until replaced.
    times: int | None = Field(default=1, ge=1)

    carries_out: ClassVar[bool] = False

    def matches(self, route: str, path: str) -> bool:
        """True when this fault answers a call of `route` on `path`."""
        if not selects(self.route, route):
            return False
        return self.path_contains is None or self.path_contains in path

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        """The bytes answering `call`; `answer` is the call's real answer when the fault
        `carries_out` the call, else None."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class Redirect(HostileBase):
    """A 3xx with `Location: location` (none if None) and an empty body: to another host by
    default; a relative location (`/_sandbox/reset`) points at the sandbox's own control
    routes. 304 is Not Modified to a request that asked for nothing of the sort."""

    kind: Literal["redirect"] = "redirect"
    status: Literal[301, 302, 303, 304, 307, 308] = 302
    location: str | None = "http://redirected.invalid/moved"

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        location = [] if self.location is None else [(b"location", self.location.encode())]
        return http_message(self.status, [*call.stamp(), *location])


PendingIdForm = Literal[
    "missing", "empty", "control", "nul", "cr", "lf", "crlf", "utf-8", "latin-1", "long"
]


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class PendingId(HostileBase):
    """ESET's 202 "request cached", with a `response-id` that cannot be collected with:
    `missing`, `empty`, with `control` characters (ESC, DEL, BEL), a `nul`, a bare `cr` or
    `lf`, a `crlf` that makes the rest look like a header of its own, non-ASCII `utf-8` or
    `latin-1` bytes, or `long` (`length` bytes). Only on ESET API calls (collects too)."""

    kind: Literal["pending-id"] = "pending-id"
    route: Selector = "eset"
    response_id: PendingIdForm = "empty"
    length: int = Field(default=16 * 1024, ge=1, le=16 * 1024 * 1024)

    @field_validator("route")
    @classmethod
    def _eset_api_only(cls, route: str) -> str:
        if route not in _ESET_API_SELECTORS:
            raise ValueError(f"a 202 comes from ESET API routes: {sorted(_ESET_API_SELECTORS)}")
        return route

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        value = self._value()
        header = [] if value is None else [(b"response-id", value)]
        return http_message(202, [*call.stamp(), *header])

    def _value(self) -> bytes | None:
        forms: dict[str, bytes | None] = {
            "missing": None,
            "empty": b"",
            "control": b"resp-\x1b[31m-\x07-\x7f",
            "nul": b"resp-\x00-id",
            "cr": b"resp-\r-id",
            "lf": b"resp-\n-id",
            "crlf": b"resp-id\r\nx-injected: 1",
            "utf-8": "réponse-идентификатор".encode(),
            "latin-1": "réponse-façade".encode("latin-1"),
            "long": b"r" * self.length,
        }
        return forms[self.response_id]


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class Drip(HostileBase):
    """The call's real answer, its `head` (status line and headers) or its `body` sent one
    byte every `interval_s` (the other part at once). The call is carried out."""

    kind: Literal["drip"] = "drip"
    part: Literal["head", "body"] = "body"
    interval_s: float = Field(default=1.0, gt=0, le=60)

    carries_out: ClassVar[bool] = True

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        whole = real_answer(call, _required(answer, self.kind))
        if self.part == "head":
            return whole.dripping(head_s=self.interval_s)
        return whole.dripping(body_s=self.interval_s)


ResetPoint = Literal["before-answer", "after-head", "mid-body"]


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class Reset(HostileBase):
    """The call is carried out, then its connection ends `before-answer` (nothing sent),
    `after-head` (status line and headers, no body) or `mid-body` (half of the body the
    headers announce): with a TCP reset if `abortive`, else a plain close."""

    kind: Literal["reset"] = "reset"
    at: ResetPoint = "before-answer"
    abortive: bool = True

    carries_out: ClassVar[bool] = True

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        whole = real_answer(call, _required(answer, self.kind))
        if self.at == "before-answer":
            cut = 0
        elif self.at == "after-head":
            cut = len(whole.head)
        else:
            cut = len(whole.head) + whole.body_size // 2
        return Wire(whole.head, whole.body, cut_at=cut, abortive=self.abortive)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class OddBody(HostileBase):
    """A `status` answer whose body is JSON nested `depth` deep, of `deep-objects`
    (`{"a":{"a":…}}`, default 100,000) or `deep-arrays` (`[[…]]`, default 900);
    `invalid-json` under a JSON content type; `huge` (`size_bytes` of valid JSON, made as
    it is sent); or `other-type` (an HTML page). `content_type` overrides the type sent."""

    kind: Literal["odd-body"] = "odd-body"
    shape: Literal["deep-objects", "deep-arrays", "invalid-json", "huge", "other-type"] = (
        "deep-objects"
    )
    status: int = Field(default=200, ge=200, le=599)
    depth: int | None = Field(default=None, ge=1, le=10_000_000)
    size_bytes: int = Field(default=16 * 1024 * 1024, ge=16, le=_MAX_BODY_BYTES)
    content_type: str | None = None

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        body, content_type = self._body()
        if self.content_type is not None:
            content_type = self.content_type.encode()
        return http_message(self.status, call.stamp(), body, content_type=content_type)

    def _body(self) -> tuple[tuple[Segment, ...], bytes]:
        if self.shape == "deep-objects":
            depth = self.depth or 100_000
            return (Segment(b'{"a":', depth), Segment(b"0"), Segment(b"}", depth)), _JSON
        if self.shape == "deep-arrays":
            depth = self.depth or 900
            return (Segment(b"[", depth), Segment(b"]", depth)), _JSON
        if self.shape == "invalid-json":
            return (Segment(b'{"patchingDetails": [{"displayName": "7-Zip",}, '),), _JSON
        if self.shape == "huge":
            opening, closing = b'{"padding":"', b'"}'
            filler = self.size_bytes - len(opening) - len(closing)
            return (Segment(opening), Segment(b"x", filler), Segment(closing)), _JSON
        page = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>"
        return (Segment(page),), b"text/html; charset=utf-8"


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class Echo(HostileBase):
    """A `status` answer echoing the request as received: its request line, every header
    (`Authorization` too) and its body (a token request's form, password and all). As
    the `vendor`'s own error body with the echo as its message, as `json`
    (`{"error", "request": {method, target, headers, body}}`) or as plain `text`."""

    kind: Literal["echo"] = "echo"
    status: int = Field(default=400, ge=200, le=599)
    format: Literal["vendor", "json", "text"] = "vendor"

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        text = _request_text(call)
        if self.format == "text":
            return http_message(
                self.status, call.stamp(), (Segment(text),), content_type=b"text/plain"
            )
        if self.format == "vendor":
            message = f"Invalid request: {text.decode('utf-8', 'replace')}"
            body = vendor_error(call.vendor, self.status, message).body
        else:
            body = _dumps({"error": "request echoed", "request": _request_fields(call)})
        return http_message(self.status, call.stamp(), (Segment(body),), content_type=_JSON)


BadTokenShape = Literal[
    "html",
    "list",
    "no-access-token",
    "crlf-token",
    "control-token",
    "non-ascii-token",
    "expires-string",
    "expires-null",
    "expires-negative",
    "expires-huge",
    "expires-zero",
]


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class BadToken(HostileBase):
    """A token endpoint's `status` answer built from the real grant (one is issued): an
    `html` login page, the grant in a JSON `list`, no `access_token`, an `access_token`
    with CR/LF, control characters or non-ASCII characters appended, or `expires_in` as a
    string, null, negative, huge (10^30) or zero. Only on token routes."""

    kind: Literal["bad-token"] = "bad-token"
    route: Selector = "token"
    shape: BadTokenShape = "html"
    status: int = Field(default=200, ge=200, le=599)

    carries_out: ClassVar[bool] = True

    @field_validator("route")
    @classmethod
    def _token_routes_only(cls, route: str) -> str:
        if route not in _TOKEN_SELECTORS:
            raise ValueError(f"a bad token comes from token routes: {sorted(_TOKEN_SELECTORS)}")
        return route

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        if self.shape == "html":
            page = b"<html><head><title>Sign in</title></head><body><form></form></body></html>"
            body, content_type = page, b"text/html; charset=utf-8"
        else:
            body, content_type = _dumps(self._payload(_grant(answer))), _JSON
        return http_message(self.status, call.stamp(), (Segment(body),), content_type=content_type)

    def _payload(self, grant: dict[str, object]) -> object:
        token = str(grant.get("access_token", ""))
        changes: dict[str, dict[str, object]] = {
            "crlf-token": {"access_token": f"{token}\r\nX-Injected: 1"},
            "control-token": {"access_token": f"{token}\x00\x07\x1b"},
            "non-ascii-token": {"access_token": f"{token}é中"},
            "expires-string": {"expires_in": str(grant.get("expires_in", 3600))},
            "expires-null": {"expires_in": None},
            "expires-negative": {"expires_in": -3600},
            "expires-huge": {"expires_in": 10**30},
            "expires-zero": {"expires_in": 0},
        }
        if self.shape == "list":
            return [grant]
        if self.shape == "no-access-token":
            return {name: value for name, value in grant.items() if name != "access_token"}
        return {**grant, **changes[self.shape]}


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class BadRetryAfter(HostileBase):
    """A 429 or 503 in the vendor's error shape whose `Retry-After` is `value`, sent as its
    UTF-8 bytes (see `RETRY_AFTER_VALUES`: `²`, `-5`, `1e309`, dates, garbage)."""

    kind: Literal["bad-retry-after"] = "bad-retry-after"
    status: Literal[429, 503] = 429
    value: str = "²"

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        body = vendor_error(call.vendor, self.status).body
        headers = [*call.stamp(), (b"retry-after", self.value.encode())]
        return http_message(self.status, headers, (Segment(body),), content_type=_JSON)


@dataclass(frozen=True, kw_only=True, config=_CONFIG)
class HugeHeaders(HostileBase):
    """The call's real answer with `one-large` header of `size_bytes` (64 KiB by default)
    or `many` headers (`count`, 2,000 by default) added. The call is carried out."""

    kind: Literal["huge-headers"] = "huge-headers"
    shape: Literal["one-large", "many"] = "one-large"
    size_bytes: int = Field(default=64 * 1024, ge=1, le=16 * 1024 * 1024)
    count: int = Field(default=2000, ge=1, le=100_000)

    carries_out: ClassVar[bool] = True

    def wire(self, call: Call, answer: Answer | None) -> Wire:
        if self.shape == "one-large":
            extra = [(b"x-sandbox-padding", b"a" * self.size_bytes)]
        else:
            extra = [(b"x-sandbox-padding-%d" % index, b"1") for index in range(self.count)]
        return real_answer(call, _required(answer, self.kind), extra)


HostileFault = (
    Redirect | PendingId | Drip | Reset | OddBody | Echo | BadToken | BadRetryAfter | HugeHeaders
)


def real_answer(call: Call, answer: Answer, extra: list[Header] | None = None) -> Wire:
    """`answer` as the sandbox would send it, plus `extra` headers."""
    headers = [(name.encode(), value.encode()) for name, value in answer.headers]
    body = (Segment(answer.body),) if answer.body else ()
    content_type = _JSON if answer.body else None
    return http_message(
        answer.status, [*call.stamp(), *headers, *(extra or [])], body, content_type=content_type
    )


def _required(answer: Answer | None, kind: str) -> Answer:
    if answer is None:
        raise ValueError(f"a {kind} fault damages the call's real answer, and none was given")
    return answer


def _grant(answer: Answer | None) -> dict[str, object]:
    """The grant the token endpoint issued, or a stand-in when it refused."""
    try:
        grant = json.loads(answer.body) if answer is not None else None
    except ValueError:
        grant = None
    if isinstance(grant, dict) and "access_token" in grant:
        return grant
    return {"access_token": "sandbox-no-grant", "token_type": "Bearer", "expires_in": 3600}


def _request_text(call: Call) -> bytes:
    lines = [call.method.encode() + b" " + call.target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in call.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + call.body


def _request_fields(call: Call) -> dict[str, object]:
    headers = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in call.headers]
    return {
        "method": call.method,
        "target": call.target.decode("latin-1"),
        "headers": headers,
        "body": call.body.decode("utf-8", "replace"),
    }


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
