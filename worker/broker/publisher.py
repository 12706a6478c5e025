"""Publishing result events and dead letters, on the connection's thread.

With RabbitMQ the channel is in confirm mode: publishing does not wait, and the consumer
acks a delivery only once the broker has confirmed what was published for it
(:class:`~worker.broker.confirms.Confirms`), never before.
"""

from __future__ import annotations

import time
from typing import Any

from kombu import Producer
from kombu.message import Message
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

from schemas.events import EVENT_CONTENT_TYPE, ResultEvent
from worker.broker.confirms import Confirms
from worker.broker.lanes import LANED_AT_HEADER
from worker.broker.origin import carry_publisher
from worker.broker.topology import Topology
from worker.ops.telemetry import messaging_attributes, trace_headers

PERSISTENT = 2
DEFAULT_EXCHANGE = "amq.default"  # the conventions' name for RabbitMQ's nameless exchange
MAX_HEADER_MESSAGE_CHARS = 300  # of an error's message, kept with a dead letter
# On a copy given back to its queue: the deliveries the broker had counted for the command
# before the copy was made, which the copy's own x-delivery-count starts anew from.
EARLIER_DELIVERIES_HEADER = "x-relay-earlier-deliveries"


class Publisher:
    """Publishes on the consumer's channel: result events (to the events exchange and a
    command's reply queue), and a command as it came to its lane, a delay queue or the
    dead-letter queue. Every publish is counted into the open confirm group."""

    def __init__(
        self,
        producer: Producer,
        topology: Topology,
        tracer: Tracer,
        confirms: Confirms,
        own_user: str | None = None,
    ) -> None:
        self._producer = producer
        self._topology = topology
        self._tracer = tracer
        self.confirms = confirms
        # Publishers are checked: a command moved on carries its publisher, published as
        # this user (worker/broker/origin.py).
        self._own_user = own_user

    def publish_event(
        self, event: ResultEvent, command: Message, parent: Span, reply_to: str | None
    ) -> None:
        """To the events exchange, and to ``reply_to`` when given; each publish is a
        PRODUCER span under ``parent`` whose context travels in the headers."""
        body = event.model_dump_json().encode()
        properties = command.properties
        context = trace.set_span_in_context(parent)
        self._publish(body, self._topology.events.name, event.routing_key, event.id, context)
        if reply_to:
            correlation_id = properties.get("correlation_id") or properties.get("message_id")
            self._publish(body, "", reply_to, event.id, context, correlation_id)

    def dead_letter(self, command: Message, event: ResultEvent | None, reason: str) -> None:
        """Keep the original message, with why it is here, in the dead-letter queue."""
        headers = headers_of(command.headers)
        headers["x-relay-reason"] = reason
        headers["x-relay-dead-lettered-at"] = time.time()  # its age, for `dlq list`
        if event is not None:
            headers["x-relay-event-id"] = event.id
            if event.data.error is not None:
                headers["x-relay-error-code"] = str(event.data.error.code)
                message = event.data.error.message
                headers["x-relay-error-message"] = message[:MAX_HEADER_MESSAGE_CHARS]
        self._forward(command, self._topology.dead_letter_queue.name, headers)

    def delay(self, command: Message, queue: str, retries: int, attempts: int) -> None:
        """Send the command, as it came, to a delay queue; it returns to the command queue
        when the queue's TTL runs out. The headers carry what the next delivery needs."""
        headers = _as_new_message(command.headers)
        headers.update({"x-relay-retries": retries, "x-relay-attempts": attempts})
        self._forward(command, queue, headers)

    def to_lane(self, command: Message, queue: str) -> None:
        """Send the command, as it came, to its lane, noting when it entered it."""
        headers = _as_new_message(command.headers)
        headers[LANED_AT_HEADER] = time.time()
        self._forward(command, queue, headers)

    def give_back(self, command: Message, queue: str, earlier_deliveries: int) -> None:
        """Send the command, as it came, to the back of ``queue`` (the one it came from),
        noting the deliveries counted for it so far. Not a requeue: a quorum queue counts
        every requeue as a delivery, and enough of them would reach its delivery limit
        (and dead-letter a command that only met outages); the copy counts none."""
        headers = _as_new_message(command.headers)
        if earlier_deliveries:
            headers[EARLIER_DELIVERIES_HEADER] = earlier_deliveries
        self._forward(command, queue, headers)

    def _forward(self, command: Message, queue: str, headers: dict[str, Any]) -> None:
        """The command's body and properties, unchanged, to ``queue``, with ``headers``
        (and its publisher, when publishers are checked)."""
        republish(self._producer, command, queue, headers, self._own_user)
        self.confirms.published()

    def _publish(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        message_id: str,
        context: Context,
        correlation_id: str | None = None,
    ) -> None:
        destination = exchange or DEFAULT_EXCHANGE
        with self._tracer.start_as_current_span(
            f"publish {destination}",
            context=context,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                **messaging_attributes(destination, routing_key, message_id, "send"),
                "messaging.operation.name": "publish",
            },
        ) as span:
            self._producer.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                content_type=EVENT_CONTENT_TYPE,
                content_encoding="utf-8",
                delivery_mode=PERSISTENT,
                message_id=message_id,
                correlation_id=correlation_id,
                headers=trace_headers(span),
                retry=False,
            )
            self.confirms.published()


def _as_new_message(headers: Any) -> dict[str, Any]:
    """The headers of a command sent on as a new message: the broker counts its
    deliveries anew."""
    forwarded = headers_of(headers)
    forwarded.pop("x-delivery-count", None)
    forwarded.pop(EARLIER_DELIVERIES_HEADER, None)
    return forwarded


def headers_of(headers: Any) -> dict[Any, Any]:
    """A copy of a message's headers to change for a copy of it (empty when it has none).
    Their keys may be bytes: py-amqp hands over a name that is not UTF-8 as it came."""
    return dict(headers) if isinstance(headers, dict) else {}


def _sendable(value: Any) -> Any:
    """``value`` (headers, or one of their values) as py-amqp can encode it again: byte
    buffers as bytes, tuples as arrays, names as text or bytes. What py-amqp read off the
    wire is sendable already (frames.py bounds its size and depth); this keeps it so for
    whatever else a copy's headers hold."""
    if isinstance(value, dict):
        return {_name(key): _sendable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_sendable(item) for item in value]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def _name(key: Any) -> str | bytes:
    return key if isinstance(key, str | bytes) else str(key)


def republish(
    producer: Producer, message: Message, queue: str, headers: dict[str, Any],
    own_user: str | None,
) -> None:
    """``message``'s body and properties, as they came, to ``queue`` with ``headers`` (and
    its publisher carried over when publishers are checked: ``origin.py``). Not its
    ``expiration``: the copy would vanish from the queue that keeps it."""
    properties = message.properties or {}
    origin = carry_publisher(message, headers, own_user)
    body = message.body
    # Bytes as they came: kombu would otherwise encode a text body in the message's own
    # (publisher-chosen, maybe unknown) content_encoding.
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    producer.publish(
        raw,
        exchange="",
        routing_key=queue,
        content_type=message.content_type or "application/octet-stream",
        content_encoding=message.content_encoding or "binary",
        headers=_sendable(headers),
        delivery_mode=PERSISTENT,
        message_id=properties.get("message_id"),
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"),
        priority=properties.get("priority"),
        timestamp=properties.get("timestamp"),
        type=properties.get("type"),
        app_id=properties.get("app_id"),
        retry=False,
        **origin,
    )
