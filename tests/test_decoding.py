"""What a publisher may send, decoded: a command, or a rejection that says what to fix
without quoting the input whole and without crashing on it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.commands import CancelTaskCommand
from worker.broker.decoding import MAX_JSON_DEPTH, decode_message
from worker.results import Rejected

CANCEL = {"type": "cancel-task", "params": {"task_id": 7}}


def rejected(body: bytes, **options: Any) -> Rejected:
    decoded = decode_message(body, "m-1", **options)
    assert isinstance(decoded, Rejected), decoded
    # Whatever was sent, the event built from it can be serialised.
    json.dumps(decoded.fields)
    assert len(decoded.error.message) < 400
    return decoded


def with_params(**params: Any) -> bytes:
    return json.dumps({"type": "cancel-task", "params": params}).encode()


def test_a_valid_command_decodes() -> None:
    command = decode_message(json.dumps(CANCEL).encode(), "m-1")
    assert isinstance(command, CancelTaskCommand)
    assert (command.command_id, command.params.task_id) == ("m-1", 7)


@pytest.mark.parametrize(
    "task_id", [True, "12", "+5", " 8 ", "1_000", 2.0, 0, -3, 2**63, int("9" * 4001)]
)
def test_a_task_id_that_is_not_a_json_integer_in_range_is_rejected(task_id: Any) -> None:
    decoded = rejected(with_params(task_id=task_id))
    assert decoded.error.code == "invalid_command"
    assert "params.task_id" in decoded.error.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"[" * 2000 + b"]" * 2000, "invalid_json"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "invalid_json"),
        (json.dumps(CANCEL).encode("utf-16"), "invalid_json"),
        (json.dumps(CANCEL).encode("utf-32"), "invalid_json"),
        (b'{"type": "cancel-task", "params": {"task_id": NaN}}', "invalid_json"),
        (b"\xff\xfe not utf-8", "invalid_json"),
        (b"[1, 2]", "invalid_command"),
        (json.dumps({"type": "é" * 300, "params": {}}).encode(), "unknown_type"),
    ],
)
def test_bodies_that_are_not_commands_are_rejected(body: bytes, code: str) -> None:
    assert rejected(body).error.code == code


@pytest.mark.parametrize("field", ["id", "idempotency_key", "type", "tenant"])
def test_a_lone_surrogate_is_rejected_and_never_copied_into_the_event(field: str) -> None:
    body = json.dumps({**CANCEL, field: "\ud800"}).encode()  # json escapes it: \ud800
    decoded = rejected(body)
    assert decoded.error.code == "invalid_json"
    assert decoded.fields["command_id"] == "m-1"


def test_a_huge_value_is_not_echoed() -> None:
    decoded = rejected(json.dumps({"type": "x" * 20_000_000, "params": {}}).encode(),
                       max_bytes=64 * 1024 * 1024)
    assert decoded.error.code == "unknown_type"
    assert decoded.fields["command_type"] is None


def test_a_message_over_the_size_limit_is_rejected_before_parsing() -> None:
    body = with_params(task_id=1) + b" " * 2048
    decoded = rejected(body, max_bytes=1024)
    assert decoded.error.code == "invalid_command"
    assert "1024" in decoded.error.message


@pytest.mark.parametrize(
    ("content_type", "content_encoding"),
    [
        ("application/x-python-serialize", None),
        ("application/json; charset=utf-16", None),
        ("application/json", "gzip"),
        ("application/json", "utf-16"),
    ],
)
def test_other_formats_and_encodings_are_rejected(
    content_type: str, content_encoding: str | None
) -> None:
    decoded = rejected(
        json.dumps(CANCEL).encode(), content_type=content_type, content_encoding=content_encoding
    )
    assert decoded.error.code == "invalid_command"


@pytest.mark.parametrize(
    ("content_type", "content_encoding"),
    [(None, None), ("application/json", "utf-8"), ("application/json; charset=utf-8", None),
     ("application/data", "binary"), ("text/plain", "utf-8")],
)
def test_the_usual_labels_of_json_are_accepted(
    content_type: str | None, content_encoding: str | None
) -> None:
    decoded = decode_message(
        json.dumps(CANCEL).encode(), "m", content_type=content_type,
        content_encoding=content_encoding,
    )
    assert isinstance(decoded, CancelTaskCommand)


def test_the_same_message_has_the_same_digest_and_another_does_not() -> None:
    first = rejected(with_params(task_id="1"))
    assert rejected(with_params(task_id="1")).digest == first.digest
    assert rejected(with_params(task_id="2")).digest != first.digest


def test_spaaza_free_text_is_bounded() -> None:
    params = {"provider": "spaaza", "task_id": 1, "trigger": {"once": "2026-12-01T00:00:00Z"},
              "desc": "d" * 5000}
    body = json.dumps({"type": "update-triggers", "params": params}).encode()
    assert "params.desc" in rejected(body).error.message


@pytest.mark.parametrize("field", ["deadline", "once"])
@pytest.mark.parametrize("value", [4102444800, "4102444800", "0" * 80, "2026-12-01", "tomorrow"])
def test_a_time_that_is_not_rfc_3339_is_rejected(field: str, value: object) -> None:
    """pydantic would read a number or digits as Unix seconds; the contract's times are
    RFC 3339 text."""
    params = {"provider": "spaaza", "task_id": 7, "trigger": {"once": "2026-12-01T00:00:00Z"}}
    command: dict[str, Any] = {"type": "update-triggers", "params": params}
    if field == "deadline":
        command["deadline"] = value
    else:
        params["trigger"] = {"once": value}
    assert "RFC 3339" in rejected(json.dumps(command).encode()).error.message


def test_a_message_whose_properties_could_not_be_read_is_rejected_for_them() -> None:
    problem = "the message's AMQP properties could not all be read: header 'x' is …"
    body = json.dumps({**CANCEL, "id": "c-1"}).encode()
    decoded = rejected(body, unreadable=problem)
    assert (decoded.error.code, decoded.error.message) == ("invalid_command", problem)
    assert decoded.fields["command_id"] == "c-1"  # its event goes to the id in its body


def test_the_same_body_with_its_properties_mended_is_another_message() -> None:
    body = json.dumps(CANCEL).encode()
    damaged = rejected(body, unreadable="header 'x' …")
    mended = rejected(body, content_type="application/xml")
    assert damaged.digest != mended.digest
