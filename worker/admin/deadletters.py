"""The dead-letter queue (``relay.commands.dead``): list, show, replay and purge what the
worker kept there, on RabbitMQ and on the embedded broker alike.

A queue can not be read without taking its messages, and a message put back with a
requeue counts as a failed delivery on RabbitMQ 4.0 to 4.2, whose quorum queues drop a
message after 20 of them by default. So reading the queue goes through it once, in
order, and settles each message it takes in one of three ways (:class:`Verdict`): kept (a
copy, with its headers, goes to the back of the queue, then the original is acked),
replayed (a copy goes to the command queue as a new attempt, then the original is acked),
or dropped (acked). Every copy is confirmed by the broker before its original is acked,
so a message is never lost; a crash between the two leaves it twice in the queue, at
worst.

Operators may run commands at the same time, with workers dead-lettering meanwhile:

- A pass holds the queue's lock (:mod:`worker.admin.passlock`), so passes never
  interleave: each message of the queue is seen once per pass.
- A pass that changes the queue (replay, purge) acts only on letters dead-lettered before
  its command began; later ones (such as a letter another command replayed, that failed
  again) are kept as they are. Two replays started together replay each letter once.
- Replaying a letter releases the outcome the idempotency store keeps for it, the one it
  was dead-lettered with (its ``x-relay-event-id``), so the new attempt is tried afresh
  rather than answered with that outcome again. A letter whose key has another outcome
  by now (it was replayed already, by a pass that stopped before taking it off, or its
  key ran again) is refused: a second replay would do the work a second time. So is a
  second copy of a letter within one pass, and a ``result_lost`` command unless forced:
  the vendor may already have acted on it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from kombu import Connection, Producer
from kombu.message import Message

from schemas.commands import Command
from schemas.events import ErrorCode, ResultEvent
from worker.admin import UserError
from worker.admin.passlock import held, pass_lock
from worker.broker.connection import connect
from worker.broker.decoding import decode_message
from worker.broker.frames import unreadable
from worker.broker.origin import worker_user
from worker.broker.publisher import headers_of, republish
from worker.broker.topology import Topology
from worker.handler import REJECTION_KEY_PREFIX, rejection_digest  # how a rejection is keyed
from worker.idempotency import IdempotencyStore, StoredRecord, claim_key
from worker.results import Rejected, command_fields
from worker.settings import HEARTBEAT_S, Settings

ERROR_CODE_HEADER = "x-relay-error-code"
REASON_HEADER = "x-relay-reason"
ERROR_MESSAGE_HEADER = "x-relay-error-message"
DEAD_LETTERED_AT_HEADER = "x-relay-dead-lettered-at"
EVENT_ID_HEADER = "x-relay-event-id"
BROKER_TIME_RESOLUTION_S = 1.0  # x-death's time is an AMQP timestamp: whole seconds
CLOCK_SKEW_S = 300.0  # how far ahead of this host's clock a worker's may be
DEFAULT_LOCK_WAIT_S = 120.0
COMPRESSION_HEADER = "compression"
KEPT_COMPRESSION_HEADER = f"x-relay-{COMPRESSION_HEADER}"
# Headers of the time in the queues, not of the command: a replay starts without them.
BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-", "x-last-death-")
RELEASABLE_OUTCOMES = frozenset({"failed", "rejected"})
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The AMQP properties a message keeps (not the broker's or kombu's bookkeeping).
MESSAGE_PROPERTIES = ("content_type", "content_encoding", "message_id", "correlation_id",
                      "reply_to", "delivery_mode", "priority", "timestamp", "type", "app_id")


class Verdict(Enum):
    KEEP = "keep"
    REPLAY = "replay"
    DROP = "drop"


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue, as the worker would read it again."""

    position: int  # 1 for the message at the head of the queue
    command_id: str
    key: str | None  # the idempotency key, when the message is a valid command
    command_type: str | None
    tenant: str | None
    error_code: str | None
    reason: str  # the error's message, else why it was dead-lettered
    dead_lettered_at: datetime | None
    # how much later than dead_lettered_at it may have been (a broker's whole seconds)
    time_resolution_s: float
    event_id: str | None  # of the outcome it was dead-lettered with (not the broker's)
    message_id: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    decoded: Command | Rejected = field(repr=False)

    def age_s(self, now: datetime) -> float | None:
        if self.dead_lettered_at is None:
            return None
        return max((now - self.dead_lettered_at).total_seconds(), 0.0)

    def dead_lettered_since(self, moment: datetime, now: datetime) -> bool:
        """Whether it may have been dead-lettered at or after ``moment``. One with no time
        counts as old, and so does one whose time is past ``now`` by more than hosts'
        clocks differ: a publisher may have written it (a letter the broker dead-lettered
        keeps the command's headers), and such a letter must not be left alone forever."""
        when = self.dead_lettered_at
        if when is None or when > now + timedelta(seconds=CLOCK_SKEW_S):
            return False
        return when + timedelta(seconds=self.time_resolution_s) > moment

    def store_keys(self) -> list[str]:
        """The idempotency-store keys whose outcome it may have: its work's key, and that
        of its rejection."""
        if isinstance(self.decoded, Rejected):
            return [REJECTION_KEY_PREFIX + self.decoded.digest]
        return [claim_key(self.decoded), REJECTION_KEY_PREFIX + rejection_digest(self.decoded)]

    def outcome_key(self) -> str:
        """The key its own outcome is stored under: its rejection's when it was rejected,
        else its work's."""
        rejected = _text(self.headers.get(REASON_HEADER)) == "rejected"
        keys = self.store_keys()
        return keys[-1] if rejected else keys[0]


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on: all of the criteria given (none: every one)."""

    ids: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    older_than_s: float | None = None
    newer_than_s: float | None = None

    @property
    def everything(self) -> bool:
        return self == Selection()

    def matches(self, letter: DeadLetter, now: datetime) -> bool:
        age_s = letter.age_s(now)
        return (
            (not self.ids or letter.command_id in self.ids or letter.message_id in self.ids)
            and (not self.codes or (letter.error_code or "") in self.codes)
            and (not self.tenants or (letter.tenant or "").lower() in self.tenants)
            and (not self.types or (letter.command_type or "") in self.types)
            and (self.older_than_s is None or (age_s is not None and age_s >= self.older_than_s))
            and (self.newer_than_s is None or (age_s is not None and age_s < self.newer_than_s))
        )


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d``, ``1h30m`` (or plain seconds) in seconds."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise UserError(
            f"{text!r} is not a duration", "write it like 90s, 15m, 2h, 1d or 1h30m"
        )
    return sum(float(number) * UNITS_S[unit] for number, unit in parts)


@dataclass
class Report:
    """What a pass through the queue did."""

    seen: int = 0
    kept: int = 0
    later: int = 0  # of those kept: dead-lettered after the command began, left alone
    replayed: list[DeadLetter] = field(default_factory=list)
    dropped: list[DeadLetter] = field(default_factory=list)
    refused: list[tuple[DeadLetter, str]] = field(default_factory=list)  # and why


Progress = Callable[[int, int], None]  # (messages done, of how many)


class DeadLetterQueue:
    """The dead-letter queue of ``settings``. Each pass through it holds its lock,
    waiting up to ``lock_wait_s`` for another command's pass to end (``on_wait`` is
    called first, once), else :class:`~worker.admin.passlock.QueueBusy`."""

    def __init__(
        self,
        settings: Settings,
        lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
        on_wait: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._topology = Topology.from_settings(settings)
        self._lock_wait_s = lock_wait_s
        self._on_wait = on_wait
        self._connection: Connection | None = None
        self._own_user: str | None = None  # publishers are checked: copies carry theirs
        self._locked = False

    def __enter__(self) -> DeadLetterQueue:
        # Waits for the broker's confirm of each copy before the original is acked.
        # Heartbeats: RabbitMQ drops the queue's lock soon after this host goes away.
        self._connection = connect(
            self._settings.broker_url, heartbeat_s=HEARTBEAT_S, tls=self._settings.tls.broker
        )
        self._connection.connect()
        if self._settings.publisher_binding is not None:
            self._own_user = worker_user(self._connection)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connection is not None:
            self._connection.release()  # unsettled messages go back to the queue

    @property
    def name(self) -> str:
        return str(self._topology.dead_letter_queue.name)

    def count(self) -> int:
        """Messages in the queue now (declared as the worker declares it, if need be)."""
        channel = self._channel()
        try:
            declared = self._topology.dead_letter_queue.bind(channel).queue_declare()
            return int(declared.message_count)
        finally:
            channel.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the queue's lock inside: no other command goes through the queue
        meanwhile (a pass holds it already; holding it around several keeps it)."""
        if self._locked:
            yield
            return
        assert self._connection is not None, "use DeadLetterQueue in a with block"
        lock = pass_lock(self._connection, self._settings.broker_url, self.name)
        with held(lock, self.name, self._lock_wait_s, self._on_wait):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    def read(self, progress: Progress | None = None) -> list[DeadLetter]:
        """Every message now in the queue, which is left as it was."""
        letters: list[DeadLetter] = []

        def keep(letter: DeadLetter) -> Verdict:
            letters.append(letter)
            return Verdict.KEEP

        self.walk(keep, progress)
        return letters

    def walk(
        self,
        decide: Callable[[DeadLetter], Verdict],
        progress: Progress | None = None,
        since: datetime | None = None,
    ) -> Report:
        """Take each message now in the queue, in order, and settle it as ``decide``
        says; with ``since`` (when the command began), one that may have been
        dead-lettered since is kept without asking. Holds the queue's lock throughout."""
        with self.exclusive():
            return self._walk(decide, progress, since)

    def _walk(
        self,
        decide: Callable[[DeadLetter], Verdict],
        progress: Progress | None,
        since: datetime | None,
    ) -> Report:
        report = Report()
        total = self.count()  # later arrivals and the copies kept go behind these
        channel = self._channel()
        try:
            queue = self._topology.dead_letter_queue.bind(channel)
            producer = Producer(channel)
            for position in range(1, total + 1):
                message = queue.get(no_ack=False)
                if message is None:  # taken by someone else meanwhile
                    break
                letter = self._letter(position, message)
                later = since is not None and letter.dead_lettered_since(
                    since, datetime.now(UTC)
                )
                verdict = Verdict.KEEP if later else decide(letter)
                report.seen += 1
                report.later += later
                if verdict is Verdict.KEEP:
                    republish(producer, message, self.name, _kept_headers(message), self._own_user)
                    report.kept += 1
                elif verdict is Verdict.REPLAY:
                    queue_name = str(self._topology.command_queue.name)
                    headers = _replay_headers(message)
                    republish(producer, message, queue_name, headers, self._own_user)
                    report.replayed.append(letter)
                else:
                    report.dropped.append(letter)
                message.ack()
                if progress is not None:
                    progress(position, total)
        finally:
            channel.close()
        return report

    def _channel(self) -> Any:
        assert self._connection is not None, "use DeadLetterQueue in a with block"
        channel = self._connection.channel()
        if hasattr(channel, "auto_decode"):
            channel.auto_decode = False  # the body's bytes as they were sent
        _keep_bodies_as_sent(channel)
        return channel

    def _letter(self, position: int, message: Message) -> DeadLetter:
        headers = dict(message.headers or {})
        properties = {
            "content_type": message.content_type,  # kept apart by kombu
            "content_encoding": message.content_encoding,
            **(message.properties or {}),
        }
        message_id = properties.get("message_id")
        compressed = headers.get(KEPT_COMPRESSION_HEADER)
        decoded = decode_message(
            _body(message),
            message_id if isinstance(message_id, str) else None,
            content_type=message.content_type,
            content_encoding=f"compressed ({compressed})" if compressed
            else message.content_encoding,
            max_bytes=self._settings.max_message_bytes,
            unreadable=unreadable(message.properties),
        )
        rejected = isinstance(decoded, Rejected)
        fields = decoded.fields if isinstance(decoded, Rejected) else command_fields(decoded)
        death = _first_death(headers)
        stamped = _stamped_at(headers)
        code = _text(headers.get(ERROR_CODE_HEADER))
        reason = (
            _text(headers.get(ERROR_MESSAGE_HEADER))
            or _text(headers.get(REASON_HEADER))
            or (f"dead-lettered by the broker ({_text(death.get('reason'))})" if death else "")
            or "unknown"
        )
        return DeadLetter(
            position=position,
            command_id=fields["command_id"],
            key=None if rejected else fields["idempotency_key"],
            command_type=fields["command_type"],
            tenant=fields["tenant"],
            error_code=code or (ErrorCode.DELIVERY_LIMIT.value if death.get("reason") ==
                                "delivery_limit" else None),
            reason=reason,
            dead_lettered_at=stamped or _death_time(death),
            time_resolution_s=0.0 if stamped else BROKER_TIME_RESOLUTION_S,
            event_id=_text(headers.get(EVENT_ID_HEADER)),
            message_id=message_id if isinstance(message_id, str) else None,
            headers=headers,
            properties=properties,
            body=_body(message),
            decoded=decoded,
        )


class Replayer:
    """Decides, for each dead letter chosen, whether it may be replayed, and releases the
    stored outcome it was dead-lettered with first (the store's calls run on a loop of
    its own). One Replayer per pass: it remembers the keys the pass replayed."""

    def __init__(self, store: IdempotencyStore, force: bool) -> None:
        self._store = store
        self._force = force
        self._runner = asyncio.Runner()
        self._replayed_keys: set[str] = set()
        self.refused: list[tuple[DeadLetter, str]] = []
        self.released: list[tuple[DeadLetter, str]] = []  # and the key released

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.run(self._store.close())
        self._runner.close()

    def records(self, letter: DeadLetter) -> list[StoredRecord]:
        found = [self._runner.run(self._store.find(key)) for key in letter.store_keys()]
        return [record for record in found if record is not None]

    def prepare(self, letter: DeadLetter) -> bool:
        """Release the outcome the letter was dead-lettered with; False (the reason in
        :attr:`refused`) when it must not be replayed: a copy of it was replayed by this
        pass, its key has another outcome by now (it was replayed already, or its key
        ran again), or its result is lost and the replay is not forced. A key whose
        outcome the store no longer keeps (its retention ran out) is replayed: should
        another attempt of it be on its way, the worker runs the key once all the same."""
        keys = letter.store_keys()
        records = self.records(letter)
        refusal = (
            _copy_replayed(keys, self._replayed_keys)
            or _superseded(letter, records)
            or (None if self._force else _lost(letter, records))
        )
        if refusal is not None:
            self.refused.append((letter, refusal))
            return False
        self._release(letter, records)
        self._replayed_keys.update(keys)
        return True

    def _release(self, letter: DeadLetter, records: list[StoredRecord]) -> None:
        """Discard its stored failure or rejection: the one it was dead-lettered with
        (any, for a letter that names none: the broker dead-lettered it)."""
        for record in records:
            event = record.event
            if event is None or event.data.outcome not in RELEASABLE_OUTCOMES:
                continue
            if letter.event_id is not None and event.id != letter.event_id:
                continue  # another command's (an idempotency_key_conflict's key)
            # False: the store let it go meanwhile (retention): nothing to release.
            if self._runner.run(self._store.discard(record.key, event.id)):
                self.released.append((letter, record.key))


def _copy_replayed(keys: list[str], replayed_keys: set[str]) -> str | None:
    if replayed_keys.isdisjoint(keys):
        return None
    return "replayed already: another copy of it was replayed by this command"


def _superseded(letter: DeadLetter, records: list[StoredRecord]) -> str | None:
    """Why the letter is out of date, when its key's stored outcome is no longer the one
    it was dead-lettered with."""
    if letter.event_id is None:
        return None
    key = letter.outcome_key()
    current = next((record for record in records if record.key == key), None)
    if current is None or (current.event is not None and current.event.id == letter.event_id):
        return None
    now = (
        "claimed by another attempt" if current.event is None
        else f"{current.event.data.outcome} (event {current.event.id})"
    )
    return (f"replayed already, or its key ran again: key {key!r} is {now} now, not as it "
            "was dead-lettered; see dlq show, and purge it when done with it")


def _lost(letter: DeadLetter, records: list[StoredRecord]) -> str | None:
    lost = letter.error_code == ErrorCode.RESULT_LOST or any(
        _code(record.event) == ErrorCode.RESULT_LOST for record in records
    )
    if not lost:
        return None
    return "result_lost: the vendor may already have acted; check there, then replay with --force"


def _code(event: ResultEvent | None) -> str | None:
    if event is None or event.data.error is None:
        return None
    return str(event.data.error.code)


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _stamped_at(headers: dict[str, Any]) -> datetime | None:
    """When the worker dead-lettered it (its own header, to the microsecond)."""
    stamp = headers.get(DEAD_LETTERED_AT_HEADER)
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp):
        try:
            return datetime.fromtimestamp(stamp, UTC)
        except (OverflowError, OSError, ValueError):  # a time no calendar has
            return None
    return None


def _death_time(death: dict[str, Any]) -> datetime | None:
    """When the broker dead-lettered it (x-death's time, in whole seconds)."""
    when = death.get("time")
    if isinstance(when, datetime):
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


def _kept_headers(message: Message) -> dict[str, Any]:
    """The headers of a message put back in the queue: as they were (the broker's
    delivery count excepted, so its count starts anew)."""
    headers = headers_of(message.headers)
    headers.pop("x-delivery-count", None)
    return headers


def _replay_headers(message: Message) -> dict[str, Any]:
    """The headers of a replay: a new attempt, without what the queues and the worker
    noted about the earlier ones (the renamed compression header stays: it says what
    the body is)."""
    return {
        name: value for name, value in headers_of(message.headers).items()
        if _of_the_command(name)
    }


def _of_the_command(name: str | bytes) -> bool:
    """Whether a header is the command's own, not noted by the queues or the worker (a
    name that is not UTF-8 is the publisher's)."""
    if isinstance(name, bytes):
        return True
    noted = name.startswith(BROKER_HEADERS) or name.startswith("x-relay-")
    return not noted or name == KEPT_COMPRESSION_HEADER


def _keep_bodies_as_sent(channel: Any) -> None:
    """As the consumer does: kombu would inflate a body whose headers name a compression
    when it makes the message; the header is renamed first, so the body stays as sent.
    (A subclass, not a function: the embedded broker's channel checks messages are
    instances of its class.)"""

    class MessageAsSent(channel.Message):  # type: ignore[misc]
        def __init__(self, *args: Any, **options: Any) -> None:
            raw = args[0] if args else options.get("payload", options.get("msg"))
            properties = raw if isinstance(raw, dict) else getattr(raw, "properties", None)
            if isinstance(properties, dict):
                headers = properties.get("headers", properties.get("application_headers"))
                if isinstance(headers, dict) and COMPRESSION_HEADER in headers:
                    headers[KEPT_COMPRESSION_HEADER] = headers.pop(COMPRESSION_HEADER)
            super().__init__(*args, **options)

    channel.Message = MessageAsSent


def describe_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def as_json(letter: DeadLetter) -> dict[str, Any]:
    """The letter as ``dlq show`` prints it."""
    try:
        body: Any = json.loads(letter.body)
    except ValueError:
        body = letter.body.decode("utf-8", "replace")
    return {
        "command_id": letter.command_id,
        "idempotency_key": letter.key,
        "type": letter.command_type,
        "tenant": letter.tenant,
        "error_code": letter.error_code,
        "reason": letter.reason,
        "dead_lettered_at": letter.dead_lettered_at.isoformat()
        if letter.dead_lettered_at else None,
        "position": letter.position,
        "properties": {name: _plain(letter.properties[name]) for name in MESSAGE_PROPERTIES
                       if letter.properties.get(name) is not None},
        "headers": _plain(letter.headers),
        "body": body,
    }


def _plain(value: Any) -> Any:
    """A header or property value as JSON can hold it, whatever AMQP type it came as:
    decimals as their exact text, timestamps in ISO 8601, bytes as text (bad bytes as
    U+FFFD), NaN and infinities as text."""
    if isinstance(value, dict):
        return {_plain_name(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)  # Decimal, and anything else: its own exact text


def _plain_name(name: Any) -> str:
    # A name that is not UTF-8 keeps its bytes visible (\xff), apart from any text name.
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)
