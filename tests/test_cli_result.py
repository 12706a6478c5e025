"""``command-relay result``: a result read back by command id or key, "still running",
"unknown or expired"; and ``send --wait`` saying it waits, for how long, and where to
look when it gives up."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from worker.idempotency import open_store, tenant_scoped
from worker.sandbox import SandboxServer
from worker.settings import Settings

from .command_line import cli_env, run_cli
from .harness import embedded, running_relay


def test_a_result_is_found_by_id_and_by_key_and_a_duplicate_gets_it_replayed(
    sandbox: SandboxServer, tmp_path: Path
):
    key = f"cancel-{uuid.uuid4()}"
    with running_relay(sandbox, **embedded(tmp_path)) as relay:
        first = relay.send({"type": "cancel-task", "idempotency_key": key,
                            "id": str(uuid.uuid4()), "params": {"task_id": 601}})
        relay.events(1)
        duplicate = relay.send({"type": "cancel-task", "idempotency_key": key,
                                "id": str(uuid.uuid4()), "params": {"task_id": 601}})
        relay.events(1)
        env = cli_env(tmp_path, relay.settings)
        by_id = run_cli("result", first, env=env)
        by_key = run_cli("result", "--key", key, env=env)
        of_duplicate = run_cli("result", duplicate, env=env)
    assert by_id.returncode == 0, by_id.stderr
    event = json.loads(by_id.stdout)
    assert (event["data"]["command_id"], event["data"]["outcome"]) == (first, "succeeded")
    assert by_id.stderr.startswith("succeeded")
    assert by_key.returncode == 0 and json.loads(by_key.stdout)["id"] == event["id"]
    replayed = json.loads(of_duplicate.stdout)["data"]
    assert (replayed["command_id"], replayed["replayed"]) == (duplicate, True)
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"601": 1}


def test_still_running_and_unknown(tmp_path: Path):
    settings = Settings(**embedded(tmp_path))
    command_id, key = str(uuid.uuid4()), f"key-{uuid.uuid4()}"

    async def claim() -> None:
        store = open_store(settings.idempotency_url, 30, 3600)
        try:
            await store.claim(tenant_scoped("default", key), "f" * 64, "host:1234:abc",
                              tenant_scoped("default", command_id))
        finally:
            await store.close()

    asyncio.run(claim())
    env = cli_env(tmp_path, settings)
    running = run_cli("result", command_id, env=env)
    assert running.returncode == 3
    assert running.stdout.startswith("still running") and "host:1234:abc" in running.stdout
    unknown = run_cli("result", str(uuid.uuid4()), env=env)
    assert unknown.returncode == 4 and unknown.stdout.startswith("unknown or expired")
    by_key = run_cli("result", "--key", "no-such-key", env=env)
    assert by_key.returncode == 4


def test_send_wait_says_it_waits_and_how_to_look_the_result_up(tmp_path: Path):
    """No worker runs. The default wait is what the retry schedule may take: made short
    here through the settings it is derived from."""
    env = cli_env(
        tmp_path, Settings(**embedded(tmp_path)),
        RELAY_HTTP_TIMEOUT_S="0.5", RELAY_RETRY_MAX_ATTEMPTS="2",
        RELAY_RETRY_INITIAL_WAIT_S="0.25",
    )
    done = run_cli("send", "cancel-task", "--params", '{"task_id": 7}', "--wait", env=env)
    assert done.returncode == 3, done.stderr
    sent_line, waiting, gave_up = done.stderr.strip().splitlines()
    command_id = sent_line.split()[-1]
    assert waiting.startswith("waiting up to 1.25s for its result")
    assert "may still be running" in gave_up and f"command-relay result {command_id}" in gave_up


def test_the_default_wait_covers_the_retry_schedule():
    rabbitmq = Settings(broker_url="amqp://guest:guest@localhost:5672//")
    in_process = rabbitmq.retry_in_process_s + rabbitmq.http_timeout_s
    deliveries = len(rabbitmq.retry_delays_s) + 1
    assert rabbitmq.result_wait_s >= deliveries * in_process + sum(rabbitmq.retry_delays_s)
    assert rabbitmq.result_wait_s <= rabbitmq.command_timeout_s * deliveries + sum(
        rabbitmq.retry_delays_s
    )
    embedded_broker = Settings(broker_url="sqla+sqlite:///relay.sqlite3")
    calls = embedded_broker.retry_max_attempts * embedded_broker.http_timeout_s
    assert calls <= embedded_broker.result_wait_s <= embedded_broker.command_timeout_s
