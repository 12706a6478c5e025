"""``command-relay dlq …`` on RabbitMQ: the scenario of ``tests/test_dlq.py``, and a
message RabbitMQ dead-lettered itself (no headers of ours, an ``x-death`` instead).

Each test has queues of its own (unique names) and deletes them afterwards."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pika
import pytest

from worker.sandbox import SandboxServer
from worker.settings import Settings

from ..command_line import cli_env, json_lines, run_cli
from ..harness import running_relay
from ..test_dlq import dead_letters_kept_and_replayed
from .test_rabbitmq import _delete_queues, pika_parameters

pytestmark = pytest.mark.integration


def test_dead_letters_on_rabbitmq(sandbox: SandboxServer, amqp_url: str, tmp_path: Path):
    with running_relay(
        sandbox, broker_url=amqp_url,
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
    ) as relay:
        try:
            dead_letters_kept_and_replayed(sandbox, relay, tmp_path)
        finally:
            relay.stop()
            _delete_queues(amqp_url, relay)


def test_a_message_rabbitmq_dead_lettered_itself(amqp_url: str, tmp_path: Path):
    """Rejected without requeue from the command queue (as the consumer does when settling
    fails): RabbitMQ moves it with an x-death header, which says why and since when."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        broker_url=amqp_url, command_exchange=f"test.commands.{suffix}",
        command_queue=f"test.commands.{suffix}", event_exchange=f"test.events.{suffix}",
        dead_letter_queue=f"test.commands.dead.{suffix}",
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
    )
    env = cli_env(tmp_path, settings)
    assert run_cli("dlq", "list", env=env).returncode == 0  # declares the dead-letter queue
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    channel = connection.channel()
    try:
        channel.queue_declare(settings.command_queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": settings.dead_letter_queue,
        })
        body = {"type": "cancel-task", "id": f"poison-{suffix}", "params": {"task_id": 9}}
        channel.basic_publish("", settings.command_queue, json.dumps(body).encode(),
                              pika.BasicProperties(content_type="application/json"))
        method = None
        while method is None:
            method, _, _ = channel.basic_get(settings.command_queue)
        channel.basic_reject(method.delivery_tag, requeue=False)

        (letter,) = json_lines(run_cli("dlq", "list", "--json", env=env).stdout)
        assert (letter["command_id"], letter["type"]) == (f"poison-{suffix}", "cancel-task")
        assert letter["reason"] == "dead-lettered by the broker (rejected)"
        assert letter["dead_lettered_at"] is not None and letter["error_code"] is None
        purged = run_cli("dlq", "purge", "--yes", env=env)
        assert purged.returncode == 0 and "purged 1 message(s)" in purged.stdout
    finally:
        for queue in (settings.command_queue, settings.dead_letter_queue):
            channel.queue_delete(queue)
        connection.close()
