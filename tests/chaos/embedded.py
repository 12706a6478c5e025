"""A scenario's world on the embedded broker: kombu's SQLAlchemy transport over SQLite
files, shared by the replicas (as are the SQLite idempotency store and the sandbox).

The embedded broker routes a topic exchange only inside the process that bound it, so
events published to the worker's events exchange reach no queue of the test: every
message the scenario sends carries ``reply_to`` (a ``relay.replies.…`` queue, read here),
and events are found there by command id or ``correlation_id``.

    rig = EmbeddedRig("poison", tmp_path)
    rig.start(replicas=2)
    rig.publish_items(items)
    rig.run_until(done, timeout_s=90)
    figures = rig.finish(workload)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kombu import Connection, Producer

from bench.rig.events import Deliver

from .broker import Publishable, RawMessage
from .poison import DeadLetter
from .scenario import ScenarioRig

PERSISTENT = 2


def poll(
    url: str, queue: str, deliver: Deliver, ready: Callable[[], None], stop: threading.Event
) -> None:
    """Take what ``queue`` holds every 50 ms (a :data:`~bench.rig.events.Consume`, once its
    first two arguments are given)."""
    with Connection(url) as connection:
        channel = connection.default_channel
        ready()
        while not stop.is_set():
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                stop.wait(0.05)
                continue
            deliver(message.body, message.properties.get("correlation_id"))


class EmbeddedRig(ScenarioRig):
    def __init__(self, scenario: str, log_dir: Path) -> None:
        super().__init__(
            scenario,
            log_dir,
            f"sqla+sqlite:///{log_dir / 'broker.sqlite3'}",
            store_url=f"sqlite:///{log_dir / 'idempotency.sqlite3'}",
            rate_limit_url="memory://",
        )

    def start(self, *, replicas: int, claim_lease_s: float = 30.0, **settings: str) -> None:
        self._start_replicas(
            replicas,
            rate_limited=False,
            tenants=(),
            claim_lease_s=claim_lease_s,
            settings=settings,
        )
        # Any error (SQLite's "database is locked" and the like): poll again.
        consume = partial(poll, self.broker_url, self.names.replies)
        self.collector = self.collect(consume, reconnect_on=(Exception,))

    def publish_items(self, items: list[Publishable]) -> None:
        """Each item, in order, straight to the command queue, with ``reply_to`` (unless a
        raw message says otherwise); the scenario clock starts here."""
        self.started_at = time.monotonic()
        with Connection(self.broker_url) as connection:
            producer = Producer(connection.default_channel)
            for item in items:
                producer.publish(
                    **self._publish_arguments(item),
                    exchange="",
                    routing_key=self.names.command_queue,
                    delivery_mode=PERSISTENT,
                    retry=True,
                )
        self.extra["publish_s"] = round(time.monotonic() - self.started_at, 2)

    def _publish_arguments(self, item: Publishable) -> dict[str, Any]:
        if isinstance(item, RawMessage):
            return {"body": item.body, **item.properties}
        return {
            "body": json.dumps(item).encode(),
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "message_id": item["id"],
            "reply_to": self.names.replies,
        }

    def dead_letters(self) -> list[DeadLetter]:
        """Everything in the dead-letter queue (taken out)."""
        letters = []
        with Connection(self.broker_url) as connection:
            channel = connection.default_channel
            while (
                message := channel.basic_get(self.names.dead_letter_queue, no_ack=True)
            ) is not None:
                properties = message.properties
                letters.append(
                    DeadLetter(
                        properties.get("message_id"),
                        properties.get("correlation_id"),
                        message.body if isinstance(message.body, bytes) else message.body.encode(),
                    )
                )
        return letters
