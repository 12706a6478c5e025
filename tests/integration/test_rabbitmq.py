"""The contract over a real RabbitMQ, with the Redis idempotency store, published from
pika (an AMQP client other than the worker's) the way an outside playbook would."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.sandbox.worker_setup import demo_commands
from worker.settings import Settings

from ..harness import RunningRelay, running_relay

pytestmark = pytest.mark.integration


def pika_parameters(amqp_url: str) -> pika.URLParameters:
    # kombu spells the default vhost "//"; pika wants it percent-encoded.
    if amqp_url.endswith("//"):
        amqp_url = amqp_url[:-1] + "%2F"
    return pika.URLParameters(amqp_url)


class Playbook:
    """A pika publisher with its own reply queue."""

    def __init__(self, amqp_url: str, relay: RunningRelay) -> None:
        self.settings = relay.settings
        self.connection = pika.BlockingConnection(pika_parameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declared = self.channel.queue_declare("", exclusive=True)
        self.reply_to = declared.method.queue

    def publish(
        self, body: bytes | dict[str, Any], *, exchange: str | None = None, routing_key: str = ""
    ) -> str:
        if isinstance(body, dict):
            routing_key = routing_key or body["type"]
            body = json.dumps(body).encode()
        message_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange=self.settings.command_exchange if exchange is None else exchange,
            routing_key=routing_key or "unknown",
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
                reply_to=self.reply_to,
            ),
            mandatory=True,
        )
        return message_id

    def replies(self, count: int, timeout_s: float = 20.0) -> list[tuple[Any, dict[str, Any]]]:
        received = []
        for method, properties, body in self.channel.consume(
            self.reply_to, inactivity_timeout=timeout_s
        ):
            if method is None:
                break
            self.channel.basic_ack(method.delivery_tag)
            received.append((properties, json.loads(body)))
            if len(received) == count:
                break
        self.channel.cancel()
        assert len(received) == count, f"got {len(received)} of {count} events"
        return received


@pytest.fixture
def relay(sandbox: SandboxServer, amqp_url: str, redis_url: str) -> Iterator[RunningRelay]:
    with running_relay(
        sandbox, broker_url=amqp_url, idempotency_url=redis_url, rate_limit_url=redis_url
    ) as running:
        yield running
    _delete_queues(amqp_url, running)


def _delete_queues(amqp_url: str, relay: RunningRelay) -> None:
    """Quorum queues are Raft clusters: leave none behind to slow the broker down."""
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    channel = connection.channel()
    topology = relay.service.consumer.topology
    for queue in topology.queues:
        channel.queue_delete(queue.name)
    for exchange in (relay.settings.command_exchange, relay.settings.event_exchange):
        channel.exchange_delete(exchange)
    connection.close()


@pytest.fixture
def playbook(amqp_url: str, relay: RunningRelay) -> Iterator[Playbook]:
    client = Playbook(amqp_url, relay)
    yield client
    client.connection.close()


def test_every_command_round_trips_through_rabbitmq(playbook: Playbook):
    sent = {playbook.publish(command) for command in demo_commands()}
    replies = playbook.replies(len(sent))
    assert {properties.correlation_id for properties, _ in replies} == sent
    assert {event["data"]["outcome"] for _, event in replies} == {"succeeded"}
    for properties, event in replies:
        assert properties.content_type == "application/cloudevents+json"
        assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
        assert event["specversion"] == "1.0"


def test_events_are_routed_by_type_and_outcome(playbook: Playbook):
    watch = playbook.channel.queue_declare("", exclusive=True).method.queue
    playbook.channel.queue_bind(watch, playbook.settings.event_exchange, "batch-delete.*")
    playbook.publish({"type": "batch-delete", "params": {"object_uuids": [str(uuid.uuid4())]}})
    playbook.publish({"type": "fetch-patching", "params": {}})
    playbook.replies(2)
    method, _, body = playbook.channel.basic_get(watch, auto_ack=True)
    assert method is not None and method.routing_key == "batch-delete.succeeded"
    assert json.loads(body)["type"] == "relay.batch-delete.succeeded"
    assert playbook.channel.basic_get(watch, auto_ack=True)[0] is None  # not the other one


def test_a_command_sent_straight_to_the_queue_is_processed(playbook: Playbook):
    command = {"type": "cancel-task", "params": {"task_id": 77}}
    playbook.publish(command, exchange="", routing_key=playbook.settings.command_queue)
    ((_, event),) = playbook.replies(1)
    assert event["data"]["outcome"] == "succeeded"


def test_202_and_429_are_handled_over_rabbitmq(playbook: Playbook, sandbox: SandboxServer):
    sandbox.state.faults = Faults(
        script=[ScriptedFault(status=429), ScriptedFault(status=202)]
    )
    playbook.publish({"type": "batch-delete", "params": {"object_uuids": [str(uuid.uuid4())]}})
    ((_, event),) = playbook.replies(1)
    assert event["data"]["outcome"] == "succeeded"
    assert event["data"]["attempts"] == 2
    assert event["data"]["vendor"]["response_id"]


def test_a_duplicate_is_replayed_from_redis_without_a_vendor_call(
    playbook: Playbook, sandbox: SandboxServer
):
    command = {
        "type": "batch-delete",
        "idempotency_key": f"playbook/{uuid.uuid4()}",
        "params": {"object_uuids": [str(uuid.uuid4())]},
    }
    playbook.publish(command)
    playbook.replies(1)
    playbook.publish(command)
    ((_, replay),) = playbook.replies(1)
    assert replay["data"]["replayed"] is True
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 1


def test_a_key_conflict_is_rejected_over_rabbitmq(playbook: Playbook, sandbox: SandboxServer):
    key = f"playbook/{uuid.uuid4()}"
    for _ in range(2):
        playbook.publish({"type": "batch-delete", "idempotency_key": key,
                          "params": {"object_uuids": [str(uuid.uuid4())]}})
    # The conflict is known at once, even while the first is still running.
    outcomes = sorted((e["data"]["outcome"], (e["data"]["error"] or {}).get("code"))
                      for _, e in playbook.replies(2))
    assert outcomes == [("rejected", "idempotency_key_conflict"), ("succeeded", None)]


def test_malformed_message_is_dead_lettered_and_the_next_command_runs(playbook: Playbook):
    bad_id = playbook.publish(b"\xff\xfe not json", routing_key="batch-delete")
    playbook.publish({"type": "fetch-patching", "params": {}})
    replies = {properties.correlation_id: event["data"] for properties, event in
               playbook.replies(2)}
    assert replies[bad_id]["outcome"] == "rejected"
    assert replies[bad_id]["error"]["code"] == "invalid_json"
    assert {d["outcome"] for d in replies.values()} == {"rejected", "succeeded"}
    method, properties, body = playbook.channel.basic_get(
        playbook.settings.dead_letter_queue, auto_ack=True
    )
    assert method is not None
    assert body == b"\xff\xfe not json"
    assert properties.message_id == bad_id
    assert properties.headers["x-relay-error-code"] == "invalid_json"


def test_the_command_queue_is_a_quorum_queue(amqp_url: str, relay: RunningRelay):
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.queue_declare(
            relay.settings.command_queue, durable=True, arguments={"x-queue-type": "classic"}
        )
    assert closed.value.reply_code == 406  # PRECONDITION_FAILED: it is not classic
    connection.close()


@pytest.fixture
def patient_relay(
    sandbox: SandboxServer, amqp_url: str, redis_url: str
) -> Iterator[RunningRelay]:
    """Retries in process for a moment only, then through short delay queues."""
    with running_relay(
        sandbox,
        broker_url=amqp_url,
        idempotency_url=redis_url,
        retry_in_process_s=1.0,
        retry_max_attempts=2,
        retry_delays_s=(0.3, 0.6),
        defer_delay_s=0.2,
    ) as running:
        yield running
    _delete_queues(amqp_url, running)


def test_long_back_off_goes_through_delay_queues(
    patient_relay: RunningRelay, sandbox: SandboxServer
):
    """Four 503s: two in the first delivery, one in each of two delayed retries."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=503)] * 4)
    patient_relay.send({"type": "cancel-task", "params": {"task_id": 5}})
    (event,) = patient_relay.events(1)
    assert event.data.outcome == "succeeded"
    assert event.data.attempts == 5
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"5": 1}


def test_retries_exhausted_give_a_failed_event_and_a_dead_letter(
    patient_relay: RunningRelay, sandbox: SandboxServer
):
    sandbox.state.faults = Faults(script=[ScriptedFault(status=503)] * 6)
    message_id = patient_relay.send({"type": "cancel-task", "params": {"task_id": 6}})
    (event,) = patient_relay.events(1)
    assert event.data.outcome == "failed"
    assert event.data.error is not None
    assert (event.data.error.code, event.data.error.retryable) == ("vendor_unavailable", True)
    assert event.data.attempts == 6
    (kept,) = patient_relay.dead_letters()
    assert kept.properties["message_id"] == message_id


def test_a_duplicate_of_running_work_is_deferred_then_replayed(
    patient_relay: RunningRelay, sandbox: SandboxServer
):
    sandbox.state.faults = Faults(latency_ms=400)
    command = {"type": "cancel-task", "idempotency_key": f"k-{uuid.uuid4()}",
               "params": {"task_id": 8}}
    patient_relay.send(command)
    patient_relay.send(command)
    events = patient_relay.events(2)
    assert sorted(e.data.replayed for e in events) == [False, True]
    assert {e.data.outcome for e in events} == {"succeeded"}
    assert sandbox.state.stats()["calls"]["fylr.cancel"] == 1


def test_a_spoofed_delivery_count_on_a_first_delivery_is_not_trusted(
    patient_relay: RunningRelay, sandbox: SandboxServer
):
    """x-delivery-count counts only on a redelivery: a publisher's own value is ignored."""
    limit = patient_relay.settings.delivery_limit
    body = json.dumps({"type": "cancel-task", "params": {"task_id": 9}}).encode()
    patient_relay.send_raw(body, headers={"x-delivery-count": limit - 1})
    (event,) = patient_relay.events(1)
    assert event.data.outcome == "succeeded"
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"9": 1}


def test_a_message_at_its_delivery_limit_fails_without_a_vendor_call(
    sandbox: SandboxServer, amqp_url: str, redis_url: str
):
    """What a worker sees of a command that crashed workers until the limit: delivered
    and returned (as a dying worker's channel returns it) until the last delivery."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "command_exchange": f"test.commands.{suffix}",
        "command_queue": f"test.commands.{suffix}",
        "event_exchange": f"test.events.{suffix}",
        "dead_letter_queue": f"test.commands.dead.{suffix}",
        "delivery_limit": 4,
    }
    settings = Settings(broker_url=amqp_url, **names)
    topology = Topology.from_settings(settings)
    with CommandClient(amqp_url, topology) as client:
        reply_to = client.reply_queue()
        body = json.dumps({"type": "cancel-task", "params": {"task_id": 10}}).encode()
        message_id = f"at-limit-{suffix}"  # its key too: new each run
        client.publish_raw(body, message_id=message_id, reply_to=reply_to)
        _return_to_queue(amqp_url, topology.command_queue.name, times=3)
        stores = {"broker_url": amqp_url, "idempotency_url": redis_url}
        with running_relay(sandbox, **stores, **names) as relay:
            (reply,) = [r for _, r in zip(range(1), client.events(20), strict=False)]
            (kept,) = relay.dead_letters()
        _delete_queues(amqp_url, relay)
    event = reply.event
    assert event.data.outcome == "failed"
    assert event.data.error is not None and event.data.error.code == "delivery_limit"
    assert "fylr.cancel" not in sandbox.state.stats()["calls"]
    assert kept.properties["message_id"] == message_id


def _return_to_queue(amqp_url: str, queue: str, times: int) -> None:
    """Take the message and give it back unacked, ``times`` times."""
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    channel = connection.channel()
    for _ in range(times):
        give_up_at = time.monotonic() + 10
        method = None
        while method is None:
            assert time.monotonic() < give_up_at, "the message did not come back"
            method, _properties, _body = channel.basic_get(queue)
        channel.basic_reject(method.delivery_tag, requeue=True)
    connection.close()
