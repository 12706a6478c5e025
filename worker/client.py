"""Publishing commands and waiting for their events: what a Python playbook (and the
``send`` and ``demo`` commands) do from the other side of the queue.

Waiting keeps the connection alive however long it takes: on RabbitMQ, heartbeats are
sent and the broker's checked between short reads, so neither side takes a quiet wait
for a dead peer. A connection lost all the same ends the wait with
:class:`ConnectionLost`, which says that the command was sent.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kombu import Consumer, Producer, Queue
from kombu.message import Message

from schemas.events import ResultEvent
from worker.broker.connection import connect, is_amqp
from worker.broker.origin import worker_user
from worker.broker.topology import Topology
from worker.settings import HEARTBEAT_S, TlsFiles

PERSISTENT = 2
READ_WAIT_S = 0.5  # the longest read while waiting: short next to any heartbeat's half


class ConnectionLost(Exception):
    """Raised by :meth:`CommandClient.events` when the broker connection is lost while
    waiting (broker gone, network cut, heartbeats missed): what was published stands, and
    its result may still come; the error it was lost with is the ``__cause__``."""


@dataclass(frozen=True)
class Reply:
    """A result event as it arrived on the reply queue."""

    event: ResultEvent
    correlation_id: str | None
    headers: dict[str, Any]


class CommandClient:
    def __init__(
        self,
        broker_url: str,
        topology: Topology,
        tls: TlsFiles | None = None,
        heartbeat_s: int = HEARTBEAT_S,
    ) -> None:
        """``tls``: the broker's CA and client certificate (``Settings.tls.broker``) for
        ``amqps://``; its certificate and name are verified either way. ``heartbeat_s``:
        the AMQP heartbeat asked for (RabbitMQ drops a connection silent for two)."""
        self._topology = topology
        self._amqp = is_amqp(broker_url)
        self._connection = connect(broker_url, heartbeat_s=heartbeat_s, tls=tls)
        # heartbeat_check sends one when half the interval passed without traffic: reads
        # must end well within that, or the broker hears nothing for too long.
        self._read_wait_s = min(READ_WAIT_S, heartbeat_s / 4) if heartbeat_s else READ_WAIT_S
        self._channel = self._connection.channel()
        topology.declare(self._channel)
        self._producer = Producer(self._channel)
        # RabbitMQ checks it: the publisher a tenant bound to its publishers asks for.
        self._identity = {"user_id": worker_user(self._connection)} if self._amqp else {}
        self._replies: Queue | None = None
        self._received: list[Message] = []

    def __enter__(self) -> CommandClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reply_queue(self) -> str:
        """A private queue for this client's result events, consumed from now on (so no
        event is missed between two calls of :meth:`events`) and deleted on close."""
        if self._replies is None:
            name = f"relay.replies.{uuid.uuid4().hex[:12]}"
            # Exclusive: RabbitMQ drops it with the connection. Not auto-delete: that would
            # drop it, and the events on their way, whenever no consumer is attached.
            self._replies = Queue(name, durable=False, exclusive=self._amqp)
            consumer = Consumer(self._channel, [self._replies], on_message=self._received.append)
            consumer.consume()
        return str(self._replies.name)

    def publish(self, command: dict[str, Any], reply_to: str | None = None) -> str:
        """Publish ``command`` as JSON to the commands exchange; returns its message id."""
        message_id = str(command.get("id") or uuid.uuid4())
        routing_key = str(command.get("type", "unknown"))
        self.publish_raw(json.dumps(command).encode(), message_id, reply_to, routing_key)
        return message_id

    def publish_raw(
        self,
        body: bytes,
        message_id: str,
        reply_to: str | None = None,
        routing_key: str = "unknown",
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish ``body`` unchanged (whatever it holds) as a command message."""
        self._producer.publish(
            body,
            exchange=self._topology.commands,
            routing_key=routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=PERSISTENT,
            message_id=message_id,
            reply_to=reply_to,
            headers=headers or {},
            retry=True,
            **self._identity,
        )

    def events(self, timeout_s: float) -> Iterator[Reply]:
        """Result events arriving on the reply queue, until ``timeout_s`` passes without
        one; heartbeats keep the connection alive meanwhile. Raises
        :class:`ConnectionLost` when it is lost all the same."""
        give_up_at = time.monotonic() + timeout_s
        while (left_s := give_up_at - time.monotonic()) > 0:
            if not self._received:
                self._read(min(self._read_wait_s, left_s))
            while self._received:
                message = self._received.pop(0)
                # Had the connection just gone, the event is in hand all the same: the
                # next read says the connection was lost.
                with contextlib.suppress(*self._connection.connection_errors):
                    message.ack()
                give_up_at = time.monotonic() + timeout_s
                yield Reply(
                    ResultEvent.model_validate_json(message.body),
                    message.properties.get("correlation_id"),
                    dict(message.headers or {}),
                )

    def _read(self, timeout_s: float) -> None:
        """Take what arrives within ``timeout_s`` (handed to ``on_message``), then send
        a heartbeat if one is due and check the broker's."""
        try:
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=timeout_s)
            self._connection.heartbeat_check()
        except self._connection.connection_errors as error:
            raise ConnectionLost(f"the broker connection was lost ({error!r})") from error

    def close(self) -> None:
        if self._replies is not None:
            # The broker may have dropped it already (exclusive, connection lost).
            with contextlib.suppress(
                *self._connection.channel_errors, *self._connection.connection_errors
            ):
                self._replies.bind(self._channel).delete()
        self._connection.release()
