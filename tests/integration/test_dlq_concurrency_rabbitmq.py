"""Two ``command-relay dlq`` commands at the same moment on RabbitMQ, with a worker
running: the scenarios of ``tests/test_dlq_concurrency.py``.

Each test has queues of its own (unique names) and deletes them afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest

from worker.admin.deadletters import DeadLetterQueue, Verdict
from worker.sandbox import SandboxServer
from worker.settings import Settings

from ..harness import RunningRelay, running_relay
from ..test_dlq_concurrency import (
    PAIRS,
    a_command_gives_up_waiting,
    a_second_command_waits_for_the_first,
    copy_of_a_replayed_letter,
    the_lock_of_a_killed_command_goes_with_it,
    two_replays_of_one_letter,
    two_verbs_at_once,
)
from .test_rabbitmq import _delete_queues, pika_parameters

pytestmark = pytest.mark.integration
LETTERS = 60  # a pass on RabbitMQ is quicker than on the embedded broker: more to overlap


@contextmanager
def rabbitmq_relay(sandbox: SandboxServer, amqp_url: str, data_dir: Path) -> Iterator[RunningRelay]:
    with running_relay(
        sandbox, broker_url=amqp_url,
        idempotency_url=f"sqlite:///{data_dir / 'idempotency.sqlite3'}",
    ) as relay:
        try:
            yield relay
        finally:
            relay.stop()
            _delete_queues(amqp_url, relay)


@pytest.mark.parametrize("verbs", PAIRS, ids="+".join)
def test_two_dlq_commands_at_once(
    sandbox: SandboxServer, amqp_url: str, tmp_path: Path, verbs: tuple[str, str]
) -> None:
    with rabbitmq_relay(sandbox, amqp_url, tmp_path) as relay:
        two_verbs_at_once(sandbox, relay, tmp_path, verbs, LETTERS)


def test_two_replays_of_one_letter_call_its_vendor_once(
    sandbox: SandboxServer, amqp_url: str, tmp_path: Path
) -> None:
    with rabbitmq_relay(sandbox, amqp_url, tmp_path) as relay:
        two_replays_of_one_letter(sandbox, relay, tmp_path)


def test_a_copy_of_a_replayed_letter_is_refused(
    sandbox: SandboxServer, amqp_url: str, tmp_path: Path
) -> None:
    with rabbitmq_relay(sandbox, amqp_url, tmp_path) as relay:
        copy_of_a_replayed_letter(sandbox, relay, tmp_path)


@pytest.fixture
def queue_settings(amqp_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings naming a dead-letter queue of this test's own, deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    yield Settings(
        broker_url=amqp_url, command_queue=f"test.commands.{suffix}",
        command_exchange=f"test.commands.{suffix}", event_exchange=f"test.events.{suffix}",
        dead_letter_queue=f"test.commands.dead.{suffix}",
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
    )
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    connection.channel().queue_delete(f"test.commands.dead.{suffix}")
    connection.close()


def test_a_second_command_waits_for_the_first(queue_settings: Settings, tmp_path: Path):
    a_second_command_waits_for_the_first(queue_settings, tmp_path)


def test_a_command_gives_up_waiting_after_its_lock_timeout(
    queue_settings: Settings, tmp_path: Path
):
    a_command_gives_up_waiting(queue_settings, tmp_path)


def test_the_lock_of_a_killed_command_goes_with_it(queue_settings: Settings, tmp_path: Path):
    the_lock_of_a_killed_command_goes_with_it(queue_settings, tmp_path)


def test_a_letter_rabbitmq_dead_lettered_in_the_second_a_pass_began_is_left_alone(
    queue_settings: Settings, amqp_url: str
):
    """RabbitMQ's x-death time has whole seconds: a letter of the second a command began
    may be later than its start, so a pass acting on older letters only leaves it be."""
    second = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    with DeadLetterQueue(queue_settings) as queue:
        queue.count()  # declares it
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    connection.channel().basic_publish(
        "", queue_settings.dead_letter_queue,
        b'{"type": "cancel-task", "id": "dead", "params": {"task_id": 1}}',
        pika.BasicProperties(content_type="application/json", headers={"x-death": [{
            "reason": "rejected", "queue": queue_settings.command_queue, "count": 1,
            "time": second.replace(tzinfo=None),
        }]}),
    )
    connection.close()

    def drop(letter: object) -> Verdict:
        return Verdict.DROP

    with DeadLetterQueue(queue_settings) as queue:
        within = queue.walk(drop, since=second + timedelta(seconds=0.5))
        after = queue.walk(drop, since=second + timedelta(seconds=1))
    assert (within.later, len(within.dropped)) == (1, 0)
    assert (after.later, len(after.dropped)) == (0, 1)
