"""The connection thread: takes commands off the broker and settles them.

kombu connections and channels belong to one thread. This thread decodes and validates
each message, hands the command to the handler loop, and later carries out the handler's
:class:`~worker.handler.Settlement`: publish the event, keep the original in the
dead-letter queue when asked, and ack once the broker has confirmed those publishes. It
is the one place that settles messages, and it never waits on vendor work (nor on
confirms), so heartbeats keep flowing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from kombu import Connection, Producer
from kombu import Consumer as KombuConsumer
from kombu.message import Message
from opentelemetry.trace import Span, StatusCode

from schemas.commands import Command
from schemas.events import ErrorCode, ErrorInfo
from worker.broker import connect, is_amqp
from worker.confirms import Confirms
from worker.decoding import decode_command, identity
from worker.errors import CommandRejected
from worker.handler import Action, DeliveryInfo, Settlement
from worker.publisher import Publisher
from worker.results import now, rejection, result_event
from worker.telemetry import Telemetry, start_process_span
from worker.topology import Topology

log = logging.getLogger(__name__)

Submit = Callable[[Command, DeliveryInfo, Span], "Future[Settlement]"]
IDLE_WAIT_S = 0.25
RECONNECT_MAX_WAIT_S = 30.0


@dataclass
class Delivery:
    """One message between receipt and settlement."""

    message: Message
    span: Span  # the process span; ended at settlement
    generation: int  # which connection it came on; only that one's channel can ack it
    received_at: float = field(default_factory=time.monotonic)
    attributes: dict[str, str] = field(default_factory=dict)  # type and tenant, for metrics


@dataclass(frozen=True)
class ConsumerSettings:
    broker_url: str
    prefetch: int
    poll_interval_s: float  # how soon finished work is settled while work is in flight
    delivery_limit: int = 10
    shutdown_grace_s: float = 30.0
    heartbeat_s: int = 30


class CommandConsumer:
    def __init__(
        self,
        settings: ConsumerSettings,
        topology: Topology,
        submit: Submit,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self.topology = topology
        self._submit = submit
        self._telemetry = telemetry
        self._metrics = telemetry.instruments
        self._finished: queue.SimpleQueue[tuple[Delivery, Future[Settlement]]] = (
            queue.SimpleQueue()
        )
        self._in_flight = 0
        self._generation = 0  # bumped on every (re)connection
        self._waker = Waker()
        self._stopping = False
        self._publisher: Publisher | None = None
        self._connection_errors = self.connection().connection_errors
        self.connected = threading.Event()

    def connection(self) -> Connection:
        settings = self._settings
        # Confirms are tracked per delivery (worker/confirms.py), not waited for per publish.
        return connect(
            settings.broker_url,
            settings.poll_interval_s,
            settings.heartbeat_s,
            wait_for_confirms=False,
        )

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; reconnect with back-off when the broker goes away."""
        failures = 0
        while not stop.is_set():
            try:
                with self.connection() as connection:
                    self._consume(connection, stop)
                return
            except (OSError, *self._connection_errors) as error:
                self.connected.clear()
                failures += 1
                wait_s = min(RECONNECT_MAX_WAIT_S, 0.5 * 2**failures)
                log.warning("broker connection lost (%s); reconnecting in %.1fs", error, wait_s)
                stop.wait(wait_s)

    def _consume(self, connection: Connection, stop: threading.Event) -> None:
        self._generation += 1
        channel = connection.channel()
        self.topology.declare(channel)
        confirms = Confirms(channel, enabled=is_amqp(self._settings.broker_url))
        publisher = self._publisher = Publisher(
            Producer(channel), self.topology, self._telemetry.tracer, confirms
        )
        consumer = KombuConsumer(
            channel,
            queues=[self.topology.command_queue],
            on_message=self._on_message,
            prefetch_count=self._settings.prefetch,
        )
        with consumer:
            self.connected.set()
            log.info("consuming", extra={"queue": self.topology.command_queue.name})
            while not stop.is_set():
                self._settle_finished(publisher)
                self._drain(connection)
            # Stop taking new messages (those already sent to us go back unacked when the
            # channel closes) and finish what is in flight.
            self._stopping = True
            consumer.cancel()
            self._finish_in_flight(connection, publisher)

    def _drain(self, connection: Connection) -> None:
        """Handle what the broker sent; return when there was some, when finished work
        woke us, or after a short idle wait (so ``stop`` and heartbeats are seen)."""
        sock = _socket_of(connection)
        if sock is None:  # the embedded broker has no socket: it polls
            wait_s = self._settings.poll_interval_s if self._in_flight else IDLE_WAIT_S
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=wait_s)
            return
        if not _has_buffered_bytes(sock):
            waker = self._waker.fileno()
            readable, _, _ = select.select([sock.fileno(), waker], [], [], IDLE_WAIT_S)
            if waker in readable:
                self._waker.clear()
            if sock.fileno() not in readable:
                connection.heartbeat_check()
                return
        with contextlib.suppress(TimeoutError):
            while True:  # every frame that has arrived, without waiting for more
                connection.drain_events(timeout=0)
        connection.heartbeat_check()

    def _finish_in_flight(self, connection: Connection, publisher: Publisher) -> None:
        give_up_at = time.monotonic() + self._settings.shutdown_grace_s
        while self._in_flight or publisher.confirms.unconfirmed:
            if time.monotonic() >= give_up_at:
                break
            self._settle_finished(publisher)
            try:
                connection.drain_events(timeout=self._settings.poll_interval_s)
            except TimeoutError:
                connection.heartbeat_check()
        if self._in_flight:
            # Unacked deliveries go back to the queue when the channel closes; their
            # stored results (if any) are replayed on redelivery.
            log.warning("%d commands still in flight at shutdown; requeued", self._in_flight)

    def _on_message(self, message: Message) -> None:
        if self._stopping:
            return  # not started: the broker gives it to another replica
        message_id = message.properties.get("message_id")
        span = start_process_span(
            self._telemetry.tracer,
            self.topology.command_queue.name,
            message.headers,
            message.delivery_info.get("routing_key"),
            message_id,
        )
        delivery = Delivery(message, span, self._generation)
        self._metrics.in_flight.add(1)
        try:
            command = decode_command(message.body, message_id)
        except CommandRejected as error:
            event = rejection(error.code, error.message, **identity(message.body, message_id))
            log.info("message rejected", extra={"error_code": error.code, "message_id": message_id})
            assert self._publisher is not None  # set before consuming starts
            self._settle(delivery, Settlement(event, Action.DEAD_LETTER), self._publisher)
            return
        delivery.attributes = {"relay.command.type": command.type, "relay.tenant": command.tenant}
        span.set_attributes(
            {
                **delivery.attributes,
                "relay.command.id": command.command_id,
                "relay.idempotency_key": command.key,
            }
        )
        self._in_flight += 1
        future = self._submit(command, self._delivery_info(message), span)
        future.add_done_callback(lambda f: self._finish(delivery, f))

    def _finish(self, delivery: Delivery, future: Future[Settlement]) -> None:
        """On the handler loop's thread: queue the settlement and wake the connection."""
        self._finished.put((delivery, future))
        self._waker.wake()

    def _delivery_info(self, message: Message) -> DeliveryInfo:
        headers = message.headers or {}
        # Quorum queues count earlier deliveries in x-delivery-count and dead-letter past
        # the limit; the last one allowed is used to fail the command with an event.
        redeliveries = _int(headers.get("x-delivery-count"))
        return DeliveryInfo(
            retries=_int(headers.get("x-relay-retries")),
            attempts=_int(headers.get("x-relay-attempts")),
            last_delivery=redeliveries >= self._settings.delivery_limit - 1,
        )

    def _settle_finished(self, publisher: Publisher) -> None:
        while True:
            try:
                delivery, future = self._finished.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            settlement = self._settlement(delivery.message, future)
            if delivery.generation != self._generation:
                # Its channel is gone and the broker has redelivered it: the redelivery
                # replays the stored result instead.
                self._record(delivery, Settlement(None, Action.REQUEUE))
                continue
            self._settle(delivery, settlement, publisher)

    def _settlement(self, message: Message, future: Future[Settlement]) -> Settlement:
        error = future.exception()
        if error is None:
            return future.result()
        # A bug, not bad input: report it and keep the message rather than lose it.
        log.error("handler failed", exc_info=error)
        event = result_event(
            **identity(message.body, message.properties.get("message_id")),
            outcome="failed",
            started_at=now(),
            error=ErrorInfo(
                code=ErrorCode.INTERNAL_ERROR, message=f"the worker failed: {error!r}"
            ),
        )
        return Settlement(event, Action.DEAD_LETTER)

    def _settle(self, delivery: Delivery, settlement: Settlement, publisher: Publisher) -> None:
        message, event = delivery.message, settlement.event
        try:
            if settlement.action is Action.REQUEUE:
                message.requeue()
                return
            # Acked once the broker has confirmed these publishes; a refused one puts the
            # command back, and its redelivery replays the stored result.
            with publisher.confirms.group(message.ack, message.requeue):
                if settlement.action is Action.DELAY:
                    queue = self.topology.delay_queues[settlement.delay_s].name
                    publisher.delay(message, queue, settlement.retries, settlement.attempts)
                    return
                if event is not None:
                    publisher.publish_event(event, message, delivery.span)
                if settlement.action is Action.DEAD_LETTER:
                    reason = event.data.outcome if event else ""
                    publisher.dead_letter(message, event, reason=reason)
                    self._metrics.dead_letters.add(1, delivery.attributes)
        finally:
            self._record(delivery, settlement)

    def _record(self, delivery: Delivery, settlement: Settlement) -> None:
        event = settlement.event
        outcome = event.data.outcome if event else "requeued"
        attributes = {**delivery.attributes, "relay.outcome": outcome}
        self._metrics.in_flight.add(-1)
        self._metrics.commands.add(1, attributes)
        self._metrics.command_duration.record(time.monotonic() - delivery.received_at, attributes)
        if event is not None and event.data.replayed:
            self._metrics.replays.add(1, delivery.attributes)
        delivery.span.set_attribute("relay.outcome", outcome)
        if event is not None and event.data.error is not None:
            delivery.span.set_attribute("error.type", str(event.data.error.code))
            if outcome == "failed":
                delivery.span.set_status(StatusCode.ERROR, event.data.error.message)
        delivery.span.end()


class Waker:
    """A self-pipe: lets the handler loop wake the connection thread from ``select``.

    Only the first wake after a ``clear`` writes to the pipe: under load hundreds of
    handlers finish between two passes of the connection thread, and one byte (one system
    call, one wake-up) for all of them is enough.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._pending = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(BlockingIOError):  # a full pipe is awake enough
            os.write(self._write, b"!")

    def clear(self) -> None:
        """Called before the finished work is taken. The pipe is emptied first: a wake
        that lands in between then either finds its work taken or writes a fresh byte."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        self._pending = False


def _socket_of(connection: Connection) -> socket.socket | None:
    transport = getattr(connection.connection, "transport", None)
    sock = getattr(transport, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _has_buffered_bytes(sock: socket.socket) -> bool:
    # TLS may hold decrypted bytes that select() can not see.
    pending = getattr(sock, "pending", None)
    return bool(pending and pending())


def _int(value: object) -> int:
    """A header's count; anything else (absent, mangled by a publisher) counts as 0."""
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0
