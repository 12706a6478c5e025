"""The consumer: takes commands off the broker and settles them, on the handler loop.

The kombu connection lives on the same asyncio loop as the handlers, so a finished
handler is settled without crossing threads: a second thread for the connection cost a
GIL hand-over every time either side woke, which under load delayed settlements
(``bench/README.md`` has the figures). The loop watches the broker's socket
(``add_reader``) and reads what has arrived without blocking, decodes and validates each
message, and starts its handler as a task. When a task is done this consumer carries out
its :class:`~worker.settlement.Settlement`: publish the event, keep the original in the
dead-letter queue when asked, and ack once the broker has confirmed those publishes.
It is the one place that settles messages. Heartbeats are checked on every pass.

Publishing writes to the socket directly; if RabbitMQ pushes back (flow control), the
loop waits with it, and so do the handlers: nothing is started that could not be settled.

While a store is away (``worker/ops/outage.py``), perhaps for this replica only, it takes
no deliveries (``worker/broker/intake.py``) and gives back those it has not started, as
copies at the back of their queue that keep their delivery count, so that replicas that
reach the store do them; it takes deliveries again once the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kombu import Connection, Producer, Queue
from kombu import Consumer as KombuConsumer
from kombu.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from schemas.commands import Command
from schemas.events import ErrorCode, ErrorInfo, ResultEvent
from worker.broker.confirms import Confirms
from worker.broker.connection import BrokerCertificateRefused, connect, is_amqp
from worker.broker.decoding import decode_message, fields_of, preview, usable_text
from worker.broker.frames import unreadable
from worker.broker.intake import Intake
from worker.broker.lanes import Lane, LaneMonitor
from worker.broker.origin import publisher_of, worker_user
from worker.broker.publisher import EARLIER_DELIVERIES_HEADER, Publisher
from worker.broker.topology import Topology
from worker.errors import StoreUnavailable
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry, start_process_span
from worker.results import CommandFields, Rejected, command_fields, now, result_event
from worker.settings import ConsumerSettings
from worker.settlement import Action, DeliveryInfo, Settlement

log = logging.getLogger(__name__)

Handle = Callable[[Command | Rejected, DeliveryInfo], Awaitable[Settlement]]
IDLE_WAIT_S = 0.25  # how often ``stop`` and heartbeats are looked at when nothing happens
RECONNECT_MAX_WAIT_S = 30.0
CANCEL_WAIT_S = 5.0  # at shutdown, for cancelled handlers to let go of their claims
MAX_HEADER_COUNT = 10**6  # a count header beyond this is not one the broker or we wrote
COMPRESSION_HEADER = "compression"  # kombu would inflate the body on receipt: not for us
KEPT_COMPRESSION_HEADER = f"x-relay-{COMPRESSION_HEADER}"


@dataclass
class Delivery:
    """One message between receipt and settlement."""

    message: Message
    span: Span  # the process span; ended at settlement
    generation: int  # which connection it came on; only that one's channel can ack it
    lane: Lane | None  # the lane it came from; None: the command queue
    message_id: str | None  # the AMQP message_id, when it is usable text
    fields: CommandFields  # what addresses its event, as far as it is known
    received_at: float = field(default_factory=time.monotonic)
    attributes: dict[str, str] = field(default_factory=dict)  # type and tenant, for metrics
    started: bool = False  # handed to the handler (which gives it back itself, if at all)
    given_back: bool = False  # its task was cancelled to give it back (a store is away)


class CommandConsumer:
    """Takes commands off the command queue and the lanes, starts a handler task per
    delivery, and carries out each :class:`~worker.settlement.Settlement` (publish,
    forward, delay, dead-letter, ack): the one place that settles messages. ``run``
    reconnects with back-off until it is told to stop."""

    def __init__(
        self,
        settings: ConsumerSettings,
        topology: Topology,
        handle: Handle,
        telemetry: Telemetry,
        outage: Outage,
    ) -> None:
        self._settings = settings
        self.topology = topology
        self._handle = handle
        self._outage = outage
        self._telemetry = telemetry
        self._metrics = telemetry.instruments
        self.lane_monitor = LaneMonitor(
            topology.lanes.values(), self._metrics, settings.broker_url,
            settings.lane_poll_interval_s, settings.broker_tls,
        )
        self._finished: deque[tuple[Delivery, asyncio.Task[Settlement]]] = deque()
        # Strong references while running, and what each one is working on.
        self._tasks: dict[asyncio.Task[Settlement], Delivery] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._generation = 0  # bumped on every (re)connection
        self._given_back = 0  # deliveries given back since the stores were last seen away
        self._wake = asyncio.Event()  # set by the socket's reader and by finished handlers
        self._socket: socket.socket | None = None  # None: the embedded broker, polled
        self._readable = False
        self._stopping = False
        self._publisher: Publisher | None = None
        probe = self.connection()
        self._connection_errors = (*probe.connection_errors, *probe.channel_errors)
        # Publishers are checked: the user whose copies carry a command's publisher.
        self._own_user = worker_user(probe) if settings.bind_publishers else None
        self.connected = threading.Event()

    @property
    def _in_flight(self) -> int:
        """Deliveries handed to a handler and not settled yet."""
        return len(self._tasks) + len(self._finished)

    def connection(self) -> Connection:
        settings = self._settings
        # Confirms are tracked per delivery (worker/broker/confirms.py), not waited for per publish.
        return connect(
            settings.broker_url,
            settings.poll_interval_s,
            settings.heartbeat_s,
            wait_for_confirms=False,
            tls=settings.broker_tls,
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
                refused = BrokerCertificateRefused.behind(error, self._settings.broker_url)
                if refused is not None:  # a setting to fix: reconnecting would only hide it
                    raise refused from error
                log.warning("broker connection lost (%r)", error)
            except Exception:
                # A bug, not the broker: the connection is started anew (its unacked
                # deliveries come back) rather than the process ending with them.
                log.exception("consumer failed; reconnecting")
            if self.connected.is_set():
                failures = 0  # the connection had worked: the back-off starts anew
            self.connected.clear()
            failures += 1
            wait_s = min(RECONNECT_MAX_WAIT_S, 0.5 * 2**failures)
            log.info("reconnecting in %.1fs", wait_s)
            await _sleep_unless(stop, wait_s)

    async def _consume(self, connection: Connection, stop: threading.Event) -> None:
        self._generation += 1
        lanes = self.topology.lanes.values()
        # Connecting and declaring wait for the broker (seconds while it starts up): not
        # on the loop, where the handlers must keep renewing their claims meanwhile.
        channel, lane_channels = await asyncio.to_thread(self._open, connection, len(lanes))
        confirms = Confirms(channel, enabled=is_amqp(self._settings.broker_url))
        publisher = self._publisher = Publisher(
            Producer(channel), self.topology, self._telemetry.tracer, confirms, self._own_user
        )
        with contextlib.ExitStack() as consuming:
            consumers = [
                consuming.enter_context(self._consumer(channel, self.topology.command_queue,
                                                       None, self._settings.prefetch)),
                # A channel per lane: the broker applies each one's prefetch on its own.
                *(
                    consuming.enter_context(
                        self._consumer(lane_channel, lane.queue, lane, lane.prefetch)
                    )
                    for lane, lane_channel in zip(lanes, lane_channels, strict=True)
                ),
            ]
            intake = Intake(consumers, amqp=is_amqp(self._settings.broker_url))
            with self._watching(connection):
                self.connected.set()
                log.info("consuming", extra={"queue": self.topology.command_queue.name,
                                             "lanes": len(lanes)})
                while not stop.is_set():
                    self._follow_outage(intake)
                    self._settle_finished(publisher)
                    self._drain(connection)
                    await self._wait(IDLE_WAIT_S)
            # Stop taking new messages (those already sent to us go back unacked when the
            # channel closes) and finish what is in flight.
            self._stopping = True
            for consumer in consumers:
                consumer.cancel()
            await self._finish_in_flight(connection, publisher)

    def _follow_outage(self, intake: Intake) -> None:
        """While a store is away, take no deliveries and give back those not started, so
        that replicas that reach the store do them (the store may be away for this
        replica only); take deliveries again once it answers."""
        if not self._outage.available and not intake.stopped:
            intake.stop()
            self._outage.give_back_unstarted()  # and so do handlers still taking a claim
            unstarted = [(d, task) for task, d in self._tasks.items() if not d.started]
            for delivery, task in unstarted:
                delivery.given_back = True
                task.cancel()
            log.warning("a store is away: taking no deliveries until it answers, and giving "
                        "back the %d not started", len(unstarted))
        elif self._outage.available and intake.stopped:
            intake.start()
            log.info("the stores answer: taking deliveries again (%d were given back)",
                     self._given_back)
            self._given_back = 0

    def _open(self, connection: Connection, lanes: int) -> tuple[Any, list[Any]]:
        """Connect, declare the topology, and open a channel for each lane. Nothing
        consumes yet, so no delivery can arrive on this thread."""
        channel = _open_channel(connection)
        self.topology.declare(channel)
        return channel, [_open_channel(connection) for _ in range(lanes)]

    def _consumer(
        self, channel: Any, queue: Queue, lane: Lane | None, prefetch: int
    ) -> KombuConsumer:
        on_message = partial(self._on_message, lane=lane)
        return KombuConsumer(
            channel,
            queues=[queue],
            on_message=on_message,
            # kombu could not take the message apart: it is a message all the same, and
            # is rejected for what it is.
            on_decode_error=lambda message, error: on_message(message),
            prefetch_count=prefetch,
        )

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
            self._socket = None  # polled from here on (the shutdown's last settlements)
            if sock.fileno() == fd:
                # uvloop left the socket non-blocking behind py-amqp's back: a call that
                # waits for the broker's answer (cancelling the consumers) would fail.
                sock.settimeout(sock.gettimeout())

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
            await self._cancel_running()

    async def _cancel_running(self) -> None:
        """Stop the handlers still running, and wait a little for them to stop: each then
        lets go of what it may (the claim of work never sent) while the stores are still
        open, and none is left behind on a loop about to close."""
        running = list(self._tasks)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CANCEL_WAIT_S)

    def _on_message(self, message: Message, lane: Lane | None = None) -> None:
        """Start the message's task. py-amqp may call this in the middle of a publish (it
        reads incoming frames while it writes), so nothing here settles or publishes."""
        if self._stopping:
            return  # not started: the broker gives it to another replica
        delivery = self._receive(message, lane)
        self._metrics.in_flight.add(1)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._process(delivery), context=_in_span(delivery.span))
        self._tasks[task] = delivery
        task.add_done_callback(lambda done: self._finish(delivery, done))

    def _receive(self, message: Message, lane: Lane | None) -> Delivery:
        message_id = usable_text(message.properties.get("message_id"))
        queue = (lane.queue if lane else self.topology.command_queue).name
        try:
            span = start_process_span(
                self._telemetry.tracer,
                queue,
                message.headers,
                message.delivery_info.get("routing_key"),
                message_id,
            )
        except Exception:  # a publisher's trace headers are input too: trace without them
            log.warning("trace context not usable", exc_info=True)
            span = start_process_span(self._telemetry.tracer, queue, {}, None, message_id)
        if lane is not None:
            self.lane_monitor.delivered(lane, message)
        fields = fields_of(None, message_id)
        return Delivery(message, span, self._generation, lane, message_id, fields)

    async def _process(self, delivery: Delivery) -> Settlement:
        if self._outage.giving_back:  # on its way when this replica stopped taking any
            return Settlement(None, Action.GIVE_BACK)
        # New work waits while a store is away: it could not be done safely meanwhile
        # (and once this replica gives back what it has not started, this is cancelled).
        await self._outage.wait()
        if self._stopping:  # not started: the broker gives it to another replica
            return Settlement(None, Action.REQUEUE)
        message = delivery.message
        decoded = decode_message(
            message.body,
            delivery.message_id,
            content_type=message.content_type,
            content_encoding=_compressed_as(message) or message.content_encoding,
            max_bytes=self._settings.max_message_bytes,
            unreadable=unreadable(message.properties),  # rejected for it, alone
        )
        self._describe(delivery, decoded)
        info = self._delivery_info(message)
        if delivery.lane is not None:  # bounded by the lane's prefetch, not the slots
            delivery.started = True
            return await self._handle(decoded, info)
        lane = self.topology.lane_for(decoded)
        if lane is not None:
            return Settlement(None, Action.FORWARD, queue=lane.queue.name)
        async with self._slots:
            if self._stopping:
                return Settlement(None, Action.REQUEUE)
            delivery.started = True
            return await self._handle(decoded, info)

    def _describe(self, delivery: Delivery, decoded: Command | Rejected) -> None:
        if isinstance(decoded, Rejected):
            delivery.fields = decoded.fields
            extra = {"error_code": decoded.error.code, "command_id": decoded.fields["command_id"]}
            log.info("message rejected", extra=extra)
            return
        delivery.fields = command_fields(decoded)
        delivery.attributes = {"relay.command.type": decoded.type, "relay.tenant": decoded.tenant}
        delivery.span.set_attributes(
            {
                **delivery.attributes,
                "relay.command.id": decoded.command_id,
                "relay.idempotency_key": decoded.key,
            }
        )

    def _finish(self, delivery: Delivery, task: asyncio.Task[Settlement]) -> None:
        """Queue the settlement for the consume loop, where broker errors are handled."""
        self._tasks.pop(task, None)
        self._finished.append((delivery, task))
        self._wake.set()

    def _delivery_info(self, message: Message) -> DeliveryInfo:
        headers = message.headers or {}
        # Quorum queues count earlier deliveries and dead-letter past the limit; the last
        # one allowed is used to fail the command with an event.
        redeliveries = _earlier_deliveries(message)
        return DeliveryInfo(
            retries=_count(headers.get("x-relay-retries")),
            attempts=_count(headers.get("x-relay-attempts")),
            last_delivery=redeliveries >= self._settings.delivery_limit - 1,
            publisher=publisher_of(message, self._own_user),
        )

    def _settle_finished(self, publisher: Publisher) -> None:
        while self._finished:
            delivery, task = self._finished.popleft()
            settlement = self._settlement(delivery, task)
            if delivery.generation != self._generation:
                # Its channel is gone and the broker has redelivered it: the redelivery
                # replays the stored result instead.
                self._record(delivery, Settlement(None, Action.REQUEUE))
                continue
            self._settle(delivery, settlement, publisher)

    def _settlement(self, delivery: Delivery, task: asyncio.Task[Settlement]) -> Settlement:
        if task.cancelled():
            if delivery.given_back:  # not started, and a store is away
                return Settlement(None, Action.GIVE_BACK)
            return Settlement(None, Action.REQUEUE)  # at shutdown: for another replica
        error = task.exception()
        if error is None:
            return task.result()
        if isinstance(error, StoreUnavailable):
            # Given back while taking its claim, or held as long as a delivery may be: it
            # goes back (an outage never uses up its delivery limit) and waits again.
            return Settlement(None, Action.GIVE_BACK)
        # A bug, not bad input: report it and keep the message rather than lose it.
        log.error("handler failed", exc_info=error)
        event = result_event(
            **delivery.fields,
            outcome="failed",
            started_at=now(),
            error=ErrorInfo(
                code=ErrorCode.INTERNAL_ERROR,
                message=f"the worker failed on this command ({type(error).__name__}); it is "
                "kept in the dead-letter queue",
            ),
        )
        return Settlement(event, Action.DEAD_LETTER)

    def _settle(self, delivery: Delivery, settlement: Settlement, publisher: Publisher) -> None:
        try:
            self._carry_out(delivery, settlement, publisher)
        except self._connection_errors:
            raise  # the channel is gone: unacked, the delivery comes back on the next one
        except Exception:
            # Nothing one message holds may stop the consumer: let the broker keep it
            # (RabbitMQ dead-letters a rejected command to the dead-letter queue).
            log.exception("settling failed; the message is rejected to the dead-letter queue")
            delivery.message.reject(requeue=False)
        finally:
            self._record(delivery, settlement)

    def _carry_out(self, delivery: Delivery, settlement: Settlement, publisher: Publisher) -> None:
        message = delivery.message
        if settlement.action is Action.REQUEUE:
            message.requeue()
            return
        # Acked once the broker has confirmed these publishes; a refused one puts the
        # command back, and its redelivery replays the stored result.
        with publisher.confirms.group(message.ack, message.requeue):
            if settlement.action is Action.GIVE_BACK:
                queue = delivery.lane.queue if delivery.lane else self.topology.command_queue
                publisher.give_back(message, queue.name, _earlier_deliveries(message))
                return
            if settlement.action is Action.FORWARD:
                publisher.to_lane(message, settlement.queue)
                return
            if settlement.action is Action.DELAY:
                queue = self.topology.delay_queues[settlement.delay_s].name
                publisher.delay(message, queue, settlement.retries, settlement.attempts)
                return
            event = settlement.event
            if event is not None:
                reply_to, event = self._reply_to(message, event)
                publisher.publish_event(event, message, delivery.span, reply_to)
            if settlement.action is Action.DEAD_LETTER:
                reason = event.data.outcome if event else ""
                publisher.dead_letter(message, event, reason=reason)
                self._metrics.dead_letters.add(1, delivery.attributes)

    def _reply_to(self, message: Message, event: ResultEvent) -> tuple[str | None, ResultEvent]:
        """The command's reply queue when it may have one, and the event, saying so when
        the reply queue was refused."""
        reply_to = message.properties.get("reply_to")
        if not reply_to:
            return None, event
        usable = usable_text(reply_to)  # a lone surrogate can name no queue to publish to
        if usable is not None and usable.startswith(self._settings.reply_to_prefixes):
            return usable, event
        allowed = ", ".join(self._settings.reply_to_prefixes)
        return None, event.with_warning(
            f"reply_to {preview(reply_to)} is not a reply queue (names starting with "
            f"{allowed}): the event went to the events exchange only"
        )

    def _record(self, delivery: Delivery, settlement: Settlement) -> None:
        event = settlement.event
        laned = settlement.action is Action.FORWARD
        outcome = event.data.outcome if event else _UNFINISHED.get(settlement.action, "requeued")
        if settlement.action is Action.GIVE_BACK:
            self._given_back += 1
        attributes = {**delivery.attributes, "relay.outcome": outcome}
        self._metrics.in_flight.add(-1)
        if not laned:  # counted when its lane's delivery settles
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


def _in_span(span: Span) -> contextvars.Context:
    """A context in which ``span`` is current, for the delivery's task: the handler's
    spans (vendor calls) become its children."""
    context = contextvars.copy_context()
    context.run(otel_context.attach, trace.set_span_in_context(span))
    return context


def _open_channel(connection: Connection) -> Any:
    channel = connection.channel()
    if hasattr(channel, "auto_decode"):
        # py-amqp would decode a body in whatever content_encoding the publisher names
        # (latin-1, utf-16) before we see it: bytes as sent are what is checked, and
        # what the dead-letter queue keeps.
        channel.auto_decode = False
    _keep_bodies_as_sent(channel)
    return channel


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


# The outcome a delivery is recorded with when it settles without an event.
_UNFINISHED = {Action.FORWARD: "laned", Action.GIVE_BACK: "given_back"}


def _earlier_deliveries(message: Message) -> int:
    """The deliveries of the command before this one, as the broker counted them (on a
    first delivery, x-delivery-count is the publisher's: not a count to trust), with those
    counted before it was given back (worker/broker/publisher.py)."""
    headers = message.headers or {}
    redelivered = bool(message.delivery_info.get("redelivered"))
    counted = _count(headers.get("x-delivery-count")) if redelivered else 0
    return counted + _count(headers.get(EARLIER_DELIVERIES_HEADER))


def _count(value: object) -> int:
    """A header's count; anything else (absent, mangled by a publisher) counts as 0."""
    if isinstance(value, str) and value.isascii() and value.isdecimal() and len(value) <= 9:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value <= MAX_HEADER_COUNT:
        return max(value, 0)
    return 0


def _compressed_as(message: Message) -> str | None:
    compression = (message.headers or {}).get(KEPT_COMPRESSION_HEADER)
    return f"compressed ({preview(compression)})" if compression else None


def _keep_bodies_as_sent(channel: Any) -> None:
    """kombu inflates a body whose headers name a compression as it makes the message,
    before any check could bound it (a small zlib bomb becomes gigabytes). The header is
    renamed first, so the body stays as sent and the command is rejected as compressed."""
    make_message = channel.Message  # both brokers' channels make their messages here

    def message_as_sent(raw: Any, **options: Any) -> Any:
        # The embedded broker's message is a dict; py-amqp's carries its properties.
        properties = raw if isinstance(raw, dict) else getattr(raw, "properties", None)
        if isinstance(properties, dict):
            headers = properties.get("headers", properties.get("application_headers"))
            if isinstance(headers, dict) and COMPRESSION_HEADER in headers:
                headers[KEPT_COMPRESSION_HEADER] = headers.pop(COMPRESSION_HEADER)
        return make_message(raw, **options)

    channel.Message = message_as_sent
