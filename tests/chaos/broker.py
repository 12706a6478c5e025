"""RabbitMQ from the outside, over pika: names, publishing, watching events, the outage.

pika, not the worker's kombu, so the scenarios talk to the broker the way an outside
playbook does.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from worker.broker.topology import Topology
from worker.settings import Settings

RECONNECT_PAUSE_S = 0.5
CTL_TIMEOUT_S = 120.0
# Errors after which a pika connection is gone and a new one is needed.
CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)


def pika_parameters(amqp_url: str) -> pika.URLParameters:
    # kombu spells the default vhost "//"; pika wants it percent-encoded.
    if amqp_url.endswith("//"):
        amqp_url = amqp_url[:-1] + "%2F"
    parameters = pika.URLParameters(amqp_url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 5
    parameters.blocked_connection_timeout = 30
    return parameters


@dataclass(frozen=True)
class Names:
    """Unique broker names for one scenario; everything starts with ``prefix``."""

    prefix: str

    @classmethod
    def unique(cls, scenario: str) -> Names:
        return cls(f"chaos.{scenario}.{uuid.uuid4().hex[:8]}")

    @property
    def command_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def command_queue(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def event_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.commands.dead"

    @property
    def observed_events(self) -> str:
        """The queue the scenario collects every result event in."""
        return f"{self.prefix}.observed-events"

    @property
    def replies(self) -> str:
        """The ``reply_to`` queue of messages a scenario follows by ``correlation_id``
        (the worker answers on reply queues named ``relay.replies.…`` only)."""
        return f"relay.replies.{self.prefix}"

    @property
    def lane_queue_prefix(self) -> str:
        """The prefix of the worker's lanes (``RELAY_LANE_QUEUE_PREFIX``)."""
        return f"{self.prefix}.lane."

    def lane_queue(self, vendor: str, tenant: str) -> str:
        """The lane of ``tenant``'s account at a rate-limited ``vendor``."""
        return f"{self.lane_queue_prefix}{vendor}.{tenant}"

    def delay_queues(self) -> list[str]:
        """The worker's delay queues with its default delays (retries and deferrals)."""
        defaults = Settings()
        delays_s = {*defaults.retry_delays_s, defaults.defer_delay_s}
        return [f"{self.command_queue}.delay.{round(d * 1000)}ms" for d in sorted(delays_s)]

    def worker_env(self) -> dict[str, str]:
        return {
            "RELAY_COMMAND_EXCHANGE": self.command_exchange,
            "RELAY_COMMAND_QUEUE": self.command_queue,
            "RELAY_EVENT_EXCHANGE": self.event_exchange,
            "RELAY_DEAD_LETTER_QUEUE": self.dead_letter_queue,
            "RELAY_LANE_QUEUE_PREFIX": self.lane_queue_prefix,
        }


class Admin:
    """Short-lived connections for declaring, inspecting and deleting."""

    def __init__(self, amqp_url: str, names: Names) -> None:
        self.amqp_url = amqp_url
        self.names = names

    @contextmanager
    def channel(self) -> Iterator[Any]:
        connection = pika.BlockingConnection(pika_parameters(self.amqp_url))
        try:
            yield connection.channel()
        finally:
            with suppress(*CONNECTION_ERRORS):
                connection.close()

    def queue_state(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of ``queue``; None when it does not exist."""
        try:
            with self.channel() as channel:
                declared = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        return declared.method.message_count, declared.method.consumer_count

    def wait_consumers(self, count: int, timeout_s: float) -> bool:
        """True once the command queue has exactly ``count`` consumers."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            with suppress(*CONNECTION_ERRORS):
                state = self.queue_state(self.names.command_queue)
                if state is not None and state[1] == count:
                    return True
            time.sleep(0.2)
        return False

    def declare_observer(self) -> None:
        """A durable queue bound to the event exchange with ``#``, to see every event."""
        with self.channel() as channel:
            # Same arguments as the worker's declaration (the contract's topic exchange).
            channel.exchange_declare(self.names.event_exchange, "topic", durable=True)
            channel.queue_declare(self.names.observed_events, durable=True)
            channel.queue_bind(self.names.observed_events, self.names.event_exchange, "#")

    def declare_replies(self) -> None:
        """The durable ``reply_to`` queue of the scenario (:attr:`Names.replies`)."""
        with self.channel() as channel:
            channel.queue_declare(self.names.replies, durable=True)

    def drain(self, queue: str, limit: int = 100_000) -> list[tuple[Any, bytes]]:
        """Take every message out of ``queue`` (properties, body); [] when it is gone."""
        taken: list[tuple[Any, bytes]] = []
        try:
            with self.channel() as channel:
                while len(taken) < limit:
                    method, properties, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        break
                    taken.append((properties, body))
        except pika.exceptions.ChannelClosedByBroker:
            pass
        return taken

    def delete_everything(self, ctl: RabbitCtl | None, lanes: Iterable[str] = ()) -> None:
        """Delete the scenario's queues and exchanges, also those the worker derives from
        its settings (delay queues), its ``lanes`` and, with ``ctl``, any other under the
        prefix."""
        queues = {self.names.observed_events, self.names.replies, *self._worker_queues(), *lanes}
        exchanges = {self.names.command_exchange, self.names.event_exchange}
        if ctl is not None:
            queues |= set(ctl.names("list_queues", self.names.prefix))
            exchanges |= set(ctl.names("list_exchanges", self.names.prefix))
        with self.channel() as channel:
            for queue in sorted(queues):
                channel.queue_delete(queue)
            for exchange in sorted(exchanges):
                channel.exchange_delete(exchange)

    def _worker_queues(self) -> set[str]:
        """The queues the worker declares with the scenario's names and default settings."""
        names: dict[str, Any] = {
            k.removeprefix("RELAY_").lower(): v for k, v in self.names.worker_env().items()
        }
        topology = Topology.from_settings(Settings(broker_url=self.amqp_url, **names))
        queues = {topology.command_queue.name, topology.dead_letter_queue.name}
        delay_queues: dict[float, Any] = getattr(topology, "delay_queues", {})
        return queues | {queue.name for queue in delay_queues.values()}


@dataclass(frozen=True)
class RawMessage:
    """A message published as it is, whatever its body and properties hold (a publisher's
    mistake or an attack); ``properties`` are :class:`pika.BasicProperties` fields, and
    may hold bytes where AMQP wants UTF-8 text."""

    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    routing_key: str = "raw"


Publishable = dict[str, Any] | RawMessage


def publish(
    amqp_url: str,
    exchange: str,
    commands: Iterable[Publishable],
    published: Callable[[Publishable], None] | None = None,
) -> None:
    """Publish each command (persistent, confirmed, routing key = type) to ``exchange``;
    a :class:`RawMessage` goes out as it is. ``published`` is told of each confirmed one."""
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for command in commands:
            if isinstance(command, RawMessage):
                routing_key, body = command.routing_key, command.body
                properties = pika.BasicProperties(
                    **{"delivery_mode": pika.DeliveryMode.Persistent, **command.properties}
                )
            else:
                routing_key, body = command["type"], json.dumps(command).encode()
                properties = pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=command["id"],
                )
            channel.basic_publish(
                exchange=exchange,
                routing_key=routing_key,
                body=body,
                properties=properties,
                mandatory=True,  # an unroutable command raises instead of vanishing
            )
            if published is not None:
                published(command)
    finally:
        with suppress(*CONNECTION_ERRORS):
            connection.close()


def publish_paced(
    amqp_url: str,
    exchange: str,
    commands: list[dict[str, Any]],
    rate_per_s: float,
    published: Callable[[Publishable], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """:func:`publish`, one command every ``1 / rate_per_s`` seconds (a steady stream;
    a late one is sent at once, the schedule is kept), until ``stop`` is set."""
    started_at = time.monotonic()
    stop = stop or threading.Event()

    def on_schedule() -> Iterator[dict[str, Any]]:
        for index, command in enumerate(commands):
            if stop.wait(max(0.0, started_at + index / rate_per_s - time.monotonic())):
                return
            yield command

    publish(amqp_url, exchange, on_schedule(), published)


class PausableStream:
    """:func:`publish_paced` in the background, one connection per command, so that
    :meth:`paused` can hold it while the broker is away (e.g. stopped by the scenario):
    the commands due meanwhile go out at once when it resumes, then the schedule is kept.
    A publishing error ends it and is kept in :attr:`error`."""

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        commands: list[dict[str, Any]],
        rate_per_s: float,
        published: Callable[[Publishable], None] | None = None,
    ) -> None:
        self._url, self._exchange, self._commands = amqp_url, exchange, commands
        self._rate_per_s = rate_per_s
        self._published = published
        self._lock = threading.Lock()  # held while one command goes out, and while paused
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="paced-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        """Every command went out (or the stream ended on an error or a stop)."""
        return not self._thread.is_alive()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is published inside; entering waits for a command going out."""
        with self._lock:
            yield

    def stop(self, timeout_s: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        started_at = time.monotonic()
        try:
            for index, command in enumerate(self._commands):
                due_at = started_at + index / self._rate_per_s
                if self._stop.wait(max(0.0, due_at - time.monotonic())):
                    return
                with self._lock:
                    if self._stop.is_set():
                        return
                    publish(self._url, self._exchange, [command], self._published)
        except BaseException as error:
            self.error = error


def publish_in_parallel(
    amqp_url: str,
    exchange: str,
    commands: list[Publishable],
    connections: int = 4,
    published: Callable[[Publishable], None] | None = None,
) -> None:
    """:func:`publish` over several connections at once (confirms are per message)."""
    errors: list[BaseException] = []

    def publish_share(share: list[Publishable]) -> None:
        try:
            publish(amqp_url, exchange, share, published)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=publish_share, args=(commands[i::connections],), daemon=True)
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


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
        )


class EventCollector:
    """Consumes the observer queue on a thread of its own, reconnecting when the broker
    goes away; events redelivered after a reconnect are counted once (by event id)."""

    # Errors after which consuming starts again on a new connection.
    errors: tuple[type[BaseException], ...] = CONNECTION_ERRORS

    def __init__(self, url: str, queue: str) -> None:
        self._url = url
        self._queue = queue
        self._lock = threading.Lock()
        self._events: dict[str, SeenEvent] = {}
        self._by_command: dict[str, list[SeenEvent]] = {}
        self._by_correlation: dict[str, list[SeenEvent]] = {}
        self._first_seen: dict[str, float] = {}  # command id -> monotonic time
        self.reconnects = 0
        self.undecodable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except self.errors:
                self.reconnects += 1
                self._stop.wait(RECONNECT_PAUSE_S)

    def _consume(self) -> None:
        connection = pika.BlockingConnection(pika_parameters(self._url))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1000)
            for method, properties, body in channel.consume(self._queue, inactivity_timeout=0.2):
                if self._stop.is_set():
                    break
                if method is None:
                    continue
                self._add(body, getattr(properties, "correlation_id", None))
                channel.basic_ack(method.delivery_tag)
        finally:
            with suppress(*CONNECTION_ERRORS):
                connection.close()

    def _add(self, body: bytes, correlation_id: object = None) -> None:
        try:
            seen = SeenEvent.from_body(body)
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            if seen.event_id in self._events:
                return
            self._events[seen.event_id] = seen
            self._by_command.setdefault(seen.command_id, []).append(seen)
            self._first_seen.setdefault(seen.command_id, time.monotonic())
            if isinstance(correlation_id, str):
                self._by_correlation.setdefault(correlation_id, []).append(seen)

    def answered(self, command_ids: Iterable[str]) -> int:
        """How many of ``command_ids`` have at least one event."""
        with self._lock:
            return sum(1 for command_id in command_ids if command_id in self._by_command)

    def by_command(self) -> dict[str, list[SeenEvent]]:
        with self._lock:
            return {command_id: list(seen) for command_id, seen in self._by_command.items()}

    def by_correlation(self) -> dict[str, list[SeenEvent]]:
        """Events by the ``correlation_id`` they arrived with (reply queues)."""
        with self._lock:
            return {key: list(seen) for key, seen in self._by_correlation.items()}

    def first_seen(self) -> dict[str, float]:
        """When (``time.monotonic()``) the first event of each command id arrived."""
        with self._lock:
            return dict(self._first_seen)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._events)


class RabbitCtl:
    """``rabbitmqctl`` of the local node (or ``CHAOS_RABBITMQCTL``, e.g. a docker exec)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env

    @classmethod
    def find(cls) -> RabbitCtl | None:
        env = dict(os.environ)
        configured = os.environ.get("CHAOS_RABBITMQCTL")
        if configured:
            return cls(shlex.split(configured), env)
        path = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/sbin")
        if path is None:
            return None
        argv = [path]
        if os.geteuid() != 0 and shutil.which("sudo"):
            argv = ["sudo", "-n", "--preserve-env=RABBITMQ_NODENAME", path]
        # As .ci/services does: a node on a host whose name does not resolve is named
        # after localhost.
        if "RABBITMQ_NODENAME" not in env and not _resolves(socket.gethostname().split(".")[0]):
            env["RABBITMQ_NODENAME"] = "rabbit@localhost"
        ctl = cls(argv, env)
        return ctl if ctl.works() else None

    def run(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        # Its own process group, so that a CLI hanging on a stuck node is killed with the
        # Erlang VM it started, not just the wrapper script.
        process = subprocess.Popen(
            [*self.argv, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.strip()}")
        return out

    def works(self) -> bool:
        try:
            self.run("-q", "status", timeout_s=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return False
        return True

    def names(self, what: str, prefix: str) -> list[str]:
        """Queue or exchange names (``list_queues``/``list_exchanges``) with ``prefix``."""
        try:
            out = self.run("-q", what, "name", "--no-table-headers", timeout_s=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return []
        return [line.strip() for line in out.splitlines() if line.strip().startswith(prefix)]

    def stop_app(self) -> None:
        self.run("stop_app")

    def start_app(self) -> None:
        self.run("start_app")
        self.run("await_startup", "--timeout", str(int(CTL_TIMEOUT_S)))


def _resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
    except OSError:
        return False
    return True
