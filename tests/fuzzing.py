"""Fuzzing the worker's promise from the outside: anything a publisher sends gets exactly
one terminal event, and the worker keeps running.

The strategies draw :class:`Fuzzed` messages: a body (JSON text or raw bytes), the AMQP
properties and headers to send it with, and what the contract says must come of it
(:class:`Expect`). :class:`FuzzRig` runs one worker through ``tests/harness.py``, publishes
each message exactly as drawn (no client-side serializer in the way) and checks, per
message, what a user can observe: the events exchange (every event), a reply queue, the
dead-letter queue, a queue nobody may write to, and the sandbox's vendor counters.

A message that stops the worker fails its example with the worker's traceback; the rig
then starts a fresh worker on fresh queues (the poison message stays behind), so the
other examples, and hypothesis's shrinking, still run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from kombu import Consumer, Queue
from kombu.message import Message

from schemas.events import ResultEvent
from worker.broker.connection import connect, is_amqp
from worker.broker.topology import Topology
from worker.sandbox import SandboxServer
from worker.settings import Settings

from .harness import RunningRelay, running_relay

# --- what must come of a message ---------------------------------------------------------

REJECTION_CODES = frozenset(
    {
        "invalid_json",
        "invalid_command",
        "unknown_type",
        "unknown_tenant",
        "vendor_not_configured",
        "region_not_supported",
        "deadline_passed",
        "idempotency_key_conflict",
    }
)
MAX_ERROR_MESSAGE = 1000  # an error message says what is wrong; it never echoes the input


@dataclass(frozen=True)
class Expect:
    """The outcomes allowed for a message, and the error codes allowed when rejected."""

    outcomes: frozenset[str]
    codes: frozenset[str] = REJECTION_CODES

    def __repr__(self) -> str:
        codes = "" if self.codes == REJECTION_CODES else f" {sorted(self.codes)}"
        return f"Expect({'|'.join(sorted(self.outcomes))}{codes})"


def rejected(*codes: str) -> Expect:
    return Expect(frozenset({"rejected"}), frozenset(codes) if codes else REJECTION_CODES)


REJECTED = rejected()
ACCEPTED = Expect(frozenset({"succeeded", "failed"}))  # a valid command: run, never rejected
TERMINAL = Expect(frozenset({"succeeded", "failed", "rejected"}))  # any, but exactly one

# --- one fuzzed message -------------------------------------------------------------------

ID = "@@fuzz-id@@"  # in a JSON text: replaced by a fresh id when the message is published
TAG = "x-fuzz-tag"  # header on every published message, to find it in the dead-letter queue
REPLY, COMMANDS, DEAD, VICTIM, EVENTS = "@reply", "@commands", "@dead", "@victim", "@events"
REPLY_PREFIXES = ("relay.replies.", "amq.gen-", "amq.rabbitmq.reply-to")


@dataclass(frozen=True)
class Fuzzed:
    """A message as a hostile (or sloppy) publisher sends it."""

    label: str
    expect: Expect
    text: str | None = None  # JSON text (may hold ``ID``), encoded with ``encoding``
    raw: bytes | None = None  # or the body's bytes as they are
    encoding: str = "utf-8"
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"
    content_encoding: str | None = "utf-8"
    message_id: str | None = None  # None: a fresh uuid; else this plus a fresh suffix
    correlation_id: str | None = None  # likewise, with a fresh suffix
    reply_to: str = REPLY  # a queue name, or one of the @names the rig resolves
    routing_key: str = "unknown"

    def body(self, fresh_id: str) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.text is not None
        return self.text.replace(ID, fresh_id).encode(self.encoding, errors="replace")

    def __repr__(self) -> str:
        shown = [f"{self.label!r}", repr(self.expect)]
        if self.raw is not None:
            shown.append(f"raw={_short(self.raw)}")
        if self.text is not None:
            shown.append(f"text={_short(self.text)}")
        if self.encoding != "utf-8":
            shown.append(f"encoding={self.encoding!r}")
        if self.headers:
            shown.append(f"headers={_short({k: _short(v) for k, v in self.headers.items()})}")
        for name in ("content_type", "content_encoding"):
            if getattr(self, name) != getattr(Fuzzed, name):
                shown.append(f"{name}={getattr(self, name)!r}")
        for name in ("message_id", "correlation_id"):
            if getattr(self, name) is not None:
                shown.append(f"{name}={_short(getattr(self, name))}")
        if self.reply_to != REPLY:
            shown.append(f"reply_to={_short(self.reply_to)}")
        return f"Fuzzed({', '.join(shown)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis's report: short, not every field in full


def _short(value: Any, limit: int = 160) -> str:
    """A repr that stays readable for 6 MB bodies and 4000-digit numbers."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}…(+{len(value) - limit} more)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**60:
        return f"<int of {len(str(abs(value)))} digits>"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…(+{len(text) - limit} more)"


# --- JSON with literals Python's json would not write -------------------------------------


class Literal(str):
    """A JSON token written as is: NaN, 1e3, a 4500-digit number, 5000 nested arrays."""


def to_json(value: Any, ascii_only: bool = True) -> str:
    if isinstance(value, Literal):
        return str(value)
    if isinstance(value, dict):
        items = (f"{to_json(str(k), ascii_only)}:{to_json(v, ascii_only)}" for k, v in
                 value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v, ascii_only) for v in value) + "]"
    if isinstance(value, str):
        # A lone surrogate can only travel escaped ("\ud800"): UTF-8 can not carry it.
        return json.dumps(value, ensure_ascii=ascii_only or _has_surrogate(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return Literal(_digits(value))
    return json.dumps(value)


def _digits(value: int) -> str:
    return ("-" if value < 0 else "") + _positive_digits(abs(value))


def _positive_digits(value: int) -> str:
    # Past sys.int_max_str_digits str() refuses; split in halves.
    if value < 10**1000:
        return str(value)
    half = 10**1000
    high, low = divmod(value, half)
    return _positive_digits(high) + str(low).rjust(1000, "0")


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def usable_id(value: Any) -> bool:
    """What the contract allows as a command id, and UTF-8 can carry in an event."""
    return isinstance(value, str) and 1 <= len(value) <= 200 and not _has_surrogate(value)


def body_id(body: bytes) -> str | None:
    """The body's own id, when a strict reader (UTF-8, RFC 8259) finds a usable one."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, RecursionError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if usable_id(value) else None


# --- strategies: valid commands -----------------------------------------------------------

KINDS = ("eset-triggers", "spaaza-triggers", "batch-delete", "cancel-task", "fetch-patching")
TYPE_OF = {
    "eset-triggers": "update-triggers",
    "spaaza-triggers": "update-triggers",
    "batch-delete": "batch-delete",
    "cancel-task": "cancel-task",
    "fetch-patching": "fetch-patching",
}
COMMAND_TYPES = ("update-triggers", "batch-delete", "cancel-task", "fetch-patching")
VALID_IDS = st.integers(1, 2**31 - 1)  # no contract names a bound; these fit any sane one
uuids = st.uuids().map(str)
future = st.datetimes(
    min_value=datetime(2090, 1, 1), max_value=datetime(2999, 12, 31), timezones=st.just(UTC)
).map(lambda moment: moment.isoformat().replace("+00:00", "Z"))
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@st.composite
def valid_commands(draw: st.DrawFn, kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """A command the contract accepts, with ``id`` set to the fresh-id placeholder."""
    kind = kind or draw(st.sampled_from(KINDS))
    camel = draw(st.booleans())
    params: dict[str, Any]
    if kind == "eset-triggers":
        manual = draw(st.just({}) | future.map(lambda t: {"expireTime" if camel else
                                                          "expire_time": t}))
        params = {"taskUuid" if camel else "task_uuid": draw(uuids),
                  "triggers": [{"manual": manual}] * draw(st.integers(1, 3))}
        if draw(st.booleans()):
            params["provider"] = "eset"
    elif kind == "spaaza-triggers":
        trigger: dict[str, Any] = {"once": draw(future)}
        if draw(st.booleans()):
            trigger["repeat"] = draw(st.sampled_from(["daily", "weekly", "monthly"]))
        params = {"provider": "spaaza", "taskId" if camel else "task_id": draw(VALID_IDS),
                  "trigger": trigger}
        for name, values in (("desc", st.text(max_size=40)), ("debug", st.text(max_size=20)),
                             ("target", st.dictionaries(st.text(max_size=8), json_values,
                                                        max_size=3))):
            if draw(st.booleans()):
                params[name] = draw(values)
    elif kind == "batch-delete":
        params = {"objectUuids" if camel else "object_uuids":
                  draw(st.lists(uuids, min_size=1, max_size=5))}
    elif kind == "cancel-task":
        params = {"taskId" if camel else "task_id": draw(VALID_IDS)}
    else:
        params = {}
    command: dict[str, Any] = {"type": TYPE_OF[kind], "id": ID, "params": params}
    if kind == "fetch-patching" and draw(st.booleans()):
        del command["params"]
    if draw(st.booleans()):
        command["idempotency_key"] = f"{ID}/key"
    if draw(st.booleans()):
        command["tenant"] = "default"
    if draw(st.booleans()):
        command["deadline"] = draw(future)
    return kind, command


def command_message(
    command: dict[str, Any], label: str, expect: Expect, ascii_only: bool = True, **kwargs: Any
) -> Fuzzed:
    routing_key = command.get("type") if isinstance(command.get("type"), str) else None
    routing_key = routing_key if routing_key in COMMAND_TYPES else "unknown"
    return Fuzzed(label, expect, text=to_json(command, ascii_only), routing_key=routing_key,
                  **kwargs)


@st.composite
def valid_messages(draw: st.DrawFn) -> Fuzzed:
    kind, command = draw(valid_commands())
    return command_message(command, f"valid {kind}", ACCEPTED, ascii_only=draw(st.booleans()))


# --- strategies: invalid commands ---------------------------------------------------------

# Integers the contract wants, in every other costume a JSON publisher may send.
INT_IMPOSTORS: tuple[Any, ...] = (
    True, False, "12", "+5", " 8 ", "1_000", "0x10", "1e3", "٣", "", 2.0, 1.5, 1e3, -0.0,
    Literal("1e3"), Literal("2.0"), Literal("12E0"), None, [], [1], {}, {"id": 1}, 0, -1,
    -(2**63), 2**63, 2**64 + 1, Literal("1" + "0" * 4000), Literal("9" * 4301),
)
huge_ints = st.integers(20, 5000).map(lambda n: Literal("7" * n))  # far past int64
NOT_UUIDS: tuple[Any, ...] = ("", "not-a-uuid", "8f5c0000-0000-4000-8000-00000000000g", 1,
                              None, True, [], {}, "8f5c0000" * 5)
NOT_TIMES: tuple[Any, ...] = ("tomorrow", "2099-01-01T00:00:00", "2099-13-01T00:00:00Z", "",
                              [], 0, 4102444800)  # numbers: not RFC 3339 either


def _param_key(params: dict[str, Any], name: str) -> str:
    camel = "".join(w if i == 0 else w.title() for i, w in enumerate(name.split("_")))
    return camel if camel in params else name


@st.composite
def mutated_messages(draw: st.DrawFn) -> Fuzzed:
    """A valid command with one thing broken, so the contract rejects it."""
    kind, command = draw(valid_commands())
    params = command.get("params", {})
    choices = ["extra param", "extra field", "params not an object", "bad tenant",
               "unknown tenant", "past deadline", "naive deadline", "bad id",
               "bad idempotency key"]
    if kind in ("spaaza-triggers", "cancel-task"):
        choices += ["task_id impostor", "task_id impostor", "missing task_id"]
    if kind == "eset-triggers":
        choices += ["bad task_uuid", "no triggers", "bad trigger", "bad expire_time",
                    "unknown provider"]
    if kind == "spaaza-triggers":
        choices += ["bad once", "bad repeat", "no trigger", "desc not text"]
    if kind == "batch-delete":
        choices += ["no objects", "bad object uuid", "too many objects", "objects not a list"]
    mutation = draw(st.sampled_from(choices))
    expect = rejected("invalid_command")
    if mutation == "extra param":
        params[f"x_{draw(st.text(max_size=12))}"] = draw(json_values)
        command["params"] = params
    elif mutation == "extra field":
        command[f"x_{draw(st.text(max_size=12))}"] = draw(json_values)
    elif mutation == "params not an object":
        command["params"] = draw(st.sampled_from([None, [], "x", 1, True, [params]]))
    elif mutation == "bad tenant":
        command["tenant"] = draw(st.sampled_from(["", "a b", "ü", "x" * 65, "../etc", None, 1]))
    elif mutation == "unknown tenant":
        command["tenant"] = draw(st.from_regex(r"[a-z]{3,10}", fullmatch=True).filter(
            lambda t: t != "default"))
        expect = rejected("unknown_tenant")
    elif mutation == "past deadline":
        command["deadline"] = "2001-01-01T00:00:00Z"
        expect = rejected("deadline_passed")
    elif mutation == "naive deadline":
        command["deadline"] = draw(st.sampled_from(NOT_TIMES[:3]))
    elif mutation == "bad id":
        command["id"] = draw(st.sampled_from(["", 1, True, None, ["x"], "x" * 201]))
        if command["id"] is None:  # null means "not given": still valid
            command["deadline"] = "not a time"
    elif mutation == "bad idempotency key":
        command["idempotency_key"] = draw(st.sampled_from(["", 7, ["k"], "k" * 201]))
    elif mutation == "task_id impostor":
        params[_param_key(params, "task_id")] = draw(st.sampled_from(INT_IMPOSTORS) | huge_ints)
    elif mutation == "missing task_id":
        del params[_param_key(params, "task_id")]
    elif mutation == "bad task_uuid":
        params[_param_key(params, "task_uuid")] = draw(st.sampled_from(NOT_UUIDS))
    elif mutation == "no triggers":
        params["triggers"] = draw(st.sampled_from([[], None, {}, [{}], [{"manual": None}]]))
    elif mutation == "bad trigger":
        params["triggers"] = [{"manual": {}, "cron": "* * * * *"}]
    elif mutation == "bad expire_time":
        params["triggers"] = [{"manual": {"expire_time": draw(st.sampled_from(NOT_TIMES))}}]
    elif mutation == "unknown provider":
        params["provider"] = draw(st.sampled_from(["ESET", "spaza", "", 1, None]))
    elif mutation == "bad once":
        params["trigger"] = {"once": draw(st.sampled_from((*NOT_TIMES, None)))}
    elif mutation == "bad repeat":
        params["trigger"] = {**params["trigger"], "repeat": draw(
            st.sampled_from(["hourly", "Daily", "", 1]))}
    elif mutation == "no trigger":
        del params["trigger"]
    elif mutation == "desc not text":
        params["desc"] = draw(st.sampled_from([1, [], {}, True]))
    elif mutation == "no objects":
        params[_param_key(params, "object_uuids")] = []
    elif mutation == "bad object uuid":
        key = _param_key(params, "object_uuids")
        params[key] = [*params[key], draw(st.sampled_from(NOT_UUIDS))]
    elif mutation == "too many objects":
        params[_param_key(params, "object_uuids")] = [str(uuid.UUID(int=i + 1)) for i in
                                                     range(1001)]
    elif mutation == "objects not a list":
        params[_param_key(params, "object_uuids")] = draw(st.sampled_from(
            ["8f5c0000-0000-4000-8000-000000000001", {}, 1, None]))
    if isinstance(command.get("params"), dict) and any(
        isinstance(v, Literal) and len(v) > 20 for v in command["params"].values()
    ):
        # A number too big for the parser: a reader that refuses it can not see the id.
        command.pop("id")
        command.pop("idempotency_key", None)
        expect = rejected("invalid_command", "invalid_json")
    return command_message(command, f"{kind}: {mutation}", expect)


@st.composite
def integer_impostors(draw: st.DrawFn) -> Fuzzed:
    """``task_id`` (cancel-task, Spaaza update-triggers) as anything but a sane integer."""
    kind, command = draw(valid_commands(draw(st.sampled_from(["cancel-task",
                                                              "spaaza-triggers"]))))
    value = draw(st.sampled_from(INT_IMPOSTORS) | huge_ints)
    command["params"][_param_key(command["params"], "task_id")] = value
    expect = rejected("invalid_command")
    if isinstance(value, Literal) and len(value) > 20:
        command.pop("id")
        command.pop("idempotency_key", None)
        expect = rejected("invalid_command", "invalid_json")
    return command_message(command, f"{kind}: task_id {_short(value, 40)}", expect)


# --- strategies: bodies that are not commands at all --------------------------------------


def raw_message(body: bytes, label: str, expect: Expect = REJECTED) -> Fuzzed:
    return Fuzzed(label, expect, raw=body)


arbitrary_bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=512),
    st.binary(min_size=1, max_size=64).map(lambda b: b"\xef\xbb\xbf" + b),  # a BOM, then junk
    st.text(max_size=200).map(str.encode),
).map(lambda body: raw_message(body, "arbitrary bytes"))


@st.composite
def wrong_shapes(draw: st.DrawFn) -> Fuzzed:
    """JSON, but not a command: another type at the top, no type, an unknown type, or a
    known type whose params are not an object."""
    shape = draw(st.sampled_from(["top", "no type", "unknown type", "params not object",
                                  "params missing"]))
    value: Any
    if shape == "top":
        value = draw(json_scalars | st.lists(json_values, max_size=4) | st.floats(
            allow_nan=False, allow_infinity=False))
    elif shape == "no type":
        value = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k != "type"),
                                     json_values, max_size=4))
    elif shape == "unknown type":
        kind = draw(json_values.filter(lambda t: t not in COMMAND_TYPES))
        value = {"type": kind, "params": draw(json_values)}
    elif shape == "params not object":
        value = {"type": draw(st.sampled_from(COMMAND_TYPES)),
                 "params": draw(json_scalars | st.lists(json_values, max_size=3))}
    else:
        value = {"type": draw(st.sampled_from(COMMAND_TYPES[:3]))}
    if isinstance(value, dict) and draw(st.booleans()):
        value["id"] = ID
    return Fuzzed(f"wrong shape: {shape}", REJECTED, text=to_json(value, draw(st.booleans())))


def nested(depth: int, kind: str) -> Literal:
    if kind == "arrays":
        return Literal("[" * depth + "]" * depth)
    if kind == "objects":
        return Literal('{"a":' * depth + "1" + "}" * depth)
    return Literal('[{"a":' * (depth // 2) + "null" + "}]" * (depth // 2))


@st.composite
def deep_and_odd_numbers(draw: st.DrawFn) -> Fuzzed:
    """Deep nesting (to 5000 levels), numbers past int64 (to 5000 digits), NaN and
    Infinity: in places where any of them is wrong. No ``id``: a reader that refuses
    such a body can not see one."""
    depth = draw(st.integers(1, 20) | st.integers(900, 5000))
    deep = nested(depth, draw(st.sampled_from(["arrays", "objects", "mixed"])))
    odd = draw(st.sampled_from([Literal("NaN"), Literal("Infinity"), Literal("-Infinity")])
               | huge_ints | st.just(deep))
    where = draw(st.sampled_from(["top", "task_id", "type", "params", "tenant", "object",
                                  "spaaza target", "deadline"]))
    command: Any
    if where == "top":
        command = odd
    elif where == "task_id":
        command = {"type": "cancel-task", "params": {"task_id": odd}}
    elif where == "type":
        command = {"type": odd, "params": {}}
    elif where == "params":
        command = {"type": "batch-delete", "params": odd}
    elif where == "tenant":
        command = {"type": "fetch-patching", "tenant": odd, "params": {}}
    elif where == "object":
        command = {"type": "batch-delete", "params": {"object_uuids": [odd]}}
    elif where == "deadline":
        command = {"type": "fetch-patching", "deadline": odd}
    else:
        _, command = draw(valid_commands("spaaza-triggers"))
        del command["id"]
        command.pop("idempotency_key", None)
        if odd[0].isdigit():
            odd = Literal("NaN")  # any number is a valid target value; NaN is not JSON
        elif odd is deep and depth < 900:
            odd = nested(900 + depth, "objects")  # shallow nesting is a valid target
        command["params"]["target"] = {"x": odd}
    return Fuzzed(f"deep/odd number in {where}", REJECTED, text=to_json(command))


@st.composite
def foreign_encodings(draw: st.DrawFn) -> Fuzzed:
    """A valid command, but not UTF-8 (the contract: "one JSON object, UTF-8")."""
    _, command = draw(valid_commands())
    del command["id"]
    command["idempotency_key"] = f"clé-{ID}"  # é: not ASCII, so not UTF-8 in latin-1 either
    encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                     "utf-32-be", "latin-1", "cp1252"]))
    return Fuzzed(f"valid command in {encoding}", rejected("invalid_json"),
                  text=to_json(command, ascii_only=False), encoding=encoding,
                  routing_key=command["type"])


lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)


@st.composite
def surrogate_strings(draw: st.DrawFn) -> str:
    return draw(st.text(max_size=8)) + draw(lone_surrogates) + draw(st.text(max_size=8))


@st.composite
def unencodable_or_long(draw: st.DrawFn) -> Fuzzed:
    """Lone surrogates (escaped in the JSON) and very long strings in id,
    idempotency_key, type, tenant and params: no event may carry or echo them."""
    kind, command = draw(valid_commands())
    field_name = draw(st.sampled_from(["id", "idempotency_key", "type", "tenant", "param",
                                       "param key"]))
    how = draw(st.sampled_from(["surrogate", "long", "long non-ASCII"]))
    value: str
    if how == "surrogate":
        value = draw(surrogate_strings())
    else:
        alphabet = st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                                 exclude_categories=("Cs",)) if how == "long non-ASCII" \
            else st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        value = draw(alphabet) * draw(st.integers(201, 12000))
    command.pop("id")  # no usable id: the event goes by the message id
    command.pop("idempotency_key", None)
    params = command.setdefault("params", {})
    if field_name in ("id", "idempotency_key", "tenant", "type"):
        command[field_name] = value
    elif field_name == "param key":
        params[value] = 1
    else:
        target = {"eset-triggers": "task_uuid", "spaaza-triggers": "desc",
                  "batch-delete": "object_uuids", "cancel-task": "task_id",
                  "fetch-patching": "x"}[kind]
        params.pop(_param_key(params, target), None)
        params[target] = [value] if target == "object_uuids" else value
    if kind == "spaaza-triggers" and field_name == "param" and how != "surrogate":
        # A long desc is a valid desc; put it where no string is allowed.
        params["trigger"] = {"once": value}
    return Fuzzed(f"{how} string in {field_name} of {kind}", REJECTED,
                  text=to_json(command, ascii_only=draw(st.booleans())),
                  routing_key=TYPE_OF[kind])


any_body = st.one_of(
    arbitrary_bodies, wrong_shapes(), deep_and_odd_numbers(), foreign_encodings(),
    unencodable_or_long(), integer_impostors(), mutated_messages(), valid_messages(),
)


# --- strategies: headers and properties ---------------------------------------------------

COUNT_HEADERS = (
    "x-delivery-count", "x-relay-retries", "x-relay-attempts", "x-relay-earlier-deliveries",
)
big_digit_strings = st.integers(19, 5000).map(lambda n: "9" * n)


def header_values(amqp: bool) -> st.SearchStrategy[Any]:
    """Counts as publishers mangle them, in the types the broker can carry: AMQP takes
    bytes but no NaN or infinity (RabbitMQ 3.10 closes the publisher's connection on
    one); the embedded broker's JSON takes NaN but no bytes."""
    values = [
        st.sampled_from(["²", "-1", "+1", " 3", "1.5", "NaN", "", "٣", "0x10", "1e3"]),
        big_digit_strings,
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=not amqp, allow_infinity=not amqp),
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 10) | st.text(max_size=4), max_size=3),
        st.text(max_size=30),
    ]
    if amqp:
        values.append(st.binary(max_size=16))
    return st.one_of(values)


TRACE_GARBAGE = (
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-" + "9" * 4000,
    ",".join(f"k{i}=v" for i in range(500)),
)
compression_values = st.sampled_from(
    ["application/x-gzip", "application/x-bz2", "application/x-lzma", "zstd", "", "gzip"]
)


@st.composite
def hostile_headers(draw: st.DrawFn, amqp: bool) -> Fuzzed:
    """A command (usually valid) whose delivery headers are garbage."""
    values = header_values(amqp)
    headers: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(COUNT_HEADERS), min_size=1, unique=True)):
        headers[name] = draw(values)
    for name in ("traceparent", "tracestate", "baggage"):
        if draw(st.booleans()):
            headers[name] = draw(st.text(max_size=80) | st.sampled_from(TRACE_GARBAGE) | values)
    if draw(st.integers(0, 5)) == 0:
        headers["compression"] = draw(compression_values)
    message = draw(valid_messages() if draw(st.integers(0, 3)) else mutated_messages())
    expect = message.expect
    if "compression" in headers:
        expect = TERMINAL  # kombu would unpack it; what the worker does then is its choice
    return replace(message, label=f"{message.label}, hostile headers", headers=headers,
                   expect=expect)


content_types = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "application/x-python-serialize", "text/plain",
                     "application/octet-stream", "application/x-yaml", "", "json"]),
    st.text(max_size=40),
)
content_encodings = st.one_of(
    st.none(), st.sampled_from(["utf-8", "gzip", "utf-16", "binary", "base64", "", "latin-1"]),
    st.text(max_size=20),
)
REPLY_TARGETS = (REPLY, COMMANDS, DEAD, VICTIM, EVENTS, "amq.default",
                 "relay.replies.nobody-listens", "amq.gen-nobody-listens")


def id_texts(long_ids: bool) -> st.SearchStrategy[str]:
    short = st.text(max_size=40)
    if not long_ids:
        return short  # AMQP short strings: at most 255 bytes, the fresh suffix included
    return short | st.builds(lambda c, n: c * n, st.characters(exclude_categories=("Cs",)),
                             st.integers(100, 3000))


@st.composite
def hostile_properties(draw: st.DrawFn, amqp: bool) -> Fuzzed:
    """Any content type and encoding, odd message and correlation ids, and a reply_to
    naming a queue that is not the publisher's reply queue. ``amqp``: ids within AMQP's
    255 bytes; else (the embedded broker) ids of thousands of characters, and a hostile
    reply_to only for a message to be rejected: there the event can not be seen then
    (see :meth:`Observer._on_reply`), only its dead letter, which marks it settled."""
    if draw(st.integers(0, 4)) == 0:
        # A pickle claiming to be one: never unpickled, so never a command.
        body = pickle.dumps({"type": "cancel-task", "params": {"task_id": 5}},
                            protocol=draw(st.integers(0, 5)))
        message = Fuzzed("pickle", REJECTED, raw=body,
                         content_type="application/x-python-serialize",
                         content_encoding="binary")
    else:
        message = draw(valid_messages() | mutated_messages() | arbitrary_bodies)
        # The envelope may be refused before the body is read: any rejection code then.
        expect = TERMINAL if message.expect is ACCEPTED else REJECTED
        message = replace(message, expect=expect, content_type=draw(content_types),
                          content_encoding=draw(content_encodings))
    return replace(
        message,
        label=f"{message.label}, hostile properties",
        message_id=draw(id_texts(long_ids=not amqp)),
        correlation_id=draw(st.none() | id_texts(long_ids=not amqp)),
        reply_to=draw(st.sampled_from(REPLY_TARGETS)) if amqp or message.expect is REJECTED
        else REPLY,
    )


# --- observing the worker from outside ----------------------------------------------------


@dataclass
class DeadLetter:
    digest: str
    message_id: str | None
    error_code: Any
    head: bytes  # the first bytes, to show

    def differs_from(self, sent: Sent) -> str | None:
        """Why this is not ``sent``'s body as it was sent, if it is not."""
        if self.digest == sent.digest:
            return None
        return f"the dead letter is not the original body: {self.head!r} for {sent.head!r}"


class Observer:
    """Its own connection: taps the events exchange (every event), a reply queue, a queue
    nobody may write to, and the dead-letter queue; publishes messages exactly as drawn."""

    def __init__(self, settings: Settings) -> None:
        self.amqp = is_amqp(settings.broker_url)
        self.topology = Topology.from_settings(settings)
        suffix = uuid.uuid4().hex[:10]
        self.connection = connect(settings.broker_url, poll_interval_s=0.005)
        self.connection.connect()
        self.publishing = self.connection.channel()
        channel = self.consuming = self.connection.channel()
        _keep_compressed(channel)
        channel.auto_decode = False  # py-amqp would decode bodies by their content_encoding
        self.topology.declare(channel)
        private = {"durable": False, "exclusive": self.amqp, "auto_delete": False}
        self.reply_queue = Queue(f"relay.replies.fuzz-{suffix}", **private)
        self.victim_queue = Queue(f"fuzz.victim.{suffix}", **private)
        tap = Queue(f"fuzz.tap.{suffix}", exchange=self.topology.events, routing_key="#",
                    **private)
        self.events: dict[str, list[ResultEvent]] = defaultdict(list)
        self.replies: dict[str | None, list[ResultEvent]] = defaultdict(list)
        self.dead: dict[str, list[DeadLetter]] = defaultdict(list)
        self.strays: list[str] = []  # what arrived where nothing may arrive
        self.received = 0
        watched = [(self.reply_queue, self._on_reply),
                   (self.topology.dead_letter_queue, self._on_dead),
                   (self.victim_queue, self._on_victim)]
        if self.amqp:  # see _on_reply: on the embedded broker the tap would stay empty
            watched.append((tap, self._on_event))
        for queue, handle in watched:
            Consumer(channel, [queue], on_message=handle).consume()

    def publish(
        self, body: bytes, fuzzed: Fuzzed, properties: dict[str, Any], headers: dict[str, Any]
    ) -> None:
        message = self.publishing.prepare_message(
            body, None, fuzzed.content_type, fuzzed.content_encoding, headers,
            {"delivery_mode": 2, **properties},
        )
        self.publishing.basic_publish(
            message, exchange=self.topology.commands.name, routing_key=fuzzed.routing_key
        )

    def drain(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            self.connection.drain_events(timeout=timeout_s)

    def wait(self, done: Callable[[], bool], timeout_s: float, alive: Callable[[], bool]) -> bool:
        """Until ``done()``, ``timeout_s`` passed, or the worker died (then one last look)."""
        give_up_at = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > give_up_at:
                return False
            if not alive():
                self.drain(0.05)
                return done()
            self.drain(0.05)
        return True

    def wait_idle(self, quiet_s: float, longest_s: float) -> None:
        """Until nothing has arrived for ``quiet_s`` (a bounded look for late arrivals)."""
        give_up_at = time.monotonic() + longest_s
        seen, quiet_since = self.received, time.monotonic()
        while time.monotonic() < give_up_at and time.monotonic() - quiet_since < quiet_s:
            self.drain(0.05)
            if self.received != seen:
                seen, quiet_since = self.received, time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()

    def _taken(self, message: Message, what: str) -> ResultEvent | None:
        """The result event in ``message`` (acked); a stray when it is none."""
        message.ack()
        self.received += 1
        try:
            return ResultEvent.model_validate_json(message.body)
        except ValueError as error:
            self.strays.append(f"{what} that is not a result event: {_short(message.body)}"
                               f" ({_short(str(error), 300)})")
            return None

    def _on_event(self, message: Message) -> None:
        event = self._taken(message, "an event")
        if event is not None:
            self.events[event.data.command_id].append(event)

    def _on_reply(self, message: Message) -> None:
        event = self._taken(message, "a reply")
        if event is None:
            return
        self.replies[message.properties.get("correlation_id")].append(event)
        if not self.amqp:
            # The embedded broker keeps exchange bindings per connection: the worker's
            # events exchange routes to no queue another connection binds, so the reply
            # queue is the one place its events can be seen.
            self.events[event.data.command_id].append(event)

    def _on_dead(self, message: Message) -> None:
        message.ack()
        self.received += 1
        headers = message.headers or {}
        tag = headers.get(TAG)
        if not isinstance(tag, str):
            self.strays.append(
                f"the dead-letter queue got a message nobody published: content_type="
                f"{message.content_type!r}, correlation_id="
                f"{message.properties.get('correlation_id')!r}, body={_short(message.body)}"
            )
            return
        body = _raw_body(message)
        self.dead[tag].append(DeadLetter(
            hashlib.sha256(body).hexdigest(),
            message.properties.get("message_id"),
            headers.get("x-relay-error-code"),
            body[:60],
        ))

    def _on_victim(self, message: Message) -> None:
        message.ack()
        self.received += 1
        self.strays.append(
            f"queue {self.victim_queue.name} (named only by a hostile reply_to) got: "
            f"correlation_id={message.properties.get('correlation_id')!r}, "
            f"body={_short(message.body)}"
        )


def _raw_body(message: Message) -> bytes:
    """The body's bytes: py-amqp hands over text, decoded with the message's
    content_encoding, when it can."""
    body = message.body
    if isinstance(body, bytes):
        return body
    if not body:  # kombu's embedded transport hands an empty body over as "" whatever
        return b""  # its encoding: encoding "" in UTF-16 would invent a byte-order mark
    with contextlib.suppress(LookupError, UnicodeError):
        return str(body).encode(message.content_encoding or "utf-8")
    return str(body).encode("utf-8", "surrogatepass")


def _keep_compressed(channel: Any) -> None:
    """Let this channel see bodies as they travel: kombu would unpack a body whose
    ``compression`` header it knows (a 200 MB bomb included) in the observer too."""
    base = channel.Message

    class Kept(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raw = args[0] if args else kwargs.get("payload", kwargs.get("msg"))
            headers = (raw.get("headers") if isinstance(raw, dict)
                       else raw.properties.get("application_headers"))
            kept = headers.pop("compression", None) if isinstance(headers, dict) else None
            super().__init__(*args, **kwargs)
            if kept is not None:
                self.headers["compression"] = kept

    channel.Message = Kept


# --- the rig: one worker, restarted when a message kills it -------------------------------


@dataclass
class Sent:
    fuzzed: Fuzzed
    digest: str  # of the body (not the body: the memory test sends 6 MB ones)
    head: bytes  # its first bytes, to show
    tag: str
    message_id: str
    correlation_id: str | None
    reply_to: str
    # What the event's data.command_id must be: the body's usable id, else the message
    # id; None when neither is usable (the worker makes one up).
    command_id: str | None
    # Also allowed, for a body whose envelope says it is not UTF-8 JSON (a worker need
    # not read the id out of what it refuses to parse): the message id, or, when that is
    # not usable, one made up.
    or_else: str | None = None
    made_up: bool = False

    def __repr__(self) -> str:
        return f"{self.fuzzed!r} as message_id={_short(self.message_id, 60)}"


class WorkerStopped(AssertionError):
    pass


class _ErrorLog(logging.Handler):
    """The worker's ERROR records (a consumer that failed, a handler that raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            lines = traceback.format_exception(*record.exc_info)
            text += "\n" + "".join(lines[-6:])
        self.records.append(f"{record.name}: {text}")


class FuzzRig:
    """One worker at a time (tests/harness.py), watched by an :class:`Observer`."""

    def __init__(
        self,
        sandbox: SandboxServer,
        settings_for: Callable[[int], dict[str, Any]],
        event_timeout_s: float = 8.0,
    ) -> None:
        """``settings_for(n)``: the settings of the n-th worker (n counts restarts)."""
        self.sandbox = sandbox
        self.settings_for = settings_for
        self.event_timeout_s = event_timeout_s
        self.crashes: dict[threading.Thread, str] = {}
        self.restarts = 0
        self.errors = _ErrorLog()
        logging.getLogger("worker").addHandler(self.errors)
        self._previous_hook = threading.excepthook
        threading.excepthook = self._excepthook
        self._stack = ExitStack()
        self._start()

    # the worker

    def _start(self) -> None:
        self._stack = ExitStack()
        before = set(threading.enumerate())
        self.relay: RunningRelay = self._stack.enter_context(
            running_relay(self.sandbox, **self.settings_for(self.restarts))
        )
        started = [t for t in threading.enumerate() if t not in before and t.name == "relay"]
        assert len(started) == 1, "the worker's thread was not found"
        self.thread = started[0]
        self.observer = Observer(self.relay.settings)
        self._stack.callback(self.observer.close)
        self._stack.callback(self._delete_queues, self.relay.settings)
        self.sent: dict[str, Sent] = {}  # by tag
        self.claimed: dict[str, Sent] = {}  # by the command id its event has
        self.errors_seen = len(self.errors.records)

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.exc_type is not None:
            lines = traceback.format_exception(args.exc_type, args.exc_value,
                                               args.exc_traceback)
            self.crashes[args.thread] = "".join(lines)
        self._previous_hook(args)

    def trouble(self) -> str | None:
        """Why the worker is not fine: stopped, disconnected, or it logged an error."""
        if not self.thread.is_alive():
            crash = self.crashes.get(self.thread, "no exception reached the thread")
            return "its thread ended:\n…" + "".join(crash.strip().splitlines(True)[-8:])
        if not self.relay.service.consumer.connected.is_set():
            return "its consumer is not connected" + self._new_errors()
        if len(self.errors.records) > self.errors_seen:
            return "it logged an error" + self._new_errors()
        return None

    def _new_errors(self) -> str:
        new = self.errors.records[self.errors_seen:]
        return ("; its last error log: " + _short(new[-1], 1500)) if new else ""

    def ensure_running(self) -> None:
        """A fresh worker on fresh queues when the last one is in trouble: a poison
        message stays in the old queue instead of failing the next examples too."""
        if self.trouble() is None and self.observer.connection.connected:
            return
        self.restarts += 1
        with contextlib.suppress(AssertionError):
            self._stack.close()  # the harness asserts the thread stopped: it has
        self._start()

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            threading.excepthook = self._previous_hook
            logging.getLogger("worker").removeHandler(self.errors)

    def _delete_queues(self, settings: Settings) -> None:
        """Quorum queues are Raft clusters on RabbitMQ: leave none behind."""
        if not is_amqp(settings.broker_url):
            return
        topology = Topology.from_settings(settings)
        with connect(settings.broker_url) as connection:
            channel = connection.channel()
            for queue in topology.queues:
                with contextlib.suppress(*connection.channel_errors):
                    queue.bind(channel).delete()
            for exchange in (topology.commands, topology.events):
                with contextlib.suppress(*connection.channel_errors):
                    exchange.bind(channel).delete()

    # sending

    def resolve(self, reply_to: str) -> str:
        observer, topology = self.observer, self.observer.topology
        names = {REPLY: observer.reply_queue.name, COMMANDS: topology.command_queue.name,
                 DEAD: topology.dead_letter_queue.name, VICTIM: observer.victim_queue.name,
                 EVENTS: topology.events.name}
        return str(names.get(reply_to, reply_to))

    def publish(self, fuzzed: Fuzzed) -> Sent:
        fresh = uuid.uuid4().hex
        body = fuzzed.body(fresh)
        message_id = fresh if fuzzed.message_id is None else f"{fuzzed.message_id}-{fresh}"
        correlation_id = (None if fuzzed.correlation_id is None
                          else f"{fuzzed.correlation_id}-{fresh[:8]}")
        reply_to = self.resolve(fuzzed.reply_to)
        tag = f"fuzz-{fresh}"
        properties: dict[str, Any] = {"message_id": message_id, "reply_to": reply_to}
        if correlation_id is not None:
            properties["correlation_id"] = correlation_id
        own_id = message_id if usable_id(message_id) else None
        command_id = body_id(body) or own_id
        plain = (fuzzed.content_type == "application/json"
                 and fuzzed.content_encoding in ("utf-8", None)
                 and "compression" not in fuzzed.headers)
        or_else = None if plain or own_id == command_id else own_id
        sent = Sent(fuzzed, hashlib.sha256(body).hexdigest(), body[:60], tag, message_id,
                    correlation_id, reply_to, command_id, or_else,
                    made_up=not plain and own_id is None)
        self.sent[tag] = sent
        for known in (command_id, or_else):
            if known is not None:
                assert known not in self.claimed, "fuzz ids must be unique"
                self.claimed[known] = sent
        self.observer.publish(body, fuzzed, properties, {**fuzzed.headers, TAG: tag})
        return sent

    def timeout_for(self, fuzzed: Fuzzed) -> float:
        """How long its event may take: a rejection needs no vendor (and a quick failure
        keeps hypothesis's shrinking quick)."""
        return self.event_timeout_s / 2 if fuzzed.expect.outcomes == {"rejected"} else (
            self.event_timeout_s)

    def vendor_calls(self) -> dict[str, int]:
        return dict(self.sandbox.state.stats()["calls"])

    def _event_of(self, sent: Sent) -> str | None:
        """The command id of ``sent``'s event, once one has arrived."""
        for known in (sent.command_id, sent.or_else):
            if known is not None and known in self.observer.events:
                return known
        if sent.command_id is not None and not sent.made_up:
            return None
        # An id the worker made up: the one event that belongs to no other message.
        for command_id in self.observer.events:
            if command_id not in self.claimed:
                self.claimed[command_id] = sent
                return command_id
        return None

    # checking

    def check(self, fuzzed: Fuzzed) -> ResultEvent | None:
        """Publish ``fuzzed`` and assert every invariant a user can observe for it; its
        event, when it can be seen."""
        self.ensure_running()
        calls_before = self.vendor_calls()
        strays_before = len(self.observer.strays)  # what earlier examples caused is theirs
        sent = self.publish(fuzzed)
        observer = self.observer
        if not observer.amqp and sent.reply_to != observer.reply_queue.name:
            self._check_unseen(sent, calls_before, strays_before)
            return None
        found: list[str] = []

        def arrived() -> bool:
            command_id = self._event_of(sent)
            if command_id is not None:
                found.append(command_id)
            return bool(found)

        observer.wait(arrived, self.timeout_for(fuzzed), lambda: self.trouble() is None)
        self.assert_fine(sent)
        calls = _delta(calls_before, self.vendor_calls())
        assert found, (
            f"no event for command_id {_short(sent.command_id, 80)} within "
            f"{self.timeout_for(fuzzed)}s; vendor calls meanwhile {calls}; events for other ids: "
            f"{[_short(k, 60) for k in observer.events if k not in self.claimed]}"
        )
        events = observer.events[found[0]]
        assert len(events) == 1, f"{len(events)} events for one message: {events}"
        (event,) = events
        data, error = event.data, event.data.error
        _tally(f"{data.outcome}: {error.code if error else '-'}")
        summary = (f"outcome {data.outcome}, error {error.code if error else None}: "
                   f"{_short(error.message if error else '', 300)}; vendor calls {calls}")
        assert data.outcome in fuzzed.expect.outcomes, f"wrong outcome: {summary}"
        assert event.subject == data.command_id, f"subject {_short(event.subject)} != id"
        if data.outcome != "succeeded":
            assert error is not None, f"no error for {summary}"
            assert error.code != "internal_error", f"the worker failed: {summary}"
            assert len(error.message) < MAX_ERROR_MESSAGE, (
                f"error message of {len(error.message)} chars (input echoed?): {summary}"
            )
        if data.outcome == "rejected":
            assert error is not None and error.code in fuzzed.expect.codes, (
                f"wrong code, expected one of {sorted(fuzzed.expect.codes)}: {summary}"
            )
            assert not calls, f"a rejected command reached a vendor: {summary}"
        if sent.reply_to.startswith(REPLY_PREFIXES):
            self._check_reply(sent, event)
        if data.outcome != "succeeded":
            self._check_dead_letter(sent, event)
        if not sent.reply_to.startswith(REPLY_PREFIXES):
            self.barrier()  # whatever the hostile reply_to caused has arrived by now
        strays = observer.strays[strays_before:]
        assert not strays, f"sent {sent}: {strays}"
        self.assert_fine(sent)
        return event

    def _check_unseen(
        self, sent: Sent, calls_before: dict[str, int], strays_before: int
    ) -> None:
        """Embedded broker, reply_to elsewhere: the event can not be seen (see
        :meth:`Observer._on_reply`); what can be seen is checked."""
        observer = self.observer
        if sent.fuzzed.expect.outcomes == {"rejected"}:
            observer.wait(lambda: sent.tag in observer.dead, self.event_timeout_s,
                          lambda: self.trouble() is None)
            self.assert_fine(sent)
            kept = observer.dead.get(sent.tag, [])
            assert len(kept) == 1, f"{len(kept)} copies of a rejected message in the DLQ"
            assert kept[0].differs_from(sent) is None, kept[0].differs_from(sent)
            assert kept[0].error_code in sent.fuzzed.expect.codes, (
                f"wrong code {kept[0].error_code}, expected one of "
                f"{sorted(sent.fuzzed.expect.codes)}"
            )
            calls = _delta(calls_before, self.vendor_calls())
            assert not calls, f"a rejected command reached a vendor: {calls}"
        self.barrier()
        strays = observer.strays[strays_before:]
        assert not strays, f"sent {sent}: {strays}"
        self.assert_fine(sent)

    def _check_reply(self, sent: Sent, event: ResultEvent) -> None:
        observer = self.observer
        correlation = sent.correlation_id or sent.message_id
        if sent.reply_to != observer.reply_queue.name:
            return  # a reply queue of someone else's: nothing to look at
        observer.wait(lambda: correlation in observer.replies, 5.0,
                      lambda: self.trouble() is None)
        replies = observer.replies.get(correlation, [])
        assert [r.id for r in replies] == [event.id], (
            f"the reply queue got {len(replies)} events with correlation_id "
            f"{_short(correlation, 60)} (expected the one event {event.id}); replies by "
            f"correlation id: {[_short(k, 40) for k in observer.replies]}"
        )

    def _check_dead_letter(self, sent: Sent, event: ResultEvent) -> None:
        observer = self.observer
        observer.wait(lambda: sent.tag in observer.dead, 5.0, lambda: self.trouble() is None)
        kept = observer.dead.get(sent.tag, [])
        assert len(kept) == 1, (
            f"{len(kept)} copies in the dead-letter queue for a {event.data.outcome} message"
        )
        assert kept[0].differs_from(sent) is None, kept[0].differs_from(sent)
        assert kept[0].message_id == sent.message_id, "the dead letter lost its message_id"
        assert kept[0].error_code == str(event.data.error.code if event.data.error else None)

    def assert_fine(self, sent: Sent | None = None) -> None:
        """Invariant 1: the worker runs, connected, and has logged no error."""
        trouble = self.trouble()
        if trouble is not None:
            after = f" after {sent!r}" if sent is not None else ""
            raise WorkerStopped(f"the worker is not fine{after}: {trouble}")

    def barrier(self) -> None:
        """Send a message rejected at once and wait for its event: messages taken before
        it have been settled (one consumer, in order)."""
        sent = self.publish(raw_message(b"fuzz barrier", "barrier"))
        arrived = self.observer.wait(lambda: sent.command_id in self.observer.events,
                                     self.event_timeout_s, lambda: self.trouble() is None)
        self.assert_fine()
        assert arrived, "the barrier message got no event"

    def begin(self) -> None:
        """Before a test: a worker that is fine, and a ledger of its own (whatever an
        earlier test left behind is taken off the queues and forgotten)."""
        self.ensure_running()
        self.barrier()
        self.observer.wait_idle(quiet_s=0.2, longest_s=3.0)
        observer = self.observer
        for ledger in (observer.events, observer.replies, observer.dead, self.sent,
                       self.claimed):
            ledger.clear()
        observer.strays.clear()

    def fuzz(
        self, fuzzed: st.SearchStrategy[Fuzzed], max_examples: int, *examples: Fuzzed
    ) -> None:
        """Check ``max_examples`` drawn messages and the given ``examples``, then that
        nothing more came of them."""

        @fuzz_settings(max_examples)
        @given(fuzzed)
        def prop(message: Fuzzed) -> None:
            self.check(message)

        for chosen in examples:
            prop = example(chosen)(prop)
        prop()
        self.assert_quiet()

    def assert_quiet(self) -> None:
        """After a run: nothing more came, no message got a second event or dead letter,
        nothing went where it must not."""
        self.ensure_running()
        self.barrier()
        self.observer.wait_idle(quiet_s=0.5, longest_s=5.0)
        observer = self.observer
        problems = list(observer.strays)
        for command_id, events in observer.events.items():
            if command_id not in self.claimed:
                problems.append(f"an event for no message sent: {_short(command_id)}: "
                                f"{events[0].data.error}")
            elif len(events) > 1:
                problems.append(f"{len(events)} events for {self.claimed[command_id]}")
        problems += [f"{len(kept)} dead letters for {self.sent.get(tag)}"
                     for tag, kept in observer.dead.items() if len(kept) > 1]
        assert not problems, "\n".join(problems)
        self.assert_fine()


def _tally(what: str) -> None:
    """Count ``what`` in hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    with contextlib.suppress(InvalidArgument):  # not inside a @given run
        hypothesis.event(what)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # nothing written into the repository; failures print a blob
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- memory -------------------------------------------------------------------------------


def memory_kb() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since the last reset) of this process, in kB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def settle_memory() -> None:
    """Collect garbage, and hand freed heap back to the system (glibc keeps freed blocks
    of each thread's arena as RSS), so RSS tells what is still held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def gzip_bomb(size: int) -> bytes:
    """``size`` bytes of spaces, zlib-compressed (kombu's ``application/x-gzip``), made
    without holding them."""
    packer = zlib.compressobj(9)
    chunk = b" " * 2**20
    parts = [packer.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join([*parts, packer.flush()])


def big_messages(megabytes: int = 6) -> Iterator[Fuzzed]:
    """A few multi-MB bodies (and one that unpacks to 200 MB), all to be rejected."""
    size = megabytes * 2**20
    yield Fuzzed("multi-MB id", REJECTED, text=to_json(
        {"type": "cancel-task", "id": "i" * size, "params": {"task_id": 1}}))
    yield Fuzzed("multi-MB array", REJECTED, text="[" + "0," * (size // 2) + "0]")
    yield Fuzzed("many bogus object uuids", rejected("invalid_command"), text=to_json(
        {"type": "batch-delete", "params": {"object_uuids": ["x"] * (size // 4)}}))
    yield Fuzzed("multi-MB garbage", REJECTED, raw=bytes(range(256)) * (size // 256))
    yield Fuzzed("5000 nested arrays", REJECTED, text=nested(5000, "arrays"))
    yield Fuzzed("many problems", rejected("invalid_command"), text=to_json(
        {"type": "batch-delete", "params": {f"k{i}": i for i in range(size // 16)}}))
    yield Fuzzed("200 MB behind a compression header", TERMINAL, raw=gzip_bomb(200 * 2**20),
                 headers={"compression": "application/x-gzip"})



def check_memory(rig: FuzzRig, messages: Iterable[Fuzzed], limit_mb: float = 150.0) -> None:
    """Invariant 6: over a batch of big messages the process (worker and test share it)
    keeps less than ``limit_mb`` more, and no message makes it take ``limit_mb`` more at
    its peak; then each message's own invariants."""
    rig.check(raw_message(b"warm-up", "warm-up"))
    settle_memory()
    start = memory_kb()["VmRSS"]
    peaks: dict[str, float] = {}
    failures = []
    for fuzzed in messages:
        settle_memory()
        base = memory_kb()["VmRSS"]
        peak_known = reset_peak()
        try:
            rig.check(fuzzed)
        except AssertionError as error:
            failures.append(f"{fuzzed!r}: {_short(str(error), 1500)}")
        if peak_known:
            peaks[fuzzed.label] = (memory_kb()["VmHWM"] - base) / 1024
    settle_memory()
    kept_mb = (memory_kb()["VmRSS"] - start) / 1024
    shown = ", ".join(f"{label}: {mb:.0f} MB" for label, mb in peaks.items())
    assert kept_mb < limit_mb, f"RSS grew by {kept_mb:.0f} MB over the batch (peaks: {shown})"
    assert all(mb < limit_mb for mb in peaks.values()), f"RSS peaks above the start: {shown}"
    assert not failures, "\n".join(failures)


@contextlib.contextmanager
def scratch_dir(fallback: Path) -> Iterator[Path]:
    """Where the embedded broker's SQLite files go: in memory (/dev/shm) when the system
    has it, since every message costs the SQLite transport several commits and each is
    an fsync on disk; else ``fallback``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    path = Path(tempfile.mkdtemp(prefix="relay-fuzz-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
