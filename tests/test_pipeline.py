"""End to end on the embedded broker: commands in, result events out, against the sandbox."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.sandbox.worker_setup import demo_commands

from .harness import RunningRelay, embedded, running_relay


@pytest.fixture
def relay(sandbox: SandboxServer, data_dir: Path) -> Iterator[RunningRelay]:
    with running_relay(
        sandbox,
        **embedded(data_dir),
    ) as running:
        yield running


def batch_delete(key: str | None = None, objects: int = 1) -> dict[str, Any]:
    command_id = str(uuid.uuid4())
    return {
        "type": "batch-delete",
        "id": command_id,
        "idempotency_key": key or command_id,
        "params": {"object_uuids": [str(uuid.uuid4()) for _ in range(objects)]},
    }


def test_every_command_succeeds_against_the_sandbox(relay: RunningRelay, sandbox: SandboxServer):
    commands = demo_commands()
    for command in commands:
        relay.send(command)
    events = {e.data.command_id: e for e in relay.events(len(commands))}
    assert {e.data.outcome for e in events.values()} == {"succeeded"}
    assert set(events) == {c["id"] for c in commands}
    effects = sandbox.state.stats()["effects"]
    assert set(effects) >= {"eset.update_task_triggers", "spaaza.update_task",
                            "eset.batch_delete", "fylr.cancel"}


def test_event_follows_the_cloudevents_contract(relay: RunningRelay):
    command = batch_delete()
    relay.send(command)
    (event,) = relay.events(1)
    assert event.specversion == "1.0"
    assert event.type == "relay.batch-delete.succeeded"
    assert event.subject == command["id"]
    assert event.data.idempotency_key == command["idempotency_key"]
    assert event.data.vendor is not None and event.data.vendor.request_id


def test_a_202_answer_is_collected_and_reported(relay: RunningRelay, sandbox: SandboxServer):
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])
    command = batch_delete()
    relay.send(command)
    (event,) = relay.events(1)
    assert event.data.outcome == "succeeded"
    assert event.data.vendor is not None and event.data.vendor.response_id
    assert sandbox.state.stats()["collects"] >= 1
    deleted = command["params"]["object_uuids"][0]
    assert sandbox.state.stats()["effects"]["eset.batch_delete"][deleted] == 1


def test_a_429_is_retried_and_counted(relay: RunningRelay, sandbox: SandboxServer):
    sandbox.state.faults = Faults(script=[ScriptedFault(status=429)])
    relay.send(batch_delete())
    (event,) = relay.events(1)
    assert (event.data.outcome, event.data.attempts) == ("succeeded", 2)


def test_a_404_fails_without_retry(relay: RunningRelay, sandbox: SandboxServer):
    sandbox.state.faults = Faults(script=[ScriptedFault(status=404)])
    relay.send(batch_delete())
    (event,) = relay.events(1)
    assert event.data.outcome == "failed"
    assert event.data.error is not None
    assert (event.data.error.code, event.data.error.vendor_status) == ("vendor_rejected", 404)
    assert event.data.attempts == 1
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 1


def test_a_duplicate_key_replays_the_stored_event_without_a_vendor_call(
    relay: RunningRelay, sandbox: SandboxServer
):
    first = batch_delete(key="playbook-1/alert-1/delete")
    relay.send(first)
    (original,) = relay.events(1)
    duplicate = {**first, "id": str(uuid.uuid4())}
    relay.send(duplicate)
    (replay,) = relay.events(1)
    assert replay.data.replayed and not original.data.replayed
    assert replay.data.command_id == duplicate["id"]
    assert replay.data.vendor == original.data.vendor
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 1


def test_a_key_reused_for_other_work_is_rejected(relay: RunningRelay, sandbox: SandboxServer):
    relay.send(batch_delete(key="shared-key"))
    relay.events(1)
    relay.send(batch_delete(key="shared-key"))  # other objects under the same key
    (event,) = relay.events(1)
    assert event.data.outcome == "rejected"
    assert event.data.error is not None and event.data.error.code == "idempotency_key_conflict"
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 1


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b"{not json", "invalid_json", "not UTF-8 JSON"),
        (b"[1, 2]", "invalid_command", "JSON object"),
        (b'{"type": "reboot-everything", "params": {}}', "unknown_type", "reboot-everything"),
        (b'{"type": "batch-delete", "params": {"object_uuids": []}}', "invalid_command",
         "params.object_uuids"),
        (b'{"type": "cancel-task", "params": {"task_id": "x"}}', "invalid_command",
         "params.task_id"),
        (b'{"type": "cancel-task", "tenant": "nobody", "params": {"task_id": 1}}',
         "unknown_tenant", "nobody"),
        (b'{"type": "cancel-task", "deadline": "2020-01-01T00:00:00Z", "params": {"task_id": 1}}',
         "deadline_passed", "deadline"),
    ],
)
def test_bad_input_is_rejected_dead_lettered_and_the_next_command_still_runs(
    relay: RunningRelay, body: bytes, code: str, mentions: str
):
    message_id = relay.send_raw(body)
    relay.send(batch_delete())
    rejected, succeeded = relay.events(2)
    assert rejected.data.outcome == "rejected"
    assert rejected.data.error is not None
    assert rejected.data.error.code == code
    assert mentions in rejected.data.error.message
    assert succeeded.data.outcome == "succeeded"
    (kept,) = relay.dead_letters()
    assert kept.body == body
    assert kept.properties["message_id"] == message_id
    assert kept.headers["x-relay-error-code"] == code


def test_camel_case_params_are_accepted(relay: RunningRelay):
    command = {"type": "batch-delete", "params": {"objectUuids": [str(uuid.uuid4())]}}
    relay.send_raw(json.dumps(command).encode())
    (event,) = relay.events(1)
    assert event.data.outcome == "succeeded"


def test_the_message_id_becomes_the_command_id(relay: RunningRelay):
    command = {"type": "fetch-patching", "params": {}}
    message_id = relay.send_raw(json.dumps(command).encode())
    (event,) = relay.events(1)
    assert event.data.command_id == message_id == event.subject


def test_quarantine_in_japan_is_rejected_without_a_call(
    sandbox: SandboxServer, data_dir: Path
):
    from worker.sandbox.worker_setup import sandbox_tenant

    tenant = sandbox_tenant(sandbox.base_url, sandbox.state.config)
    assert tenant.eset is not None
    japan = tenant.model_copy(update={"eset": tenant.eset.model_copy(update={"region": "jpn"})})
    with running_relay(
        sandbox,
        **embedded(data_dir, tenants={"default": tenant, "tokyo": japan}),
    ) as relay:
        relay.send({**batch_delete(), "tenant": "tokyo"})
        (event,) = relay.events(1)
    assert event.data.outcome == "rejected"
    assert event.data.error is not None and event.data.error.code == "region_not_supported"
    assert "eset.batch_delete" not in sandbox.state.stats()["calls"]


def test_stopping_lets_in_flight_commands_finish(relay: RunningRelay, sandbox: SandboxServer):
    """What SIGTERM does: no new work, in-flight work finishes and is published."""
    sandbox.state.faults = Faults(latency_ms=600)
    commands = [batch_delete() for _ in range(3)]
    for command in commands:
        relay.send(command)
    deadline = time.monotonic() + 10
    while "eset.token" not in sandbox.state.stats()["calls"] and time.monotonic() < deadline:
        time.sleep(0.01)  # logged in: the three calls are on their way (600 ms each)
    time.sleep(0.1)
    assert "eset.batch_delete" not in sandbox.state.stats()["calls"]  # still in flight
    relay.stop()
    events = relay.events(3)
    assert {e.data.outcome for e in events} == {"succeeded"}
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 3


def test_a_mutation_whose_holder_died_after_sending_fails_as_result_lost(
    sandbox: SandboxServer, data_dir: Path
):
    """Taking over a dead holder's claim never sends the mutation a second time."""
    import asyncio

    from schemas import parse_command
    from worker.idempotency import claim_key, fingerprint, open_store

    command = batch_delete(key="key-of-a-dead-holder")
    idempotency_url = f"sqlite:///{data_dir / 'idempotency.sqlite3'}"

    async def die_after_sending() -> None:
        store = open_store(idempotency_url, lease_s=0.2, retention_s=60)
        parsed = parse_command(command)
        await store.claim(claim_key(parsed), fingerprint(parsed), "dead-replica")
        await store.mark_sent(claim_key(parsed), "dead-replica")
        await store.close()

    asyncio.run(die_after_sending())
    time.sleep(0.3)  # the dead replica's lease runs out
    with running_relay(
        sandbox,
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.sqlite3'}",
        idempotency_url=idempotency_url,
        claim_lease_s=0.2,
    ) as relay:
        relay.send(command)
        (event,) = relay.events(1)
    assert event.data.outcome == "failed"
    assert event.data.error is not None and event.data.error.code == "result_lost"
    assert "eset.batch_delete" not in sandbox.state.stats()["calls"]
