"""What a return costs a command on RabbitMQ's quorum queues, pinned on the broker CI runs.

On RabbitMQ 3.10 every way a delivery goes back to its queue counts as a delivery: a
reject or nack with requeue, a channel closed with it unacked, a recover. Each raises the
message's ``x-delivery-count``, and past ``x-delivery-limit`` the broker dead-letters it.
So a replica that gives back work it can not start (its store is away) must not requeue
it: it publishes a copy to the back of the queue and acks the original, which the broker
counts as no delivery at all (``worker/broker/publisher.py``, ``give_back``). If an
upgrade changes either fact, these tests say so before an outage dead-letters commands.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pika
import pika.exceptions
import pytest

pytestmark = pytest.mark.integration

LIMIT = 2  # x-delivery-limit: the broker dead-letters once a message's count passes it
GET_TIMEOUT_S = 10.0


def _parameters(amqp_url: str) -> pika.URLParameters:
    # kombu spells the default vhost "//"; pika wants it percent-encoded.
    if amqp_url.endswith("//"):
        amqp_url = amqp_url[:-1] + "%2F"
    return pika.URLParameters(amqp_url)


class QuorumQueue:
    """A quorum queue with a delivery limit and its dead-letter queue, deleted after."""

    def __init__(self, amqp_url: str, channel: Any) -> None:
        self.amqp_url = amqp_url
        self.channel = channel
        suffix = uuid.uuid4().hex[:8]
        self.name, self.dead = f"test.returns.{suffix}", f"test.returns.dead.{suffix}"
        channel.queue_declare(self.dead, durable=True)
        channel.queue_declare(self.name, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead,
        })
        channel.confirm_delivery()

    def publish(self, body: bytes, headers: dict[str, Any] | None = None) -> None:
        properties = pika.BasicProperties(delivery_mode=2, headers=headers)
        self.channel.basic_publish("", self.name, body, properties, mandatory=True)

    def depth(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    @contextmanager
    def taken(self) -> Iterator[tuple[Any, Any, Any, bytes]]:
        """The message, on a connection of its own (closed on exit): its channel, the
        delivery, its properties and body; None for the delivery when none came."""
        connection = pika.BlockingConnection(_parameters(self.amqp_url))
        try:
            channel = connection.channel()
            give_up_at = time.monotonic() + GET_TIMEOUT_S
            method, properties, body = channel.basic_get(self.name, auto_ack=False)
            while method is None and time.monotonic() < give_up_at:
                time.sleep(0.05)
                method, properties, body = channel.basic_get(self.name, auto_ack=False)
            yield channel, method, properties, body
        finally:
            with suppress(*CONNECTION_ERRORS):
                connection.close()


CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)

Return = Callable[[Any, Any], None]
RETURNS: dict[str, Return] = {
    "reject with requeue": lambda channel, method: channel.basic_reject(
        method.delivery_tag, requeue=True
    ),
    "nack with requeue": lambda channel, method: channel.basic_nack(
        method.delivery_tag, requeue=True
    ),
    "recover with requeue": lambda channel, method: channel.basic_recover(requeue=True),
    "channel closed unacked": lambda channel, method: channel.close(),
}


@pytest.fixture
def queue(amqp_url: str) -> Iterator[QuorumQueue]:
    connection = pika.BlockingConnection(_parameters(amqp_url))
    channel = connection.channel()
    declared = QuorumQueue(amqp_url, channel)
    try:
        yield declared
    finally:
        with suppress(*CONNECTION_ERRORS):
            channel.queue_delete(declared.name)
            channel.queue_delete(declared.dead)
            connection.close()


@pytest.mark.parametrize("give_back", RETURNS.values(), ids=RETURNS.keys())
def test_every_return_of_a_delivery_counts_towards_the_delivery_limit(
    queue: QuorumQueue, give_back: Return
):
    queue.publish(b"returned")
    counts = []
    for _ in range(LIMIT + 1):  # the deliveries the limit allows
        with queue.taken() as (channel, method, properties, _):
            assert method is not None, f"gone after {counts}"
            counts.append((properties.headers or {}).get("x-delivery-count", 0))
            give_back(channel, method)
    assert counts == list(range(LIMIT + 1))
    assert queue.depth(queue.name) == 0
    assert _eventually(lambda: queue.depth(queue.dead) == 1), "not dead-lettered"


def test_a_copy_published_back_and_the_original_acked_counts_no_delivery(queue: QuorumQueue):
    """The worker's give-back: however often, the copy is a first delivery again and is
    never dead-lettered."""
    queue.publish(b"given back")
    for _ in range(LIMIT + 3):
        with queue.taken() as (channel, method, properties, body):
            assert method is not None
            assert not method.redelivered
            assert (properties.headers or {}).get("x-delivery-count", 0) == 0
            channel.confirm_delivery()
            channel.basic_publish("", queue.name, body, pika.BasicProperties(delivery_mode=2))
            channel.basic_ack(method.delivery_tag)
    assert queue.depth(queue.name) == 1
    assert queue.depth(queue.dead) == 0


def _eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Dead-lettering is at-least-once and asynchronous: give it a moment."""
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= give_up_at:
            return False
        time.sleep(0.05)
    return True
