"""RabbitMQ from the outside, over pika: publishing, watching events, the outage.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from bench.rig.events import Deliver
from bench.rig.names import Names
from worker.broker.topology import Topology

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

    def delete_everything(self, ctl: RabbitCtl | None, topology: Topology) -> None:
        """Delete the scenario's queues and exchanges: its own, those of the replicas'
        ``topology`` (delay queues and lanes included) and, with ``ctl``, any other under
        the prefix."""
        queues = {
            self.names.observed_events,
            self.names.replies,
            *(queue.name for queue in topology.queues),
        }
        exchanges = {self.names.command_exchange, self.names.event_exchange}
        if ctl is not None:
            queues |= set(ctl.names("list_queues", self.names.prefix))
            exchanges |= set(ctl.names("list_exchanges", self.names.prefix))
        with self.channel() as channel:
            for queue in sorted(queues):
                channel.queue_delete(queue)
            for exchange in sorted(exchanges):
                channel.exchange_delete(exchange)


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


def consume_over_pika(
    amqp_url: str, queue: str, deliver: Deliver, ready: Callable[[], None], stop: threading.Event
) -> None:
    """Consume ``queue`` with acknowledgements, as a playbook would, so that what arrived
    while the broker was away is delivered after a reconnect (a
    :data:`~bench.rig.events.Consume`, once its first two arguments are given)."""
    connection = pika.BlockingConnection(pika_parameters(amqp_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        ready()
        for method, properties, body in channel.consume(queue, inactivity_timeout=0.2):
            if stop.is_set():
                break
            if method is None:
                continue
            deliver(body, getattr(properties, "correlation_id", None))
            channel.basic_ack(method.delivery_tag)
    finally:
        with suppress(*CONNECTION_ERRORS):
            connection.close()


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
