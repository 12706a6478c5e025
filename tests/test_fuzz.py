"""Property-based fuzzing of the worker's promise on the embedded defaults (SQLite broker,
SQLite idempotency store): anything a publisher sends gets exactly one terminal event,
and the worker keeps running.

One worker serves the whole module; each example is published as a hostile publisher
would (tests/fuzzing.py), and checked from the outside: its one event on the events
exchange and the reply queue, its error code and message, its original in the
dead-letter queue, the sandbox's vendor counters, and the worker still up and connected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import strategies as st

from worker.sandbox import SandboxServer

from .fuzzing import (
    ACCEPTED,
    ID,
    Fuzzed,
    FuzzRig,
    Literal,
    arbitrary_bodies,
    big_messages,
    check_memory,
    command_message,
    deep_and_odd_numbers,
    foreign_encodings,
    hostile_headers,
    hostile_properties,
    integer_impostors,
    mutated_messages,
    nested,
    raw_message,
    rejected,
    scratch_dir,
    to_json,
    unencodable_or_long,
    valid_messages,
    wrong_shapes,
)
from .harness import embedded


@pytest.fixture(scope="module")
def rig(
    sandbox_server: SandboxServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzRig]:
    sandbox_server.state.reset()
    with scratch_dir(tmp_path_factory.mktemp("fuzz")) as data_dir:

        def files_of(worker: int) -> dict[str, Any]:
            # A worker that had to be replaced may have left its broker file locked: each
            # one gets files of its own.
            path = data_dir / f"worker-{worker}"
            path.mkdir(exist_ok=True)
            return embedded(path)

        running = FuzzRig(sandbox_server, files_of)
        yield running
        running.close()


@pytest.fixture(autouse=True)
def fresh_ledger(rig: FuzzRig) -> None:
    rig.begin()


def cancel_task(task_id: Any, **fields: Any) -> Fuzzed:
    """A cancel-task whose task_id is wrong; a number too big to parse hides the id."""
    too_big = isinstance(task_id, Literal) and len(task_id) > 20
    command = {"type": "cancel-task", "params": {"task_id": task_id}, **fields}
    if not too_big:
        command["id"] = ID
    expect = rejected("invalid_command", "invalid_json") if too_big else rejected(
        "invalid_command")
    return command_message(command, f"cancel-task, task_id {str(task_id)[:20]!r}", expect)


def spaaza_task(task_id: Any) -> Fuzzed:
    command = {"type": "update-triggers", "id": ID, "params": {
        "provider": "spaaza", "task_id": task_id, "trigger": {"once": "2099-01-01T00:00:00Z"}}}
    return command_message(command, f"spaaza, task_id {task_id!r}", rejected("invalid_command"))


def spaaza_once(once: Any) -> Fuzzed:
    """The contract: trigger.once is an ISO-8601 time, not a number of seconds."""
    command = {"type": "update-triggers", "id": ID, "params": {
        "provider": "spaaza", "task_id": 7, "trigger": {"once": once}}}
    return command_message(command, f"spaaza, trigger.once {once!r}",
                           rejected("invalid_command"))


def with_field(name: str, value: str, label: str) -> Fuzzed:
    command = {"type": "cancel-task", "params": {"task_id": 5}, name: value}
    return command_message(command, label, rejected())


VALID_CANCEL = command_message({"type": "cancel-task", "id": ID, "params": {"task_id": 41}},
                               "valid cancel-task", ACCEPTED)


def test_arbitrary_bytes_are_rejected(rig: FuzzRig):
    rig.fuzz(
        arbitrary_bodies,
        50,
        raw_message(b"", "empty body", rejected("invalid_json")),
        raw_message(b"\xff\xfe not json", "not UTF-8", rejected("invalid_json")),
    )


def test_json_of_the_wrong_shape_is_rejected(rig: FuzzRig):
    rig.fuzz(wrong_shapes(), 50)


def test_deep_nesting_huge_numbers_and_nan_are_rejected(rig: FuzzRig):
    rig.fuzz(
        deep_and_odd_numbers(),
        40,
        Fuzzed("5000 nested arrays", rejected(), text=nested(5000, "arrays")),
        Fuzzed("NaN task_id", rejected(), text='{"type":"cancel-task","params":{"task_id":NaN}}'),
    )


def test_bodies_not_in_utf8_are_rejected(rig: FuzzRig):
    rig.fuzz(foreign_encodings(), 25)


def test_lone_surrogates_and_long_strings_are_rejected_and_never_echoed(rig: FuzzRig):
    rig.fuzz(
        unencodable_or_long(),
        50,
        with_field("type", "\ud800", "lone surrogate type"),
        with_field("id", "x\udfff", "lone surrogate id"),
        with_field("idempotency_key", "\ud800", "lone surrogate key"),
        with_field("type", "é" * 300, "300 non-ASCII chars of type"),
        with_field("type", "型" * 10_000, "10k chars of type"),
        with_field("id", "i" * 10_000, "10k chars of id"),
    )


def test_integers_must_be_integers(rig: FuzzRig):
    """Invariant 4: true, "12", 2.0 … are never taken for a task id, and a number of
    thousands of digits never reaches a vendor."""

    rig.fuzz(
        integer_impostors(),
        50,
        cancel_task(Literal("1" + "0" * 4000)),
        cancel_task(True),
        cancel_task("12"),
        cancel_task(2.0),
        cancel_task(" 8 "),
        spaaza_task("+5"),
        spaaza_task(True),
    )


def test_valid_commands_run_and_broken_ones_are_rejected(rig: FuzzRig):
    rig.fuzz(
        st.one_of(valid_messages(), mutated_messages()),
        60,
        VALID_CANCEL,
        spaaza_once(4102444800),
    )


def test_hostile_headers_never_stop_the_worker(rig: FuzzRig):
    def headers(**values: Any) -> Fuzzed:
        return Fuzzed("valid cancel-task, hostile headers", ACCEPTED, text=VALID_CANCEL.text,
                      headers=values, routing_key="cancel-task")

    rig.fuzz(
        hostile_headers(amqp=False),
        50,
        headers(**{"x-delivery-count": "²"}),
        headers(**{"x-relay-attempts": "9" * 4300, "x-relay-retries": "-1"}),
        headers(**{"x-delivery-count": [1], "traceparent": "\ud800", "tracestate": 1.5}),
    )


def test_hostile_properties_and_reply_to(rig: FuzzRig):
    """Invariant 7 among others: an event goes to ``reply_to`` only when it names a reply
    queue; the events exchange gets it whatever ``reply_to`` says."""

    rig.fuzz(hostile_properties(amqp=False), 50)


def test_memory_stays_bounded(rig: FuzzRig):
    check_memory(rig, big_messages(megabytes=4))
    rig.assert_quiet()


def test_a_long_id_is_not_echoed(rig: FuzzRig):
    """The text of the error never carries a 10k-character input back."""
    long_key = "k" * 10_000
    fuzzed = command_message({"type": "fetch-patching", "params": {long_key: 1}},
                             "10k-char param name", rejected("invalid_command"))
    event = rig.check(fuzzed)
    assert event.data.error is not None and long_key not in event.data.error.message
    assert to_json(long_key) not in event.model_dump_json()
