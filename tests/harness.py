"""A worker running in a thread against a sandbox, and a client to talk to it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu import Consumer

from schemas.events import ResultEvent
from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.client import CommandClient, Reply
from worker.ops.telemetry import Telemetry
from worker.sandbox import SandboxServer
from worker.sandbox.worker_setup import sandbox_settings
from worker.service import RelayService
from worker.settings import Settings


class RunningRelay:
    def __init__(
        self,
        settings: Settings,
        client: CommandClient,
        service: RelayService,
        stop: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.client = client
        self.service = service
        self.stop = stop  # what SIGTERM does: returns once the worker has stopped
        self.reply_to = client.reply_queue()

    def send(self, command: dict[str, Any]) -> str:
        return self.client.publish(command, reply_to=self.reply_to)

    def send_raw(
        self, body: bytes, message_id: str | None = None, headers: dict[str, Any] | None = None
    ) -> str:
        """Publish bytes as they are, the way a broken publisher would."""
        message_id = message_id or str(uuid.uuid4())
        self.client.publish_raw(
            body, message_id=message_id, reply_to=self.reply_to, headers=headers
        )
        return message_id

    def events(self, count: int, timeout_s: float = 20.0) -> list[ResultEvent]:
        return [reply.event for reply in self.replies(count, timeout_s)]

    def replies(self, count: int, timeout_s: float = 20.0) -> list[Reply]:
        received = []
        for reply in self.client.events(timeout_s):
            received.append(reply)
            if len(received) == count:
                break
        assert len(received) == count, f"got {len(received)} of {count} events"
        return received

    def dead_letters(self, timeout_s: float = 2.0) -> list[Any]:
        """Take every message waiting in the dead-letter queue."""
        queue = Topology.from_settings(self.settings).dead_letter_queue
        taken: list[Any] = []
        with connect(self.settings.broker_url, tls=self.settings.tls.broker) as connection:
            with Consumer(connection, queues=[queue], on_message=taken.append):
                try:
                    while True:
                        connection.drain_events(timeout=timeout_s)
                except TimeoutError:
                    pass
            for message in taken:
                message.ack()
        return taken


@contextmanager
def running_relay(
    sandbox: SandboxServer, telemetry: Telemetry | None = None, **overrides: Any
) -> Iterator[RunningRelay]:
    """A worker with its own queues (unique names), stopped on exit."""
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "command_exchange": f"test.commands.{suffix}",
        "command_queue": f"test.commands.{suffix}",
        "event_exchange": f"test.events.{suffix}",
        "dead_letter_queue": f"test.commands.dead.{suffix}",
        "lane_queue_prefix": f"test.lane.{suffix}.",
        "retry_initial_wait_s": 0.01,
        "collect_interval_s": 0.05,
        **overrides,
    }
    settings = sandbox_settings(sandbox.base_url, sandbox.state.config, **values)
    service = RelayService(settings, telemetry or Telemetry.using())
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="relay")
    thread.start()
    try:
        assert service.consumer.connected.wait(10), "worker did not connect"
        topology = Topology.from_settings(settings)
        with CommandClient(settings.broker_url, topology, settings.tls.broker) as client:
            yield RunningRelay(settings, client, service, lambda: _stop(stop, thread))
    finally:
        _stop(stop, thread)


def embedded(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Settings for the embedded defaults (SQLite broker and idempotency store) in
    ``data_dir``, plus ``overrides``."""
    return {
        "broker_url": f"sqla+sqlite:///{data_dir / 'broker.sqlite3'}",
        "idempotency_url": f"sqlite:///{data_dir / 'idempotency.sqlite3'}",
        **overrides,
    }


def _stop(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), "worker did not stop"
