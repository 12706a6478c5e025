"""What ``dlq list/show`` print of a dead letter's headers and properties, whatever AMQP
type they came as: JSON (strict: no NaN), never an exception."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from worker.admin.deadletters import DeadLetter, DeadLetterQueue, as_json
from worker.broker.decoding import decode_message
from worker.settings import Settings

from .test_dlq import put_dead_letter

BODY = b'{"type": "cancel-task", "id": "c-1", "params": {"task_id": 7}}'


def letter_with(headers: dict[object, object]) -> DeadLetter:
    return DeadLetter(
        position=1, command_id="c-1", key="c-1", command_type="cancel-task", tenant="default",
        error_code="invalid_command", reason="…", dead_lettered_at=None, time_resolution_s=0.0,
        event_id=None, message_id="c-1",
        headers=headers, properties={"timestamp": 2**64 - 1, "app_id": "app-\ufffd"}, body=BODY,
        decoded=decode_message(BODY, "c-1"),
    )


def test_every_amqp_value_is_printed_as_json():
    shown = as_json(letter_with({
        "decimal": Decimal("-2.147483648E-246"), "when": datetime(9999, 12, 31, 23, 59, 59),
        b"\xff\xfe": b"\xc3\x28", "nan": float("nan"), "inf": float("-inf"),
        "nested": {b"k": [bytearray(b"ab"), (1, None, True)]}, "big": 2**63 - 1,
        "surrogate": "\ud800",
    }))
    printed = json.loads(json.dumps(shown, allow_nan=False))
    assert printed["headers"] == {
        "decimal": "-2.147483648E-246", "when": "9999-12-31T23:59:59",
        "\\xff\\xfe": "\ufffd(", "nan": "nan", "inf": "-inf",
        "nested": {"k": ["ab", [1, None, True]]}, "big": 2**63 - 1,
        "surrogate": "\ud800",
    }
    assert printed["properties"] == {"timestamp": 2**64 - 1, "app_id": "app-\ufffd"}


def test_a_dead_lettered_at_header_past_what_datetime_holds_is_no_time(tmp_path: Path):
    """A publisher's header, kept on a message the broker dead-lettered itself."""
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
                        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}")
    command = json.loads(BODY)
    for stamp in (1e300, 2**62):
        put_dead_letter(settings, command, {"x-relay-dead-lettered-at": stamp})
    with DeadLetterQueue(settings) as queue:
        letters = queue.read()
    assert [letter.dead_lettered_at for letter in letters] == [None, None]
