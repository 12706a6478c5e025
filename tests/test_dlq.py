"""``command-relay dlq list | show | replay | purge`` through the real command line, on the
embedded broker (``tests/integration/test_dlq_rabbitmq.py`` runs the same on RabbitMQ)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kombu import Producer

from schemas.commands import parse_command
from schemas.events import ErrorCode, ErrorInfo
from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.idempotency import claim_key, command_ref, fingerprint, open_store
from worker.results import now, result_event
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.settings import Settings

from .command_line import cli_env, json_lines, run_cli
from .harness import RunningRelay, running_relay


def put_dead_letter(
    settings: Settings, command: dict[str, Any], headers: dict[str, Any],
    reply_to: str | None = None,
) -> None:
    """A message in the dead-letter queue, as the worker would have kept it."""
    queue = Topology.from_settings(settings).dead_letter_queue
    with connect(settings.broker_url) as connection:
        channel = connection.channel()
        queue.bind(channel).declare()
        Producer(channel).publish(
            json.dumps(command).encode(), exchange="", routing_key=queue.name,
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
            message_id=command["id"], reply_to=reply_to, headers=headers, retry=False,
        )


def store_result_lost(settings: Settings, command: dict[str, Any]) -> None:
    """The store's record of a command whose worker died after sending it."""
    parsed = parse_command(command).with_defaults(command["id"])
    event = result_event(
        command_id=parsed.command_id, idempotency_key=parsed.key, command_type=parsed.type,
        tenant=parsed.tenant, outcome="failed", started_at=now(),
        error=ErrorInfo(code=ErrorCode.RESULT_LOST, message="the worker stopped"),
    )

    async def store_it() -> None:
        store = open_store(settings.idempotency_url, 30, 3600)
        try:
            await store.claim(claim_key(parsed), fingerprint(parsed), "dead-worker",
                              command_ref(parsed))
            await store.complete(claim_key(parsed), "dead-worker", event, command_ref(parsed))
        finally:
            await store.close()

    asyncio.run(store_it())


def listed(env: dict[str, str], *filters: str) -> list[dict[str, Any]]:
    done = run_cli("dlq", "list", "--json", *filters, env=env)
    assert done.returncode == 0, done.stderr
    return json_lines(done.stdout)


def dead_letters_kept_and_replayed(sandbox: SandboxServer, relay: RunningRelay,
                                   data_dir: Path) -> None:
    """The scenario both brokers run: a failed, a rejected and an invalid command, and a
    result_lost one, listed, filtered, shown, replayed and purged."""
    env = cli_env(data_dir, relay.settings)
    run_id = uuid.uuid4().hex[:8]
    failed, unknown, invalid, lost = (f"{kind}-{run_id}" for kind in
                                      ("failed", "unknown", "invalid", "lost"))
    sandbox.state.faults = Faults(script=[ScriptedFault(status=400, path_contains="cancel")])
    relay.send({"type": "cancel-task", "id": failed, "params": {"task_id": 501}})
    relay.send({"type": "cancel-task", "id": unknown, "tenant": "Nobody",
                "params": {"task_id": 502}})
    relay.send({"type": "cancel-task", "id": invalid, "params": {"task_id": "12"}})
    assert {e.data.command_id: e.data.error.code for e in relay.events(3) if e.data.error} == {
        failed: "vendor_rejected", unknown: "unknown_tenant", invalid: "invalid_command"
    }
    lost_command = {"type": "cancel-task", "id": lost, "params": {"task_id": 503}}
    store_result_lost(relay.settings, lost_command)
    put_dead_letter(relay.settings, lost_command, {
        "x-relay-error-code": "result_lost", "x-relay-reason": "failed",
        "x-relay-dead-lettered-at": time.time(),
    }, reply_to=relay.reply_to)

    # list: every one, with its id, type, tenant, code, reason and age; then the filters
    table = run_cli("dlq", "list", env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split("\n")[0].split() == ["ID", "TYPE", "TENANT", "CODE", "AGE",
                                                   "REASON"]
    assert "4 of 4 message(s)" in table.stderr
    letters = {letter["command_id"]: letter for letter in listed(env)}
    assert set(letters) == {failed, unknown, invalid, lost}
    assert (letters[failed]["type"], letters[failed]["tenant"], letters[failed]["error_code"]) \
        == ("cancel-task", "default", "vendor_rejected")
    assert "fylr refused the request with 400" in letters[failed]["reason"]
    assert letters[unknown]["reason"].startswith("tenant 'Nobody' is not configured")
    for letter in letters.values():
        age_s = (datetime.now(UTC) - datetime.fromisoformat(letter["dead_lettered_at"]))
        assert 0 <= age_s.total_seconds() < 120
    assert [x["command_id"] for x in listed(env, "--tenant", "NOBODY", "--code",
                                            "unknown_tenant")] == [unknown]
    assert listed(env, "--older-than", "1h") == []
    again = listed(env, "--type", "cancel-task", "--newer-than", "1h")
    assert [x["command_id"] for x in again] == list(letters), "left as it was, in order"

    # show: the message in full, and the outcome the store keeps for it
    shown = json.loads(run_cli("dlq", "show", failed, env=env).stdout)
    assert shown["headers"]["x-relay-error-code"] == "vendor_rejected"
    assert shown["body"] == {"type": "cancel-task", "id": failed, "params": {"task_id": 501}}
    (stored,) = shown["stored_outcomes"]
    assert (stored["key"], stored["event"]["data"]["outcome"]) == (f"default/{failed}", "failed")

    # replay: the failure is released, and the new attempt succeeds
    replayed = run_cli("dlq", "replay", failed, env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {failed} (cancel-task, vendor_rejected)" in replayed.stdout
    (event,) = relay.events(1)
    assert (event.data.command_id, event.data.outcome, event.data.replayed) == (
        failed, "succeeded", False
    )

    # result_lost: refused, kept; replayed when forced
    refused = run_cli("dlq", "replay", lost, env=env)
    assert refused.returncode == 1
    assert f"refused {lost}: result_lost" in refused.stdout and "--force" in refused.stdout
    forced = run_cli("dlq", "replay", "--code", "result_lost", "--force", env=env)
    assert forced.returncode == 0 and f"replayed {lost}" in forced.stdout
    (event,) = relay.events(1)
    assert (event.data.command_id, event.data.outcome) == (lost, "succeeded")
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"501": 1, "503": 1}

    # purge: asks first; drops what is chosen, then everything
    assert {x["command_id"] for x in listed(env)} == {unknown, invalid}
    unconfirmed = run_cli("dlq", "purge", env=env)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    purged = run_cli("dlq", "purge", "--code", "invalid_command", "--yes", env=env)
    assert purged.returncode == 0 and "purged 1 message(s)" in purged.stdout
    everything = run_cli("dlq", "purge", "--yes", env=env)
    assert everything.returncode == 0 and "purged 1 message(s)" in everything.stdout
    assert listed(env) == []


def test_dead_letters_on_the_embedded_broker(sandbox: SandboxServer, tmp_path: Path):
    with running_relay(
        sandbox,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
    ) as relay:
        dead_letters_kept_and_replayed(sandbox, relay, tmp_path)


def test_a_long_pass_shows_progress_and_keeps_every_message_in_order(tmp_path: Path):
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
                        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}")
    ids = [f"m-{i:02d}" for i in range(12)]
    for number, command_id in enumerate(ids):
        put_dead_letter(settings, {"type": "cancel-task", "id": command_id,
                                   "tenant": "odd" if number % 2 else "even",
                                   "params": {"task_id": number + 1}},
                        {"x-relay-error-code": "unknown_tenant"})
    env = cli_env(tmp_path, settings)
    done = run_cli("dlq", "list", env=env)
    assert done.returncode == 0
    assert "reading the dead-letter queue" in done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ids
    purged = run_cli("dlq", "purge", "--tenant", "odd", "--yes", env=env)
    assert "purging" in purged.stderr and "purged 6 message(s)" in purged.stdout
    assert [x["command_id"] for x in listed(env)] == ids[::2]
