"""The contract models and the JSON Schemas checked in beside them."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from schemas import (
    BatchDeleteCommand,
    EsetUpdateTriggersParams,
    UpdateTriggersCommand,
    parse_command,
)
from schemas.export import SCHEMA_DIR, rendered_schemas

OBJECT = "8f5c0000-0000-4000-8000-000000000001"


@pytest.mark.parametrize("name", sorted(rendered_schemas()))
def test_checked_in_json_schema_matches_the_models(name: str):
    """Fails when a model changes without `python -m schemas.export`."""
    assert (SCHEMA_DIR / name).read_text() == rendered_schemas()[name]


def test_vendor_camel_case_is_accepted_and_snake_case_comes_out():
    command = parse_command(
        {"type": "batch-delete", "idempotencyKey": "k", "params": {"objectUuids": [OBJECT]}}
    )
    assert isinstance(command, BatchDeleteCommand)
    dumped = command.model_dump(mode="json")
    assert dumped["idempotency_key"] == "k"
    assert dumped["params"] == {"object_uuids": [OBJECT]}


def test_update_triggers_defaults_to_eset():
    command = parse_command(
        {"type": "update-triggers",
         "params": {"taskUuid": OBJECT, "triggers": [{"manual": {"expireTime": None}}]}}
    )
    assert isinstance(command, UpdateTriggersCommand)
    assert isinstance(command.params, EsetUpdateTriggersParams)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"task_uuid": OBJECT, "triggers": []}, "triggers"),
        ({"task_uuid": "not-a-uuid", "triggers": [{"manual": {}}]}, "task_uuid"),
        ({"provider": "spaaza", "task_id": 1, "trigger": {"once": "tomorrow"}}, "once"),
        ({"provider": "spaaza", "task_id": 1, "trigger": {"once": "2026-12-01T00:00:00Z",
                                                          "repeat": "hourly"}}, "repeat"),
        ({"provider": "other", "task_uuid": OBJECT}, "provider"),
    ],
)
def test_invalid_update_triggers_params_name_the_field(params: dict[str, object], field: str):
    with pytest.raises(ValidationError) as raised:
        parse_command({"type": "update-triggers", "params": params})
    assert field in str(raised.value)


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="host"):
        parse_command({"type": "cancel-task", "params": {"task_id": 1},
                       "host": "https://evil.example"})


def test_a_naive_deadline_is_refused():
    """A deadline without a time zone would be read differently by each replica."""
    with pytest.raises(ValidationError, match="deadline"):
        parse_command({"type": "fetch-patching", "params": {}, "deadline": "2026-11-22T17:00:00"})


def test_id_defaults_to_the_message_id_and_the_key_to_the_id():
    command = parse_command({"type": "fetch-patching", "params": {}}).with_defaults("m-1")
    assert (command.command_id, command.key) == ("m-1", "m-1")
    generated = parse_command({"type": "fetch-patching", "params": {}}).with_defaults(None)
    assert uuid.UUID(generated.command_id)
