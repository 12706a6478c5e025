"""The result events a run receives, as a playbook would: every delivery on one queue kept
in order with its arrival time (for rates and latencies), and read as :class:`SeenEvent`,
once per event id, when a figure needs them.

How the queue is consumed is the caller's choice (a :data:`Consume`): a benchmark
subscribes over kombu, the chaos scenarios consume over pika or poll the embedded broker.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass

from kombu import Connection, Consumer, Exchange, Queue
from kombu.message import Message

RECONNECT_PAUSE_S = 0.5
START_TIMEOUT_S = 20.0

Deliver = Callable[[bytes, object], None]  # body, correlation_id
# Hands each message to `deliver` until `stop` is set, calling `ready()` once consuming.
Consume = Callable[[Deliver, Callable[[], None], threading.Event], None]


@dataclass(frozen=True)
class SeenEvent:
    event_id: str
    command_id: str
    idempotency_key: str
    outcome: str
    replayed: bool
    error_code: str | None
    attempts: int | None
    response_id: str | None  # ESET's, when the first answer was a 202
    command_type: str | None
    tenant: str | None

    @classmethod
    def from_body(cls, body: bytes) -> SeenEvent:
        event = json.loads(body)
        data = event["data"]
        error = data.get("error") or {}
        vendor = data.get("vendor") or {}
        return cls(
            event_id=event["id"],
            command_id=data["command_id"],
            idempotency_key=data["idempotency_key"],
            outcome=data["outcome"],
            replayed=bool(data.get("replayed")),
            error_code=error.get("code"),
            attempts=data.get("attempts"),
            response_id=vendor.get("response_id"),
            command_type=data.get("type"),
            tenant=data.get("tenant"),
        )


@dataclass(frozen=True)
class Delivery:
    arrived: float  # time.monotonic()
    arrived_at: float  # time.time(), to compare with the times an event states
    body: bytes
    correlation_id: object


class EventCollector:
    """Runs ``consume`` on a thread of its own, again after the errors of ``reconnect_on``
    (a new connection); an event delivered again after a reconnect is one event."""

    def __init__(
        self, consume: Consume, reconnect_on: tuple[type[BaseException], ...] = ()
    ) -> None:
        self._consume = consume
        self._reconnect_on = reconnect_on
        self.deliveries: list[Delivery] = []  # appended to by the collector only
        self.reconnects = 0
        self.undecodable = 0
        self._changed = threading.Condition()
        self._read = 0  # deliveries read into the events below
        self._event_ids: set[str] = set()
        self._events: list[tuple[Delivery, SeenEvent]] = []  # once each, in arrival order
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="event-collector", daemon=True)

    def start(self) -> EventCollector:
        """Returns once consuming: no event published from now on is missed."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"event collector did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume(self._deliver, self._ready.set, self._stop)
            except self._reconnect_on:
                self.reconnects += 1
                self._stop.wait(RECONNECT_PAUSE_S)
            except BaseException as error:
                self._error = error
                raise

    def _deliver(self, body: bytes, correlation_id: object) -> None:
        delivery = Delivery(time.monotonic(), time.time(), body, correlation_id)
        with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()

    # --- deliveries: rates and latencies ---

    def wait_for(self, count: int, timeout_s: float, check: Callable[[], None]) -> bool:
        """True once ``count`` messages arrived; False after ``timeout_s``. ``check`` runs
        every 0.2 s (it raises when a process of the run died)."""
        give_up_at = time.monotonic() + timeout_s
        with self._changed:
            while len(self.deliveries) < count:
                left_s = give_up_at - time.monotonic()
                if left_s <= 0:
                    return False
                self._changed.wait(min(0.2, left_s))
                check()
        return True

    def times(self) -> list[float]:
        with self._changed:
            return sorted(delivery.arrived for delivery in self.deliveries)

    def outcomes(self) -> dict[str, int]:
        """How many messages of each ``data.outcome``, the anchors' small events too."""
        with self._changed:
            bodies = [delivery.body for delivery in self.deliveries]
        outcomes = (json.loads(body).get("data", {}).get("outcome") for body in bodies)
        return dict(Counter(str(outcome) for outcome in outcomes))

    # --- events: figures ---

    def _seen(self, since: int = 0) -> list[tuple[Delivery, SeenEvent]]:
        """The events after the first ``since``. Read here, when a figure needs them, not
        as they arrive: receiving stays cheap for the runs that only count."""
        with self._changed:
            for delivery in self.deliveries[self._read:]:
                try:
                    seen = SeenEvent.from_body(delivery.body)
                except (ValueError, KeyError, TypeError):
                    self.undecodable += 1
                    continue
                if seen.event_id not in self._event_ids:
                    self._event_ids.add(seen.event_id)
                    self._events.append((delivery, seen))
            self._read = len(self.deliveries)
            return self._events[since:]

    def events_since(self, index: int) -> list[tuple[float, SeenEvent]]:
        """The events after the first ``index``, in arrival order, with their arrival."""
        return [(delivery.arrived, seen) for delivery, seen in self._seen(index)]

    def answered(self, command_ids: Iterable[str]) -> int:
        """How many of ``command_ids`` have at least one event."""
        answered = {seen.command_id for _, seen in self._seen()}
        return sum(1 for command_id in command_ids if command_id in answered)

    def by_command(self) -> dict[str, list[SeenEvent]]:
        grouped: dict[str, list[SeenEvent]] = {}
        for _, seen in self._seen():
            grouped.setdefault(seen.command_id, []).append(seen)
        return grouped

    def by_correlation(self) -> dict[str, list[SeenEvent]]:
        """Events by the ``correlation_id`` they arrived with (reply queues)."""
        grouped: dict[str, list[SeenEvent]] = {}
        for delivery, seen in self._seen():
            if isinstance(delivery.correlation_id, str):
                grouped.setdefault(delivery.correlation_id, []).append(seen)
        return grouped

    def first_seen(self) -> dict[str, float]:
        """When (``time.monotonic()``) the first event of each command id arrived."""
        first: dict[str, float] = {}
        for delivery, seen in self._seen():
            first.setdefault(seen.command_id, delivery.arrived)
        return first


def subscription(
    broker_url: str, exchange: Exchange, queue_name: str,
    deliver: Deliver, ready: Callable[[], None], stop: threading.Event,
) -> None:
    """Consume (a :data:`Consume`, once its first three arguments are given) a queue of
    the collector's own bound to ``exchange`` with ``#``: every event published there
    once consuming. Exclusive, gone with its connection: not for reconnecting."""
    queue = Queue(
        queue_name, exchange=exchange, routing_key="#",
        durable=False, exclusive=True, auto_delete=True,
    )

    def on_message(message: Message) -> None:
        deliver(message.body, None)

    with Connection(broker_url) as connection, Consumer(
        connection.channel(), queues=[queue], on_message=on_message, no_ack=True
    ):
        ready()
        while not stop.is_set():
            with suppress(TimeoutError):
                connection.drain_events(timeout=0.2)
