"""Poison messages: what a careless or hostile publisher can put on the command queue,
and the verdict on how the worker answered them.

Each poison message carries a text ``message_id``/``correlation_id`` of its own (its tag)
and, where it can be, ``reply_to`` the scenario's reply queue, so its event is found by
``correlation_id`` whatever its body says (or fails to say). The few whose point is a
broken ``correlation_id`` or ``reply_to`` are found by the command id in their body, on the
events exchange.

What is expected of each: a body that is not a valid command is ``rejected``. A valid
command with junk beside it (headers, a non-UTF-8 id property, a ``reply_to`` naming the
command queue) may be run, the junk ignored, or rejected: either is a fair answer, but
``failed``, no event, several events, or a dead replica are not.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.rig.events import SeenEvent

from .broker import Publishable, RawMessage

REJECTED = frozenset({"rejected"})
RUN_OR_REJECTED = frozenset({"succeeded", "rejected"})
JUNK_HEADERS = ("x-delivery-count", "x-relay-retries", "x-relay-attempts")
# "²" passes str.isdigit() but not int(); 4301 digits are one more than int() reads
# (sys.int_info.default_max_str_digits), 4300 are a number no counter ever reaches.
JUNK_HEADER_VALUES = {
    "superscript-two": "\u00b2",
    "4300-digits": "9" * 4300,
    "4301-digits": "9" * 4301,
}


@dataclass(frozen=True)
class Poison:
    kind: str
    tag: str  # a text message_id or correlation_id it keeps (also in the dead letters)
    message: RawMessage
    expect: frozenset[str]  # acceptable outcomes of its (one) event
    correlation_id: str | None  # its event is on the reply queue with this, else:
    command_id: str | None  # its event is on the events exchange with this command id
    object_uuid: str | None = None  # what it deletes if it is run
    amqp_only: bool = False  # what it carries (or how it is observed) needs AMQP


@dataclass(frozen=True)
class DeadLetter:
    message_id: object
    correlation_id: object
    body: bytes


def poison_messages(
    *,
    reply_to: str,
    command_queue: str,
    deadline: str,
    copies: int = 3,
    header_copies: int = 2,
) -> list[Poison]:
    """``copies`` of each malformed body and hostile property, ``header_copies`` of each
    junk header on a valid command: ~60 messages."""
    run = uuid.uuid4().hex[:8]
    built: list[Poison] = []
    for kind, make in _KINDS.items():
        count = header_copies if kind.startswith("header-") else copies
        for index in range(count):
            built.append(make(_Context(run, kind, index, reply_to, command_queue, deadline)))
    return built


def interleave(
    commands: list[dict[str, Any]], poisons: list[Poison], seed: int | None = None
) -> list[Publishable]:
    """The commands in their order, with the poison messages spread among them at
    random places."""
    rng = random.Random(seed)
    total = len(commands) + len(poisons)
    at = set(rng.sample(range(total), len(poisons)))
    ordinary, poison = iter(commands), iter(p.message for p in poisons)
    return [next(poison) if index in at else next(ordinary) for index in range(total)]


# --- the kinds ---


@dataclass(frozen=True)
class _Context:
    run: str
    kind: str
    index: int
    reply_to: str
    command_queue: str
    deadline: str

    @property
    def tag(self) -> str:
        return f"poison-{self.run}-{self.kind}-{self.index}"

    def command(self, **changes: Any) -> dict[str, Any]:
        """A valid batch delete of an object of its own, under a key of its own."""
        name = f"{self.run}-{self.kind}-{self.index}"
        command = {
            "type": "batch-delete",
            "id": f"poison-cmd-{name}",
            "idempotency_key": f"poison-key-{name}",
            "tenant": "default",
            "deadline": self.deadline,
            "params": {"object_uuids": [str(uuid.uuid4())]},
        }
        return {**command, **changes}

    def properties(self, **changes: Any) -> dict[str, Any]:
        return {
            "content_type": "application/json",
            "message_id": self.tag,
            "correlation_id": self.tag,
            "reply_to": self.reply_to,
            **changes,
        }

    def poison(
        self,
        body: bytes,
        expect: frozenset[str] = REJECTED,
        command: dict[str, Any] | None = None,
        *,
        by_command_id: bool = False,
        amqp_only: bool = False,
        **properties: Any,
    ) -> Poison:
        return Poison(
            kind=self.kind,
            tag=self.tag,
            message=RawMessage(body, self.properties(**properties), routing_key="poison"),
            expect=expect,
            correlation_id=None if by_command_id else self.tag,
            command_id=command["id"] if command else None,
            object_uuid=command["params"]["object_uuids"][0] if command else None,
            amqp_only=amqp_only,
        )


    def valid_with(self, **options: Any) -> Poison:
        """A valid command under hostile properties or headers (``options``): it runs, or
        is rejected for what they say."""
        command = self.command()
        return self.poison(_dumps(command), RUN_OR_REJECTED, command, **options)


def _dumps(value: Any, *, ascii_only: bool = True) -> bytes:
    # ensure_ascii escapes a lone surrogate as \ud800, which is valid JSON text.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


def _nested_open(c: _Context) -> Poison:
    return c.poison(b"[" * 2048)


def _nested_in_params(c: _Context) -> Poison:
    command = c.command()
    depth = 1024  # 2 KB of brackets, closed: valid JSON, far deeper than any command
    body = _dumps(command).replace(
        _dumps(command["params"]["object_uuids"]),
        b"[" * depth + _dumps(command["params"]["object_uuids"][0]) + b"]" * depth,
    )
    return c.poison(body)


def _surrogate(field_name: str) -> Callable[[_Context], Poison]:
    def make(c: _Context) -> Poison:
        return c.poison(_dumps(c.command(**{field_name: "\ud800"})))

    return make


def _junk_header(header: str, value: str) -> Callable[[_Context], Poison]:
    def make(c: _Context) -> Poison:
        return c.valid_with(headers={header: value})

    return make


def _empty(c: _Context) -> Poison:
    return c.poison(b"")


def _long_type(c: _Context) -> Poison:
    return c.poison(_dumps(c.command(type="\u00e9" * 300), ascii_only=False))


def _type_beyond_a_routing_key(c: _Context) -> Poison:
    # 100 characters (a short id to a naive length check), 300 bytes of UTF-8: more than
    # an AMQP routing key (255 bytes) can hold, were it copied into the event's.
    return c.poison(_dumps(c.command(type="\u20ac" * 100), ascii_only=False))


def _task_id_4001_digits(c: _Context) -> Poison:
    command = c.command(type="cancel-task", params={"task_id": 0})
    body = _dumps(command).replace(b'"task_id": 0', b'"task_id": ' + b"9" * 4001)
    return c.poison(body)


def _task_id_true(c: _Context) -> Poison:
    return c.poison(_dumps(c.command(type="cancel-task", params={"task_id": True})))


def _utf16(c: _Context) -> Poison:
    # A valid command, but the contract says UTF-8 (json.loads would guess UTF-16).
    return c.poison(json.dumps(c.command()).encode("utf-16"))


def _not_utf8(c: _Context) -> Poison:
    return c.poison(b'{"type": "batch-delete", "id": "\xff\xfe", "params": {}}')


def _reply_to_command_queue(c: _Context) -> Poison:
    return c.valid_with(
        by_command_id=True,
        amqp_only=True,  # on the embedded broker its event goes where the test can not see
        reply_to=c.command_queue,
        correlation_id=None,
    )


def _message_id_not_utf8(c: _Context) -> Poison:
    return c.valid_with(
        amqp_only=True,  # the embedded broker keeps properties as JSON text
        message_id=b"\xff\xfe" + c.tag.encode(),
    )


def _correlation_id_not_utf8(c: _Context) -> Poison:
    return c.valid_with(
        by_command_id=True,
        amqp_only=True,
        correlation_id=b"\xc3\x28" + c.tag.encode(),
    )


_KINDS: dict[str, Callable[[_Context], Poison]] = {
    "nested-2kb-open": _nested_open,
    "nested-2kb-in-params": _nested_in_params,
    **{f"surrogate-{name}": _surrogate(name) for name in ("id", "type", "tenant")},
    "surrogate-idempotency_key": _surrogate("idempotency_key"),
    **{
        f"header-{header}-{label}": _junk_header(header, value)
        for header in JUNK_HEADERS
        for label, value in JUNK_HEADER_VALUES.items()
    },
    "empty-body": _empty,
    "type-300-non-ascii": _long_type,
    "type-100-euro-signs": _type_beyond_a_routing_key,
    "cancel-task-id-4001-digits": _task_id_4001_digits,
    "cancel-task-id-true": _task_id_true,
    "utf-16-command": _utf16,
    "not-utf-8-body": _not_utf8,
    "reply-to-command-queue": _reply_to_command_queue,
    "message-id-not-utf-8": _message_id_not_utf8,
    "correlation-id-not-utf-8": _correlation_id_not_utf8,
}


# --- the verdict ---


@dataclass
class Verdict:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def judge(
    poisons: list[Poison],
    by_correlation: dict[str, list[SeenEvent]],
    by_command: dict[str, list[SeenEvent]],
    dead_letters: Iterable[DeadLetter],
    ordinary_ids: set[str],
) -> Verdict:
    """How the poison messages were answered, and what the dead-letter queue holds."""
    verdict = Verdict()
    unanswered: list[str] = []
    unexpected: dict[str, str] = {}
    repeated: list[str] = []
    outcomes: Counter[str] = Counter()
    kept_tags: set[str] = set()
    own_event_ids: set[str] = set()
    for poison in poisons:
        events = events_of(poison, by_correlation, by_command)
        if not events:
            unanswered.append(poison.kind)
            continue
        first = events[0]
        outcome = first.outcome + (f":{first.error_code}" if first.error_code else "")
        outcomes[outcome] += 1
        own_event_ids.update(seen.event_id for seen in events)
        if len(events) > 1:
            repeated.append(poison.kind)
        if first.outcome not in poison.expect:
            unexpected[poison.tag.split("-", 2)[2]] = outcome
        if first.outcome != "succeeded":
            kept_tags.add(poison.tag)

    # An event sent back to the command queue (reply_to) comes round as a message: it
    # is no command, and is answered as such, by the event's id.
    echoes = [seen for event_id in own_event_ids for seen in by_command.get(event_id, [])]
    letters = classify(dead_letters, poisons, ordinary_ids)
    missing = kept_tags - letters.poison_tags

    verdict.figures = {
        "poison_sent": len(poisons),
        "poison_answered": len(poisons) - len(unanswered),
        "poison_outcomes": dict(sorted(outcomes.items())),
        "echo_events": len(echoes),
        "dead_letters": dict(letters.counts),
    }
    if unanswered:
        verdict.problems.append(
            f"{len(unanswered)} poison messages without an event: {dict(Counter(unanswered))}"
        )
    if unexpected:
        verdict.problems.append(
            f"{len(unexpected)} poison messages answered unexpectedly: {unexpected}"
        )
    if repeated:
        verdict.problems.append(
            f"{len(repeated)} poison messages with more than one event: {dict(Counter(repeated))}"
        )
    if any(seen.outcome != "rejected" for seen in echoes):
        verdict.problems.append(f"events that came back as commands were run: {echoes}")
    if letters.counts["ordinary"]:
        verdict.problems.append(
            f"{letters.counts['ordinary']} ordinary commands in the dead-letter queue"
        )
    if letters.counts["other"]:
        verdict.problems.append(
            f"{letters.counts['other']} unknown messages in the dead-letter queue: "
            f"{letters.others[:3]}"
        )
    if missing:
        verdict.problems.append(
            f"{len(missing)} rejected poison messages not kept in the dead-letter queue"
        )
    return verdict


def events_of(
    poison: Poison,
    by_correlation: dict[str, list[SeenEvent]],
    by_command: dict[str, list[SeenEvent]],
) -> list[SeenEvent]:
    if poison.correlation_id is not None:
        return by_correlation.get(poison.correlation_id, [])
    assert poison.command_id is not None
    return by_command.get(poison.command_id, [])


@dataclass
class Letters:
    counts: Counter[str] = field(default_factory=Counter)  # poison, ordinary, echo, other
    poison_tags: set[str] = field(default_factory=set)
    others: list[str] = field(default_factory=list)


def classify(
    dead_letters: Iterable[DeadLetter], poisons: list[Poison], ordinary_ids: set[str]
) -> Letters:
    tags = {poison.tag for poison in poisons}
    bodies = {poison.message.body: poison.tag for poison in poisons}
    letters = Letters()
    for letter in dead_letters:
        tag = next(
            (
                t
                for t in (letter.message_id, letter.correlation_id)
                if isinstance(t, str) and t in tags
            ),
            bodies.get(letter.body),
        )
        if tag is not None:
            letters.counts["poison"] += 1
            letters.poison_tags.add(tag)
            continue
        data = _json_object(letter.body)
        ids = {value for value in (letter.message_id, data.get("id")) if isinstance(value, str)}
        if ids & ordinary_ids:
            letters.counts["ordinary"] += 1
        elif "specversion" in data:
            letters.counts["echo"] += 1
        else:
            letters.counts["other"] += 1
            letters.others.append(f"{letter.message_id!r}: {letter.body[:80]!r}")
    return letters


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
