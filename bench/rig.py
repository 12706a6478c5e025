"""One benchmark run's broker objects, processes and event collector, cleaned up on exit.

Every run gets its own exchange and queue names, so runs never see each other's messages,
and deletes them at the end; its processes are stopped even when the run fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from kombu.message import Message
from prometheus_client.parser import text_string_to_metric_families

from bench import vendor
from bench.procs import Proc, Procs, read_line
from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.settings import Settings

PERSISTENT = 2
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Options:
    amqp_url: str
    redis_url: str
    commands: int  # commands per throughput run
    seconds: float  # longest wait for one run's events
    concurrency: int  # RELAY_CONCURRENCY of the fast-vendor runs
    replicas: int  # replicas of the rate-limit run
    ratelimit_seconds: float
    latency_commands: int
    coalesce_commands: int  # single-object deletes of the coalescing-on run
    coalesce_off_commands: int  # of the coalescing-off run (10/s: a tenth of a second each)
    coalesce_window_ms: float  # RELAY_BATCH_DELETE_WINDOW_MS of the "on" run
    celery_pool: str
    celery_concurrency: int
    raw_prefetch: int
    tracing: bool
    log_level: str
    worker_env: dict[str, str]
    log_dir: Path
    profile: Path | None
    rounds: int = 3  # alternating runs of command-relay and the anchors; medians reported
    isolation_replicas: tuple[int, ...] = (1, 4)  # one isolation run per replica count
    isolation_backlog: int = 10_000  # single-object deletes of the flooding tenant
    isolation_quiet: int = 40  # quiet commands per measured phase (sent at 4/s)
    isolation_fair_commands: int = 300  # per flooded account of the fairness runs
    isolation_fylr_commands: int = 2000  # the unlimited vendor's flood (fylr cancel-task)


class Rig:
    """Names, topology, processes and collector of one run."""

    def __init__(self, options: Options, label: str) -> None:
        self.options = options
        self.run_id = f"{label}.{uuid.uuid4().hex[:8]}"
        self.procs = Procs(options.log_dir / self.run_id)
        base = f"bench.{self.run_id}"
        self.settings = Settings(
            broker_url=options.amqp_url,
            command_exchange=f"{base}.commands",
            command_queue=f"{base}.commands",
            event_exchange=f"{base}.events",
            dead_letter_queue=f"{base}.dead",
        )
        self.topology = Topology.from_settings(self.settings)
        self.extra_queues: list[Queue] = []
        self.extra_names: tuple[list[str], list[str]] = ([], [])  # (queues, exchanges)
        self.collector: EventCollector | None = None

    def __enter__(self) -> Rig:
        with connect(self.options.amqp_url) as connection:
            self.topology.declare(connection.channel())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.collector is not None:
                self.collector.stop()
        finally:
            self.procs.stop_all()
            self._delete_broker_objects()

    # --- processes ---

    def sandbox(self, *, rate_limited: bool, latency_ms: float = 0.0) -> str:
        """Start the vendor sandbox; returns its base URL."""
        argv = [sys.executable, "-m", "bench.sandbox_proc", "--latency-ms", str(latency_ms)]
        if not rate_limited:
            argv.append("--no-rate-limit")
        proc = self.procs.start("sandbox", argv, stdout_pipe=True)
        self.sandbox_proc = proc
        return read_line(proc, START_TIMEOUT_S)

    def relay(
        self, sandbox_url: str, *, replicas: int, concurrency: int, rate_limits: dict[str, str],
        tenants: dict[str, Any] | None = None, env: dict[str, str] | None = None,
        health_ports: list[int] | None = None,
    ) -> list[Proc]:
        """Start ``replicas`` command-relay processes, all features on. ``tenants``
        (``RELAY_TENANTS``; default: one ESET account) and ``env`` come before
        ``--worker-env``; replica i serves ``/metrics`` on ``health_ports[i]`` if given."""
        options = self.options
        base_env = {
            **os.environ,
            "RELAY_BROKER_URL": options.amqp_url,
            "RELAY_COMMAND_EXCHANGE": self.settings.command_exchange,
            "RELAY_COMMAND_QUEUE": self.settings.command_queue,
            "RELAY_EVENT_EXCHANGE": self.settings.event_exchange,
            "RELAY_DEAD_LETTER_QUEUE": self.settings.dead_letter_queue,
            "RELAY_CONCURRENCY": str(concurrency),
            "RELAY_IDEMPOTENCY_URL": options.redis_url,
            "RELAY_IDEMPOTENCY_RETENTION_S": "900",  # keeps Redis from filling up over runs
            "RELAY_RATE_LIMITS": json.dumps(rate_limits),
            "RELAY_RATE_LIMIT_URL": options.redis_url,
            "RELAY_ESET_HOST_TEMPLATE": vendor.host_template(sandbox_url),
            "RELAY_TENANTS": json.dumps(tenants or vendor.eset_tenants()),
            "RELAY_LOG_LEVEL": options.log_level,
            "BENCH_TRACING": "sdk-noop" if options.tracing else "off",
            **(env or {}),
            **options.worker_env,
        }
        argv = [sys.executable, "-m", "bench.relay_worker"]
        ports = health_ports or []
        procs = []
        for i in range(replicas):
            health = {"RELAY_HEALTH_PORT": str(ports[i])} if i < len(ports) else {}
            procs.append(self.procs.start(f"relay-{i}", argv, {**base_env, **health}))
        return procs

    # --- messages ---

    def collect_events(self) -> EventCollector:
        self.collector = EventCollector(self.options.amqp_url, self.topology.events, self.run_id)
        return self.collector.start()

    def publish_backlog(self, commands: list[dict[str, Any]]) -> None:
        """Publish with confirms (unconfirmed ones were seen to go missing), then wait
        until the queue reports them all."""
        with connect(self.options.amqp_url) as connection:
            producer = Producer(connection.channel())
            for command in commands:
                publish_command(producer, self.topology.commands, command)
        self.wait_queue_depth(self.topology.command_queue.name, len(commands))

    def publish_burst(self, commands: list[dict[str, Any]], timeout_s: float = 60.0) -> None:
        """Publish as fast as the broker takes them, as a flooding publisher would: the
        channel in confirm mode, every confirm awaited once all are sent; a nack raises."""
        with connect(self.options.amqp_url, wait_for_confirms=False) as connection:
            channel = connection.channel()
            confirms = _Confirms(channel)
            producer = Producer(channel)
            for command in commands:
                publish_command(producer, self.topology.commands, command)
            give_up_at = time.monotonic() + timeout_s
            while confirms.count() < len(commands):
                if time.monotonic() > give_up_at:
                    raise TimeoutError(f"{confirms.count()} of {len(commands)} confirmed")
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)

    def queue_depth(self, queue_name: str) -> int | None:
        """Messages ready in a queue (not those delivered and unacked); None if it is
        missing."""
        with connect(self.options.amqp_url) as connection:
            try:
                return int(connection.channel().queue_declare(
                    queue_name, passive=True).message_count)
            except ChannelError:
                return None

    def delete_queues_at_exit(self, names: list[str]) -> None:
        """Queues the replicas declare (e.g. per-account lanes), deleted with the rest."""
        self.extra_names[0].extend(names)

    def wait_queue_depth(self, queue_name: str, count: int, timeout_s: float = 60.0) -> None:
        give_up_at = time.monotonic() + timeout_s
        with connect(self.options.amqp_url) as connection:
            channel = connection.channel()
            while True:
                depth = channel.queue_declare(queue_name, passive=True).message_count
                if depth >= count:
                    return
                if time.monotonic() > give_up_at:
                    raise TimeoutError(f"{queue_name} holds {depth} of {count} messages")
                time.sleep(0.1)

    def _delete_broker_objects(self) -> None:
        topology = self.topology
        with connect(self.options.amqp_url) as connection:
            channel = connection.channel()
            # Delay queues of delayed retries, where the worker has them.
            delays = list(getattr(topology, "delay_queues", {}).values())
            queues = [topology.command_queue, topology.dead_letter_queue, *delays,
                      *self.extra_queues]
            for queue in queues:
                channel.queue_delete(queue.name)
                if queue.exchange is not None and queue.exchange.name:
                    channel.exchange_delete(queue.exchange.name)
            channel.exchange_delete(topology.events.name)
            queue_names, exchange_names = self.extra_names
            for name in queue_names:
                channel.queue_delete(name)
            for name in exchange_names:
                channel.exchange_delete(name)


def batch_delete_commands(count: int) -> list[dict[str, Any]]:
    return [
        {"type": "batch-delete", "id": str(uuid.uuid4()),
         "params": {"object_uuids": [str(uuid.uuid4())]}}
        for _ in range(count)
    ]


def publish_command(producer: Producer, exchange: Exchange, command: dict[str, Any]) -> None:
    producer.publish(
        json.dumps(command).encode(),
        exchange=exchange,
        routing_key=command["type"],
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=PERSISTENT,
        message_id=command["id"],
        retry=False,
    )


class _Confirms:
    """The publisher confirms of one channel, numbered by RabbitMQ 1, 2, 3…"""

    def __init__(self, channel: Any) -> None:
        self._floor = 0  # every publish up to this one is confirmed ("multiple")
        self._single: set[int] = set()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._floor = max(self._floor, tag)
        else:
            self._single.add(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        raise RuntimeError(f"the broker refused publish {tag} (multiple: {multiple})")

    def count(self) -> int:
        return self._floor + sum(tag > self._floor for tag in self._single)


class EventCollector:
    """Every message on the events exchange (``#``), with its arrival time (monotonic)."""

    def __init__(self, broker_url: str, events: Exchange, label: str) -> None:
        self._broker_url = broker_url
        self._queue = Queue(
            f"bench.{label}.watch", exchange=events, routing_key="#",
            durable=False, exclusive=True, auto_delete=True,
        )
        self.arrivals: list[tuple[float, bytes]] = []  # (monotonic, body)
        self.arrived_at: list[float] = []  # wall clock (time.time), to compare with events
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> EventCollector:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"event collector did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            with Connection(self._broker_url) as connection, Consumer(
                connection.channel(), queues=[self._queue], on_message=self._on_message,
                no_ack=True,
            ):
                self._ready.set()
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        connection.drain_events(timeout=0.2)
        except BaseException as error:
            self._error = error
            raise

    def _on_message(self, message: Message) -> None:
        arrived, arrived_at = time.monotonic(), time.time()
        with self._changed:
            self.arrivals.append((arrived, message.body))
            self.arrived_at.append(arrived_at)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float, check: Callable[[], None]) -> bool:
        """True once ``count`` events arrived; False after ``timeout_s``. ``check`` runs
        every 0.2 s (it raises when a process of the run died)."""
        give_up_at = time.monotonic() + timeout_s
        with self._changed:
            while len(self.arrivals) < count:
                left_s = give_up_at - time.monotonic()
                if left_s <= 0:
                    return False
                self._changed.wait(min(0.2, left_s))
                check()
        return True

    def times(self) -> list[float]:
        with self._changed:
            return sorted(t for t, _ in self.arrivals)


def steady_rate(times: list[float], skip: int) -> float | None:
    """Events per second between the ``skip``-th and the last arrival: the first ones are
    left out so that start-up (connections, first token) does not count."""
    if len(times) <= skip + 1:
        return None
    span_s = times[-1] - times[skip]
    return (len(times) - 1 - skip) / span_s if span_s > 0 else None


def outcomes(arrivals: list[tuple[float, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, body in arrivals:
        outcome = str(json.loads(body).get("data", {}).get("outcome"))
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def free_port() -> int:
    """A TCP port nothing listens on now (for a replica's /metrics)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape_metrics(port: int, timeout_s: float = 5.0) -> Samples:
    """A replica's ``/metrics``: sample name → (labels, value) of each sample."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples
