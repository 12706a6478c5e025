"""AMQP frames py-amqp can not read, and AMQP values it reads that later code must carry,
over a real RabbitMQ, published as raw bytes (tests/amqp_frames.py) among innocent
commands.

What must hold: a message whose properties can not be read is rejected alone
(``invalid_command``, saying which header or property and what to fix), and kept in the
dead-letter queue with what could be read; every other message runs as if it were not
there; the worker never loses its connection over one. A value the worker can read
(decimals, timestamps, nested tables, arrays, bytes, names that are not UTF-8) comes
through lanes, delay queues, the dead-letter queue and ``dlq list/show/replay`` as sent.

RabbitMQ's own verdict, on 3.10: it refuses a field type AMQP 0-9-1 does not define (an
unknown letter, and ``U``, which py-amqp reads), a NaN float and a table cut short,
closing the publisher's connection (541 INTERNAL_ERROR); those never reach the worker.
It passes on timestamps past the year 9999, names and strings that are not UTF-8, tables
nested 2000 deep and a header table of any size within its frame.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from schemas.events import ResultEvent
from worker.broker.frames import DAMAGE_KEY
from worker.sandbox import Faults, SandboxServer, ScriptedFault

from ..amqp_frames import (
    LAST_READABLE_TIMESTAMP,
    NAN,
    U_SHORT,
    UNKNOWN_TYPE,
    VOID,
    Field,
    Headers,
    Properties,
    RawPublisher,
    array,
    byte_array,
    decimal,
    header_tables,
    headers,
    hostile_properties,
    nested_arrays,
    number,
    properties,
    table,
    text,
    timestamp,
)
from ..command_line import cli_env, json_lines, run_cli
from ..harness import RunningRelay, running_relay
from .test_rabbitmq import _delete_queues

pytestmark = pytest.mark.integration

UNREADABLE = "the message's AMQP properties could not all be read"
# Every field type RabbitMQ takes and py-amqp reads, at its extremes.
ODD = headers([
    (b"decimal", decimal(255, -(2**31))), (b"decimal-2", decimal(2, 12345)),
    (b"timestamp", timestamp(LAST_READABLE_TIMESTAMP)), (b"epoch", timestamp(0)),
    (b"table", table([(b"inner", table([(b"list", array([VOID, Field(b"t\x01", True)]))]))])),
    (b"array", array([text(b"a"), number("l", ">q", -(2**63)), decimal(3, 7),
                      timestamp(86400), table([]), array([])])),
    (b"bytes", byte_array(b"\x00\xff\x01")), (b"not-utf8", text(b"\xc3\x28")),
    (b"\xff\xfe", text(b"a name that is not UTF-8")), (b"void", VOID),
    (b"true", Field(b"t\x01", True)), (b"false", Field(b"t\x00", False)),
    (b"int64-max", number("l", ">q", 2**63 - 1)), (b"int64-min", number("L", ">q", -(2**63))),
    (b"uint32-max", number("i", ">I", 2**32 - 1)), (b"int8-min", number("b", ">b", -128)),
    (b"uint8-max", number("B", ">B", 255)), (b"int16-min", number("s", ">h", -32768)),
    (b"uint16-max", number("u", ">H", 65535)), (b"float32", number("f", ">f", 1.5)),
    (b"double", number("d", ">d", -2.5e-300)), (b"empty", text(b"")),
])


class ConnectionLog(logging.Handler):
    """Counts the consumer's connections: it logs "consuming" each time it (re)connects."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.connections = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "consuming":
            self.connections += 1


@dataclass
class FrameRig:
    """One worker for the module, a raw publisher, and every event seen, by command id."""

    relay: RunningRelay
    publisher: RawPublisher
    log: ConnectionLog
    events: dict[str, list[ResultEvent]] = field(default_factory=dict)
    task_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # once each

    def publish(self, body: dict[str, Any], **values: Any) -> bool:
        """The command as JSON with raw properties (JSON, persistent, the reply queue, a
        message id, unless ``values`` say otherwise); False when RabbitMQ refused it."""
        raw = properties(**{
            "content_type": b"application/json", "delivery_mode": 2,
            "reply_to": self.relay.reply_to.encode(), "message_id": body["id"].encode(),
            **values,
        })
        return self.publisher.publish(
            json.dumps(body).encode(), raw, self.relay.settings.command_exchange, body["type"]
        )

    def innocent(self) -> str:
        """A valid fylr cancel (the hostile ones are ESET batch deletes: the faults a test
        scripts for those never reach it)."""
        command_id = f"innocent-{uuid.uuid4()}"
        assert self.publish({"type": "cancel-task", "id": command_id,
                             "params": {"task_id": next(self.task_ids)}})
        return command_id

    def wait_for(self, ids: set[str], timeout_s: float = 20.0) -> dict[str, ResultEvent]:
        """The first event of each of ``ids``; more may come later (see ``assert_once``)."""
        give_up_at = time.monotonic() + timeout_s
        while not ids <= self.events.keys() and time.monotonic() < give_up_at:
            for reply in self.relay.client.events(timeout_s=0.5):
                self.events.setdefault(reply.event.data.command_id, []).append(reply.event)
                if ids <= self.events.keys():
                    break
        missing = ids - self.events.keys()
        assert not missing, f"no event for {sorted(missing)}"
        return {command_id: self.events[command_id][0] for command_id in ids}

    def assert_once(self) -> None:
        """Every command seen got exactly one event (late ones given a moment to come)."""
        for reply in self.relay.client.events(timeout_s=1.0):
            self.events.setdefault(reply.event.data.command_id, []).append(reply.event)
        twice = {command_id: len(seen) for command_id, seen in self.events.items()
                 if len(seen) != 1}
        assert not twice, f"commands with more than one event: {twice}"

    def assert_never_reconnected(self) -> None:
        assert self.log.connections == 1, f"the consumer connected {self.log.connections} times"


@pytest.fixture(scope="module")
def rig(sandbox_server: SandboxServer, amqp_url: str, redis_url: str) -> Iterator[FrameRig]:
    consumer_log = logging.getLogger("worker.broker.consumer")
    log, level = ConnectionLog(), consumer_log.level
    consumer_log.addHandler(log)
    consumer_log.setLevel(logging.INFO)
    sandbox_server.state.reset()
    try:
        with running_relay(
            sandbox_server, broker_url=amqp_url, idempotency_url=redis_url,
            rate_limit_url=redis_url,
            # Back-off goes through short delay queues at once.
            retry_in_process_s=1.0, retry_max_attempts=2, retry_delays_s=(0.3, 0.6),
        ) as relay:
            publisher = RawPublisher(amqp_url)
            try:
                yield FrameRig(relay, publisher, log)
            finally:
                publisher.close()
        _delete_queues(amqp_url, relay)
    finally:
        consumer_log.removeHandler(log)
        consumer_log.setLevel(level)


def hostile(rig: FrameRig, table_sent: Headers | None = None,
            properties_sent: Properties | None = None) -> tuple[str, bool, set[str]]:
    """An ESET batch delete (it goes through its lane when it can be read) with
    ``table_sent`` and ``properties_sent``, between two innocent commands. Its id,
    whether RabbitMQ took it, and the innocents' ids."""
    before = rig.innocent()
    command_id = f"hostile-{uuid.uuid4()}"
    body = {"type": "batch-delete", "id": command_id,
            "params": {"object_uuids": [str(uuid.uuid4())]}}
    values = dict(properties_sent.values) if properties_sent else {}
    taken = rig.publish(body, application_headers=table_sent, **values)
    return command_id, taken, {before, rig.innocent()}


def assert_settled_alone(rig: FrameRig, command_id: str, taken: bool, innocents: set[str],
                         damaged: bool) -> ResultEvent | None:
    """Innocents succeed; the message is rejected for its properties when they are
    damaged, and runs when they are not; the consumer never reconnected."""
    events = rig.wait_for(innocents | ({command_id} if taken else set()))
    assert {events[i].data.outcome for i in innocents} == {"succeeded"}
    rig.assert_never_reconnected()
    if not taken:
        return None
    event = events[command_id]
    if damaged:
        assert event.data.outcome == "rejected"
        assert event.data.error is not None
        assert (event.data.error.code, event.data.error.message[:len(UNREADABLE)]) == (
            "invalid_command", UNREADABLE)
    else:
        assert event.data.outcome == "succeeded", event.data.error
    return event


def dead_letter_of(rig: FrameRig, command_id: str) -> Any:
    """Its copy in the dead-letter queue (every other one there is taken too)."""
    letters = rig.relay.dead_letters()
    kept = [m for m in letters if json.loads(m.body)["id"] == command_id]
    assert len(kept) == 1, f"{len(kept)} dead letters for {command_id}"
    return kept[0]


# --- frames py-amqp can not read ------------------------------------------------------------

NAMED: dict[str, tuple[Headers | None, dict[str, Any], str]] = {
    # name: headers, properties, what the rejection must say (empty: the message runs)
    "timestamp 2^64-1": (headers([(b"x-sent-at", timestamp(2**64 - 1))]), {},
                         "header 'x-sent-at' is a timestamp past the year 9999"),
    "timestamp in year 10000": (headers([(b"t", timestamp(LAST_READABLE_TIMESTAMP + 1))]), {},
                                "past the year 9999"),
    "timestamp -1 (2^64-1 unsigned) in a table": (
        headers([(b"t", table([(b"in", timestamp(2**64 - 1))]))]), {},
        "header 't' (in a table or array 1 level(s) down)"),
    "arrays 2000 deep": (headers([(b"deep", nested_arrays(2000))]), {},
                         "nests tables and arrays more than 32 levels deep"),
    "arrays 40 deep (py-amqp reads them)": (headers([(b"deep", nested_arrays(40))]), {},
                                            "more than 32 levels deep"),
    "headers of 40 KB": (headers([(b"big", text(b"x" * 40_000))]), {},
                         "bytes: only the first 32768 are read"),
    # py-amqp would send them again as 300 KB: past RabbitMQ's frame_max.
    "120 KB of one-byte integers": (headers([(b"ints", array([number("b", ">b", 1)] * 60_000))]),
                                    {}, "bytes: only the first 32768 are read"),
    "message_id not UTF-8": (None, {"message_id": b"\xff\xfe-id"},
                             "property message_id is not UTF-8"),
    "correlation_id not UTF-8": (None, {"correlation_id": b"\xc3\x28"},
                                 "property correlation_id is not UTF-8"),
    "decimal of scale 255": (headers([(b"d", decimal(255, -(2**31)))]), {}, ""),
    "names and strings not UTF-8": (headers([(b"\xff\xfe", text(b"\xc3\x28"))]), {}, ""),
    "timestamp property 2^64-1": (None, {"timestamp": 2**64 - 1}, ""),
}


@pytest.mark.parametrize("name", NAMED)
def test_a_frame_py_amqp_can_not_read_settles_that_message_alone(rig: FrameRig, name: str):
    table_sent, values, said = NAMED[name]
    command_id, taken, innocents = hostile(rig, table_sent, Properties(values))
    assert taken, rig.publisher.refusals
    event = assert_settled_alone(rig, command_id, taken, innocents, damaged=bool(said))
    assert event is not None
    if said:
        assert event.data.error is not None and said in event.data.error.message


def test_a_damaged_message_is_kept_in_the_dead_letter_queue_with_what_could_be_read(
    rig: FrameRig,
):
    sent = headers([(b"kept", text(b"as sent")), (b"x-sent-at", timestamp(2**63)),
                    (b"decimal", decimal(4, 12345))])
    command_id, taken, innocents = hostile(rig, sent, Properties({"app_id": b"app-\xff"}))
    assert_settled_alone(rig, command_id, taken, innocents, damaged=True)
    kept = dead_letter_of(rig, command_id)
    assert {name: kept.headers[name] for name in ("kept", "x-sent-at", "decimal")} == {
        "kept": "as sent", "x-sent-at": None, "decimal": sent.value["decimal"]}
    assert kept.properties["app_id"] == "app-\ufffd"
    assert kept.headers["x-relay-error-code"] == "invalid_command"
    assert kept.headers["x-relay-error-message"].startswith(UNREADABLE)


@pytest.mark.parametrize("value", [UNKNOWN_TYPE, U_SHORT, NAN], ids=["Z", "U", "NaN"])
def test_a_frame_rabbitmq_refuses_never_reaches_the_worker(rig: FrameRig, value: Field):
    command_id, taken, innocents = hostile(rig, headers([(b"x", value)]))
    assert not taken, "RabbitMQ took it: the worker must then read it"
    assert_settled_alone(rig, command_id, taken, innocents, damaged=True)


def test_a_header_table_cut_short_is_refused_by_rabbitmq(rig: FrameRig):
    whole = headers([(b"a", text(b"x" * 40))])
    cut = Headers(whole.raw[:-10], {}, unreadable=True, refused=True)
    command_id, taken, innocents = hostile(rig, cut)
    assert not taken
    assert_settled_alone(rig, command_id, taken, innocents, damaged=True)


def test_a_header_named_like_the_damage_marker_is_only_a_header(rig: FrameRig):
    forged = headers([(DAMAGE_KEY.encode(), text(b"reject me")), (b"relay", VOID)])
    command_id, taken, innocents = hostile(rig, forged)
    assert_settled_alone(rig, command_id, taken, innocents, damaged=False)


# --- values py-amqp reads, on every path ----------------------------------------------------


def test_odd_header_values_come_through_lane_delay_queues_and_dead_letter_queue(
    rig: FrameRig, sandbox: SandboxServer
):
    """Six 503s: two attempts on each of three deliveries (the lane's, then two more after
    the delay queues), then failed and dead-lettered: the values as sent, each time."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=503, path_contains="batchDelete")]
                                  * 6)
    command_id, taken, _ = hostile(rig, ODD)
    assert taken, rig.publisher.refusals
    event = rig.wait_for({command_id})[command_id]
    assert (event.data.outcome, event.data.attempts) == ("failed", 6)
    kept = dead_letter_of(rig, command_id)
    assert len(kept.headers["x-death"]) >= 1  # it went through a delay queue
    got = {name: kept.headers[name] for name in ODD.value}
    assert got == _as_sent_again(ODD.value)
    rig.assert_never_reconnected()


def test_dlq_list_show_and_replay_read_odd_header_values(
    rig: FrameRig, sandbox: SandboxServer, tmp_path: Path
):
    sandbox.state.faults = Faults(script=[ScriptedFault(status=400, path_contains="batchDelete")])
    failed, taken, _ = hostile(rig, ODD)
    damaged, taken_too, _ = hostile(rig, headers([(b"ts", timestamp(2**64 - 1)),
                                                  *_entries(ODD)]))
    assert taken and taken_too
    outcomes = {i: e.data.outcome for i, e in rig.wait_for({failed, damaged}).items()}
    assert outcomes == {failed: "failed", damaged: "rejected"}
    env = cli_env(tmp_path, rig.relay.settings)

    listed = run_cli("dlq", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    letters = {letter["command_id"]: letter for letter in json_lines(listed.stdout)}
    assert (letters[failed]["error_code"], letters[damaged]["error_code"]) == (
        "vendor_rejected", "invalid_command")
    assert letters[damaged]["reason"].startswith(UNREADABLE)

    shown = run_cli("dlq", "show", failed, env=env)
    assert shown.returncode == 0, shown.stderr
    plain = json.loads(shown.stdout)["headers"]
    assert (plain["decimal"], plain["timestamp"], plain["\\xff\\xfe"], plain["int64-min"]) == (
        "-2.147483648E-246", "9999-12-31T23:59:59", "a name that is not UTF-8", -(2**63))

    replayed = run_cli("dlq", "replay", failed, env=env)
    assert replayed.returncode == 0, replayed.stderr
    rig.events.pop(failed)
    assert rig.wait_for({failed})[failed].data.outcome == "succeeded"
    rig.assert_never_reconnected()


# --- any header table, any properties -------------------------------------------------------


def test_any_header_table_and_properties_settle_their_message_alone(
    rig: FrameRig, tmp_path: Path
):
    """Each drawn message among innocent ones; then: nothing got two events, and the
    dead-letter queue holds every damaged message, which ``dlq list`` reads."""
    verdicts: Counter[str] = Counter()
    damaged_ids: set[str] = set()

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(table_sent=header_tables(), properties_sent=hostile_properties())
    def one_message(table_sent: Headers, properties_sent: Properties) -> None:
        command_id, taken, innocents = hostile(rig, table_sent, properties_sent)
        verdicts["taken" if taken else "refused by RabbitMQ"] += 1
        if not taken:
            assert table_sent.refused, f"RabbitMQ refused: {rig.publisher.refusals[-1:]}"
        if taken and table_sent.refused:
            # RabbitMQ took what 3.10 refuses: the worker must still settle it, one way
            # or the other.
            damaged = rig.wait_for({command_id})[command_id].data.outcome == "rejected"
        else:
            damaged = table_sent.unreadable or properties_sent.unreadable
        assert_settled_alone(rig, command_id, taken, innocents, damaged)
        if taken and damaged:
            damaged_ids.add(command_id)

    one_message()
    rig.assert_once()
    listed = run_cli("dlq", "list", "--json", env=cli_env(tmp_path, rig.relay.settings))
    assert listed.returncode == 0, listed.stderr
    codes = {letter["command_id"]: letter["error_code"] for letter in json_lines(listed.stdout)}
    assert {codes.get(command_id) for command_id in damaged_ids} <= {"invalid_command"}
    rig.assert_never_reconnected()
    print(f"hostile messages: {dict(verdicts)}, of which damaged: {len(damaged_ids)}")


def _entries(sent: Headers) -> list[tuple[bytes, Field]]:
    return [(b"odd", Field(b"F" + sent.raw, sent.value))]


def _as_sent_again(value: Any) -> Any:
    """A value as py-amqp reads it after sending it again: it writes a byte array as a
    long string, read back as text when it is UTF-8."""
    if isinstance(value, dict):
        return {name: _as_sent_again(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_as_sent_again(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return value
    return value
