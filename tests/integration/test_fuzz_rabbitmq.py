"""Property-based fuzzing of the worker's promise over a real RabbitMQ (quorum queues, the
Redis idempotency store): anything a publisher sends gets exactly one terminal event,
and the worker keeps running.

Here the events exchange can be tapped, so every example's event is looked for there
(whatever its ``reply_to``), and AMQP's own types reach the worker: byte-string and
float headers, content types and encodings of any kind, replies asked for on the
command queue or the dead-letter queue. Strategies and checks: tests/fuzzing.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import example, given

from worker.sandbox import SandboxServer

from ..fuzzing import (
    ACCEPTED,
    COMMANDS,
    DEAD,
    ID,
    TERMINAL,
    VICTIM,
    Fuzzed,
    FuzzRig,
    Literal,
    any_body,
    big_messages,
    check_memory,
    command_message,
    fuzz_settings,
    hostile_headers,
    hostile_properties,
    rejected,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rig(sandbox_server: SandboxServer, amqp_url: str, redis_url: str) -> Iterator[FuzzRig]:
    sandbox_server.state.reset()
    settings = {"broker_url": amqp_url, "idempotency_url": redis_url,
                "rate_limit_url": redis_url}
    running = FuzzRig(sandbox_server, lambda _: settings)
    yield running
    running.close()


@pytest.fixture(autouse=True)
def fresh_ledger(rig: FuzzRig) -> None:
    rig.begin()


VALID_CANCEL = command_message({"type": "cancel-task", "id": ID, "params": {"task_id": 42}},
                               "valid cancel-task", ACCEPTED)
SURROGATE_TYPE = command_message({"type": "\ud800", "params": {}}, "lone surrogate type",
                                 rejected())
HUGE_TASK_ID = command_message(
    {"type": "cancel-task", "params": {"task_id": Literal("1" + "0" * 4000)}},
    "4001-digit task_id", rejected("invalid_command", "invalid_json"))
LONG_TYPE = command_message({"type": "é" * 150, "params": {}}, "150 two-byte chars of type",
                            rejected("unknown_type"))  # past the 255 bytes of a routing key


def with_headers(**headers: object) -> Fuzzed:
    # Run or not, a body kombu would inflate is the worker's call: one event either way.
    expect = TERMINAL if "compression" in headers else ACCEPTED
    return Fuzzed("valid cancel-task, hostile headers", expect, text=VALID_CANCEL.text,
                  headers=dict(headers), routing_key="cancel-task")


def replying_to(target: str, fuzzed: Fuzzed = VALID_CANCEL) -> Fuzzed:
    expect = fuzzed.expect
    return Fuzzed(f"{fuzzed.label}, reply_to {target}", expect, text=fuzzed.text,
                  routing_key=fuzzed.routing_key, reply_to=target)


def test_any_body(rig: FuzzRig):
    @fuzz_settings(100)
    @example(SURROGATE_TYPE)
    @example(HUGE_TASK_ID)
    @example(LONG_TYPE)
    @given(any_body)
    def prop(fuzzed: Fuzzed) -> None:
        rig.check(fuzzed)

    prop()
    rig.assert_quiet()


def test_hostile_headers(rig: FuzzRig):
    @fuzz_settings(60)
    @example(with_headers(**{"x-delivery-count": "²"}))
    @example(with_headers(**{"x-delivery-count": "9" * 4300}))
    @example(with_headers(**{"x-relay-attempts": b"\xff", "traceparent": b"\x00",
                             "tracestate": [1.5]}))
    @example(with_headers(compression="application/x-gzip"))
    @given(hostile_headers(amqp=True))
    def prop(fuzzed: Fuzzed) -> None:
        rig.check(fuzzed)

    prop()
    rig.assert_quiet()


def test_hostile_properties_and_reply_to(rig: FuzzRig):
    @fuzz_settings(60)
    @example(replying_to(COMMANDS))
    @example(replying_to(DEAD, SURROGATE_TYPE))
    @example(replying_to(VICTIM))
    @example(Fuzzed("latin-1 body, said so", rejected(), raw=b'{"type":"caf\xe9"}',
                    content_encoding="latin-1"))
    @given(hostile_properties(amqp=True))
    def prop(fuzzed: Fuzzed) -> None:
        rig.check(fuzzed)

    prop()
    rig.assert_quiet()


def test_memory_stays_bounded(rig: FuzzRig):
    check_memory(rig, big_messages(megabytes=4))
    rig.assert_quiet()
