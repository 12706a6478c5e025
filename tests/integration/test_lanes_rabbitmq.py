"""Lanes over a real RabbitMQ with Redis: isolation between accounts, the lanes' queue
arguments, and a shutdown that finishes what is in flight."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pika
import pytest

from worker.broker.topology import SAFE_DEAD_LETTERING
from worker.sandbox import Faults, SandboxServer

from ..harness import RunningRelay, running_relay
from ..lanes import FLOOD, batch_delete, flood_and_quiet, quiet_answered_during_the_flood
from .test_rabbitmq import _delete_queues, pika_parameters

pytestmark = pytest.mark.integration


@pytest.fixture
def relay(sandbox: SandboxServer, amqp_url: str, redis_url: str) -> Iterator[RunningRelay]:
    stores = {"idempotency_url": redis_url, "rate_limit_url": redis_url}
    with running_relay(
        sandbox, broker_url=amqp_url, **stores, **flood_and_quiet(sandbox)
    ) as running:
        yield running
    _delete_queues(amqp_url, running)


def test_a_flooded_accounts_backlog_waits_in_its_lane_on_the_broker(
    amqp_url: str, relay: RunningRelay
):
    answered_flood, _ = quiet_answered_during_the_flood(relay)
    assert answered_flood < FLOOD // 2
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    lane = relay.service.consumer.topology.lanes[("eset", "flood")].queue.name
    waiting = connection.channel().queue_declare(lane, passive=True).method.message_count
    connection.close()
    # The rest of the flood waits in the lane, not in a replica (it holds its prefetch).
    assert waiting >= FLOOD - answered_flood - 2 * relay.settings.concurrency


def test_a_lane_is_a_quorum_queue_dead_lettering_like_the_command_queue(
    amqp_url: str, relay: RunningRelay
):
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    lane = relay.service.consumer.topology.lanes[("eset", "quiet")].queue.name
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": relay.settings.delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": relay.settings.dead_letter_queue,
        **SAFE_DEAD_LETTERING,
    }
    # Declaring a queue again with other arguments is refused (406): these are its own.
    connection.channel().queue_declare(lane, durable=True, arguments=arguments)
    connection.close()


def test_stopping_lets_laned_commands_in_flight_finish(
    relay: RunningRelay, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
):
    """What SIGTERM does over RabbitMQ: the consumers are cancelled (the broker answers
    on a socket the loop watched), in-flight work finishes and is published."""
    sandbox.state.faults = Faults(latency_ms=600)
    for _ in range(3):
        relay.send(batch_delete("quiet"))
    deadline = time.monotonic() + 10
    while "eset.token" not in sandbox.state.stats()["calls"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="worker.broker.consumer"):
        relay.stop()
    assert {e.data.outcome for e in relay.events(3)} == {"succeeded"}
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 3


def test_an_idle_worker_stops_without_losing_its_connection(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="worker.broker.consumer"):
        relay.stop()
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
