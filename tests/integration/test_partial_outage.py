"""A replica cut off from its store (the others may still reach it) gives back the
deliveries it has not started and takes no more until the store answers again, on the
embedded broker and on RabbitMQ; what it gives back never uses up a delivery limit.

The worker's idempotency store is a real Redis reached through a TCP proxy
(``tests/tcp_proxy.py``) that the test cuts: only this worker loses it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pika
import pika.exceptions
import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.idempotency import tenant_scoped
from worker.idempotency.redis import KEY_PREFIX
from worker.ops.telemetry import Telemetry
from worker.sandbox import SandboxServer
from worker.settings import Settings

from ..harness import RunningRelay, running_relay
from ..tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

WAIT_S = 30.0  # for what must happen; generous, so that a loaded machine does not fail it


class Store:
    """The worker's Redis behind a proxy the test cuts."""

    def __init__(self, redis_url: str, proxy: TcpProxy) -> None:
        self.redis_url = redis_url
        self.proxy = proxy
        parsed = urlparse(redis_url)
        self.url = parsed._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()

    def cut(self) -> None:
        self.proxy.cut()

    def restore(self) -> None:
        self.proxy.restore()

    def field(self, key: str, name: str) -> str | None:
        """A field of the claim of the default tenant's ``key``, read past the proxy."""
        with redis.Redis.from_url(self.redis_url) as client:
            value = client.hget(KEY_PREFIX + tenant_scoped("default", key), name)
        return value.decode() if isinstance(value, bytes) else None


@pytest.fixture
def store(redis_url: str) -> Iterator[Store]:
    parsed = urlparse(redis_url)
    with TcpProxy(parsed.hostname or "localhost", parsed.port or 6379) as proxy:
        yield Store(redis_url, proxy)


@pytest.fixture(params=["embedded", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "embedded":
        return f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    return str(request.getfixturevalue("amqp_url"))


class Traced:
    """The worker's spans, as it ends them."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.telemetry = Telemetry.using(provider)

    def outcomes(self) -> list[str]:
        """The outcome of each delivery settled so far (``given_back`` among them)."""
        return [str(span.attributes.get("relay.outcome")) for span in self._deliveries()]

    def _deliveries(self) -> list[ReadableSpan]:
        return [
            span for span in self.exporter.get_finished_spans()
            if span.name.startswith("process ") and span.attributes is not None
        ]


def names(**overrides: Any) -> dict[str, Any]:
    """Queue and exchange names of their own, for workers that share them."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "command_exchange": f"test.commands.{suffix}",
        "command_queue": f"test.commands.{suffix}",
        "event_exchange": f"test.events.{suffix}",
        "dead_letter_queue": f"test.commands.dead.{suffix}",
        "lane_queue_prefix": f"test.lane.{suffix}.",
        **overrides,
    }


@contextmanager
def relay_cut_off(
    sandbox: SandboxServer, store: Store, broker_url: str, traced: Traced | None = None,
    **overrides: Any,
) -> Iterator[RunningRelay]:
    """A worker whose store is ``store`` (through its proxy); its queues are deleted
    after, unless their names were given (workers one after another share them)."""
    shared = "command_queue" in overrides
    settings = {
        "broker_url": broker_url,
        "idempotency_url": store.url,
        "concurrency": 1,  # the second delivery waits for a handler slot
        "prefetch": 4,
        **overrides,
    }
    telemetry = traced.telemetry if traced else None
    declared: Settings | None = None
    try:
        with running_relay(sandbox, telemetry, **settings) as relay:
            declared = relay.settings
            yield relay
    finally:
        if declared is not None and not shared:
            delete_queues(declared)


def cancel_task(task_id: int) -> dict[str, Any]:
    return {"type": "cancel-task", "id": str(uuid.uuid4()),
            "idempotency_key": f"outage-{uuid.uuid4().hex[:12]}", "params": {"task_id": task_id}}


def queue_state(settings: Settings, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``; the embedded broker counts no consumers."""
    with connect(settings.broker_url) as connection:
        declared = connection.default_channel.queue_declare(queue, passive=True)
    return int(declared.message_count), int(declared.consumer_count)


def delete_queues(settings: Settings) -> None:
    """Quorum queues are Raft clusters: leave none behind to slow the broker down."""
    if not settings.uses_rabbitmq:
        return
    with connect(settings.broker_url) as connection:
        channel = connection.default_channel
        for queue in Topology.from_settings(settings).queues:
            with suppress(*connection.channel_errors):
                channel.queue_delete(queue.name)
        for exchange in (settings.command_exchange, settings.event_exchange):
            with suppress(*connection.channel_errors):
                channel.exchange_delete(exchange)


def until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= give_up_at:
            return False
        time.sleep(0.05)
    return True


def given_back(
    relay: RunningRelay, traced: Traced, count: int, queue: str | None = None
) -> Callable[[], bool]:
    """True once the worker gave back ``count`` deliveries, ``queue`` (the command queue)
    holds them and nothing consumes it (on RabbitMQ: the embedded broker counts none)."""
    name = queue or relay.settings.command_queue

    def check() -> bool:
        if traced.outcomes().count("given_back") < count:
            return False
        return queue_state(relay.settings, name) == (count, 0)

    return check


# --- both brokers ---------------------------------------------------------------------


def test_a_replica_cut_off_from_its_store_gives_back_what_it_has_not_started(
    sandbox: SandboxServer, store: Store, broker_url: str
):
    """One command taking its claim, one waiting for the handler slot, one waiting in the
    prefetch: all three go back to the queue, and the replica takes none of them again."""
    traced = Traced()
    with relay_cut_off(sandbox, store, broker_url, traced) as relay:
        store.cut()
        for task_id in (1, 2, 3):
            relay.send(cancel_task(task_id))
        assert until(given_back(relay, traced, 3)), traced.outcomes()
        time.sleep(1.0)  # many passes of the consume loop: still not taken again
        assert queue_state(relay.settings, relay.settings.command_queue) == (3, 0)
        assert traced.outcomes() == ["given_back"] * 3
        assert "fylr.cancel" not in sandbox.state.stats()["calls"]
        assert relay.dead_letters(timeout_s=0.5) == []


def test_a_replica_takes_deliveries_again_once_its_store_answers(
    sandbox: SandboxServer, store: Store, broker_url: str
):
    traced = Traced()
    with relay_cut_off(sandbox, store, broker_url, traced) as relay:
        store.cut()
        sent = {relay.send(cancel_task(task_id)) for task_id in (11, 12)}
        assert until(given_back(relay, traced, 2))
        store.restore()
        events = relay.events(2, timeout_s=WAIT_S)
        assert {event.data.command_id for event in events} == sent
        assert {(event.data.outcome, event.data.replayed) for event in events} == {
            ("succeeded", False)
        }
        assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"11": 1, "12": 1}
        assert relay.dead_letters(timeout_s=0.5) == []


def test_work_already_started_is_held_through_the_outage_not_given_back(
    sandbox: SandboxServer, store: Store, broker_url: str
):
    """Cut while the vendor call is under way: the command keeps its claim and its
    delivery, and stores its result once the store answers."""
    sandbox.state.faults.latency_ms = 1500
    traced = Traced()
    with relay_cut_off(sandbox, store, broker_url, traced) as relay:
        command = cancel_task(21)
        relay.send(command)
        assert until(lambda: store.field(command["idempotency_key"], "sent") == "1")
        store.cut()  # the call is on its way to the vendor
        assert until(lambda: not relay.service.outage.available)  # its result can not be kept
        store.restore()
        (event,) = relay.events(1, timeout_s=WAIT_S)
    assert (event.data.outcome, event.data.replayed) == ("succeeded", False)
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"21": 1}
    assert traced.outcomes() == ["succeeded"]


def test_deliveries_are_taken_again_while_started_work_still_holds_its_own(
    sandbox: SandboxServer, store: Store, broker_url: str
):
    """A command mid-call when the store goes; another given back meanwhile and taken
    again once the store answers, while the first still holds its delivery: both done
    once, on the one connection (the first delivery is never returned and replayed)."""
    sandbox.state.faults.latency_ms = 4000
    traced = Traced()
    with relay_cut_off(sandbox, store, broker_url, traced, concurrency=2) as relay:
        slow = cancel_task(51)
        relay.send(slow)
        assert until(lambda: store.field(slow["idempotency_key"], "sent") == "1")
        store.cut()
        relay.send(cancel_task(52))
        assert until(lambda: traced.outcomes() == ["given_back"])
        store.restore()  # the slow call is still on its way
        events = relay.events(2, timeout_s=WAIT_S)
        assert until(lambda: len(traced.outcomes()) == 3)
    assert sorted(traced.outcomes()) == ["given_back", "succeeded", "succeeded"]
    assert {(event.data.outcome, event.data.replayed) for event in events} == {
        ("succeeded", False)
    }
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"51": 1, "52": 1}


# --- RabbitMQ: the delivery limit ---------------------------------------------------------


@contextmanager
def publisher(amqp_url: str, shared: dict[str, Any]) -> Iterator[CommandClient]:
    """A client of the ``shared`` queues, deleted after."""
    settings = Settings(broker_url=amqp_url, **shared)
    try:
        with CommandClient(amqp_url, Topology.from_settings(settings)) as client:
            yield client
    finally:
        delete_queues(settings)


def return_to_queue(amqp_url: str, queue: str, times: int) -> None:
    """Take the message and give it back unacked, ``times`` times: as a worker that
    crashed on it would (each counts as a delivery)."""
    url = amqp_url[:-1] + "%2F" if amqp_url.endswith("//") else amqp_url
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for _ in range(times):
            give_up_at = time.monotonic() + WAIT_S
            method = None
            while method is None:
                assert time.monotonic() < give_up_at, "the message did not come back"
                method, _properties, _body = channel.basic_get(queue)
            channel.basic_reject(method.delivery_tag, requeue=True)
    finally:
        with suppress(pika.exceptions.AMQPError, OSError):
            connection.close()


def give_back_once(
    sandbox: SandboxServer, store: Store, amqp_url: str, shared: dict[str, Any]
) -> None:
    """A worker cut off from its store takes the command, gives it back, and stops."""
    traced = Traced()
    with relay_cut_off(sandbox, store, amqp_url, traced, **shared) as relay:
        assert until(given_back(relay, traced, 1)), (
            traced.outcomes(), queue_state(relay.settings, relay.settings.command_queue))


def test_a_command_given_back_through_many_outages_is_never_dead_lettered(
    sandbox: SandboxServer, store: Store, amqp_url: str
):
    """With a delivery limit of 2, a command given back five times is done all the same."""
    shared = names(delivery_limit=2)
    store.cut()
    with publisher(amqp_url, shared) as client:
        reply_to = client.reply_queue()
        sent = client.publish(cancel_task(31), reply_to=reply_to)
        for _ in range(5):
            give_back_once(sandbox, store, amqp_url, shared)
        store.restore()
        with relay_cut_off(sandbox, store, amqp_url, **shared) as relay:
            (reply,) = [r for _, r in zip(range(1), client.events(WAIT_S), strict=False)]
            assert relay.dead_letters(timeout_s=0.5) == []
    assert (reply.event.data.command_id, reply.event.data.outcome) == (sent, "succeeded")
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"31": 1}


def test_a_command_given_back_keeps_the_deliveries_counted_before(
    sandbox: SandboxServer, store: Store, amqp_url: str
):
    """The poison guard goes on counting: 2 returns before the give-back and 1 after make
    the last delivery a limit of 4 allows, and the command fails without a vendor call."""
    shared = names(delivery_limit=4)
    store.cut()
    with publisher(amqp_url, shared) as client:
        reply_to = client.reply_queue()
        client.publish(cancel_task(41), reply_to=reply_to)
        return_to_queue(amqp_url, shared["command_queue"], times=2)
        give_back_once(sandbox, store, amqp_url, shared)
        return_to_queue(amqp_url, shared["command_queue"], times=1)
        store.restore()
        with relay_cut_off(sandbox, store, amqp_url, **shared) as relay:
            (reply,) = [r for _, r in zip(range(1), client.events(WAIT_S), strict=False)]
            (kept,) = relay.dead_letters()
    error = reply.event.data.error
    assert reply.event.data.outcome == "failed"
    assert error is not None and error.code == "delivery_limit"
    assert "fylr.cancel" not in sandbox.state.stats()["calls"]
    assert kept.properties["message_id"] == reply.event.data.command_id


def test_a_lane_delivery_is_given_back_to_its_lane(
    sandbox: SandboxServer, store: Store, amqp_url: str
):
    """A rate-limited account's command is forwarded to its lane (no store needed), then
    the lane's delivery, unable to take its claim, goes back to the lane."""
    traced = Traced()
    with relay_cut_off(sandbox, store, amqp_url, traced) as relay:
        (lane,) = relay.service.consumer.topology.lanes.values()
        store.cut()
        object_uuid = str(uuid.uuid4())
        relay.send({"type": "batch-delete", "params": {"object_uuids": [object_uuid]}})
        assert until(given_back(relay, traced, 1, queue=lane.queue.name))
        assert queue_state(relay.settings, relay.settings.command_queue) == (0, 0)
        store.restore()
        (event,) = relay.events(1, timeout_s=WAIT_S)
    assert event.data.outcome == "succeeded"
    assert sandbox.state.stats()["effects"]["eset.batch_delete"] == {object_uuid: 1}
