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
    rig.fuzz(any_body, 100, SURROGATE_TYPE, HUGE_TASK_ID, LONG_TYPE)


def test_hostile_headers(rig: FuzzRig):
    rig.fuzz(
        hostile_headers(amqp=True),
        60,
        with_headers(**{"x-delivery-count": "²"}),
        with_headers(**{"x-delivery-count": "9" * 4300}),
        with_headers(
            **{"x-relay-attempts": b"\xff", "traceparent": b"\x00", "tracestate": [1.5]}
        ),
        with_headers(compression="application/x-gzip"),
    )


def test_hostile_properties_and_reply_to(rig: FuzzRig):
    rig.fuzz(
        hostile_properties(amqp=True),
        60,
        replying_to(COMMANDS),
        replying_to(DEAD, SURROGATE_TYPE),
        replying_to(VICTIM),
        Fuzzed(
            "latin-1 body, said so", rejected(), raw=b'{"type":"caf\xe9"}',
            content_encoding="latin-1",
        ),
    )


def test_memory_stays_bounded(rig: FuzzRig):
    check_memory(rig, big_messages(megabytes=4))
    rig.assert_quiet()
