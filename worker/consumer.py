"""The consumer: takes commands off the broker and settles them, on the handler loop.

The kombu connection lives on the same asyncio loop as the handlers, so a finished
handler is settled without crossing threads: a second thread for the connection cost a
GIL hand-over (up to the 5 ms switch interval) every time either side woke, which under
load delayed each settlement by tens of milliseconds. The loop watches the broker's socket
(``add_reader``) and reads what has arrived without blocking, decodes and validates each
message, and starts its handler as a task. When a task is done this consumer carries out
its :class:`~worker.handler.Settlement`: publish the event, keep the original in the
dead-letter queue when asked, and ack once the broker has confirmed those publishes.
It is the one place that settles messages. Heartbeats are checked on every pass.

Publishing writes to the socket directly; if RabbitMQ pushes back (flow control), the
loop waits with it, and so do the handlers: nothing is started that could not be settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
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

Handle = Callable[[Command, DeliveryInfo, Span], Awaitable[Settlement]]
IDLE_WAIT_S = 0.25  # how often ``stop`` and heartbeats are looked at when nothing happens
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
    concurrency: int  # handlers running at once
    prefetch: int  # deliveries held at once: running, waiting for a slot or for confirms
    poll_interval_s: float  # how often the embedded broker (no socket) is polled
    delivery_limit: int = 10
    shutdown_grace_s: float = 30.0
    heartbeat_s: int = 30


class CommandConsumer:
    def __init__(
        self,
        settings: ConsumerSettings,
        topology: Topology,
        handle: Handle,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self.topology = topology
        self._handle = handle
        self._telemetry = telemetry
        self._metrics = telemetry.instruments
        self._finished: deque[tuple[Delivery, asyncio.Task[Settlement]]] = deque()
        self._tasks: set[asyncio.Task[Settlement]] = set()  # strong references while running
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._generation = 0  # bumped on every (re)connection
        self._wake = asyncio.Event()  # set by the socket's reader and by finished handlers
        self._socket: socket.socket | None = None  # None: the embedded broker, polled
        self._readable = False
        self._stopping = False
        self._publisher: Publisher | None = None
        self._connection_errors = self.connection().connection_errors
        self.connected = threading.Event()

    @property
    def _in_flight(self) -> int:
        """Deliveries handed to a handler and not settled yet."""
        return len(self._tasks) + len(self._finished)

    def connection(self) -> Connection:
        settings = self._settings
        # Confirms are tracked per delivery (worker/confirms.py), not waited for per publish.
        return connect(
            settings.broker_url,
            settings.poll_interval_s,
            settings.heartbeat_s,
            wait_for_confirms=False,
        )

    async def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; reconnect with back-off when the broker goes away."""
        failures = 0
        while not stop.is_set():
            try:
                with self.connection() as connection:
                    await self._consume(connection, stop)
                return
            except (OSError, *self._connection_errors) as error:
                self.connected.clear()
                failures += 1
                wait_s = min(RECONNECT_MAX_WAIT_S, 0.5 * 2**failures)
                log.warning("broker connection lost (%s); reconnecting in %.1fs", error, wait_s)
                await _sleep_unless(stop, wait_s)

    async def _consume(self, connection: Connection, stop: threading.Event) -> None:
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
        with consumer, self._watching(connection):
            self.connected.set()
            log.info("consuming", extra={"queue": self.topology.command_queue.name})
            while not stop.is_set():
                self._settle_finished(publisher)
                self._drain(connection)
                await self._wait(IDLE_WAIT_S)
            # Stop taking new messages (those already sent to us go back unacked when the
            # channel closes) and finish what is in flight.
            self._stopping = True
            consumer.cancel()
            await self._finish_in_flight(connection, publisher)

    @contextlib.contextmanager
    def _watching(self, connection: Connection) -> Iterator[None]:
        """Wake the loop when the broker's socket has something to read."""
        sock = self._socket = _socket_of(connection)
        if sock is None:  # the embedded broker has no socket: it is polled
            yield
            return
        loop = asyncio.get_running_loop()
        # By number: a lost connection closes its socket (fileno() becomes -1) before this
        # block is left, and the number stays free until the next connection is made.
        fd = sock.fileno()
        loop.add_reader(fd, self._on_readable)
        try:
            yield
        finally:
            loop.remove_reader(fd)

    def _on_readable(self) -> None:
        self._readable = True
        self._wake.set()

    async def _wait(self, timeout_s: float) -> None:
        """Until the socket is readable, a handler finished, or ``timeout_s`` passed."""
        if self._socket is None:  # nothing to watch: the embedded broker is polled
            timeout_s = min(timeout_s, self._settings.poll_interval_s)
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
        self._wake.clear()

    def _drain(self, connection: Connection) -> None:
        """Handle every frame that has arrived, without waiting for more."""
        sock = self._socket
        if sock is None or self._readable or _has_buffered_bytes(sock):
            self._readable = False
            with contextlib.suppress(TimeoutError):
                while True:
                    connection.drain_events(timeout=0)
        connection.heartbeat_check()

    async def _finish_in_flight(self, connection: Connection, publisher: Publisher) -> None:
        give_up_at = time.monotonic() + self._settings.shutdown_grace_s
        while self._in_flight or publisher.confirms.unconfirmed:
            if time.monotonic() >= give_up_at:
                break
            self._settle_finished(publisher)
            self._drain(connection)
            await self._wait(self._settings.poll_interval_s)
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
        task = asyncio.ensure_future(self._run(command, self._delivery_info(message), span))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finish(delivery, done))

    async def _run(self, command: Command, info: DeliveryInfo, span: Span) -> Settlement:
        async with self._slots:
            if self._stopping:  # not started: the broker gives it to another replica
                return Settlement(None, Action.REQUEUE)
            return await self._handle(command, info, span)

    def _finish(self, delivery: Delivery, task: asyncio.Task[Settlement]) -> None:
        """Queue the settlement for the consume loop, where broker errors are handled."""
        self._tasks.discard(task)
        self._finished.append((delivery, task))
        self._wake.set()

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
        while self._finished:
            delivery, task = self._finished.popleft()
            settlement = self._settlement(delivery.message, task)
            if delivery.generation != self._generation:
                # Its channel is gone and the broker has redelivered it: the redelivery
                # replays the stored result instead.
                self._record(delivery, Settlement(None, Action.REQUEUE))
                continue
            self._settle(delivery, settlement, publisher)

    def _settlement(self, message: Message, task: asyncio.Task[Settlement]) -> Settlement:
        if task.cancelled():  # only at shutdown: the broker gives it to another replica
            return Settlement(None, Action.REQUEUE)
        error = task.exception()
        if error is None:
            return task.result()
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


def _socket_of(connection: Connection) -> socket.socket | None:
    transport = getattr(connection.connection, "transport", None)
    sock = getattr(transport, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _has_buffered_bytes(sock: socket.socket) -> bool:
    # TLS may hold decrypted bytes that select() can not see.
    pending = getattr(sock, "pending", None)
    return bool(pending and pending())


async def _sleep_unless(stop: threading.Event, seconds: float) -> None:
    """Sleep ``seconds`` on the loop, returning early once ``stop`` is set."""
    until = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < until:
        await asyncio.sleep(min(IDLE_WAIT_S, until - time.monotonic()))


def _int(value: object) -> int:
    """A header's count; anything else (absent, mangled by a publisher) counts as 0."""
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0
