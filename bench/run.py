"""One benchmark run's broker objects, processes and event collector, cleaned up on exit.

Every run gets its own exchange and queue names, so runs never see each other's messages,
and deletes them at the end; its processes are stopped even when the run fails.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kombu import Producer, Queue
from kombu.exceptions import ChannelError

from bench.commands import Confirms, publish_command
from bench.rig.events import EventCollector, subscription
from bench.rig.names import Names
from bench.rig.procs import Proc
from bench.rig.tenants import sandbox_tenants
from bench.rig.world import World
from worker.broker.connection import connect


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


class Rig(World):
    """A benchmark run's world, its topology declared up front (a backlog is published
    before the replicas start), and deleted at the end."""

    def __init__(self, options: Options, label: str) -> None:
        names = Names.unique("bench", label)
        super().__init__(names, options.amqp_url, options.log_dir / names.prefix)
        self.options = options
        self.extra_queues: list[Queue] = []
        self.extra_names: tuple[list[str], list[str]] = ([], [])  # (queues, exchanges)

    def __enter__(self) -> Rig:
        with connect(self.broker_url) as connection:
            self.topology.declare(connection.channel())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_collectors()
        finally:
            self.procs.stop_all()
            self._delete_broker_objects()

    def relay(
        self, *, replicas: int, concurrency: int, rate_limits: dict[str, str],
        tenants: dict[str, Any] | None = None, env: dict[str, str] | None = None,
        health_ports: Sequence[int] = (),
    ) -> list[Proc]:
        """Start ``replicas`` command-relay processes, all features on. ``tenants``
        (``RELAY_TENANTS``; default: one ESET account) and ``env`` come before
        ``--worker-env``; replica i serves ``/metrics`` on ``health_ports[i]`` if given."""
        assert self.sandbox is not None, "the sandbox first"
        options = self.options
        env = {
            "RELAY_CONCURRENCY": str(concurrency),
            "RELAY_IDEMPOTENCY_RETENTION_S": "900",  # keeps Redis from filling up over runs
            "RELAY_LOG_LEVEL": options.log_level,
            "BENCH_TRACING": "sdk-noop" if options.tracing else "off",
            **(env or {}),
            **options.worker_env,
        }
        fleet = self.start_replicas(
            replicas, store_url=options.redis_url, rate_limit_url=options.redis_url,
            rate_limits=rate_limits, env=env, health_ports=health_ports,
            tenants=tenants or sandbox_tenants(self.sandbox.base_url, {"default": ["eset"]}),
        )
        return fleet.procs

    # --- messages ---

    def collect_events(self) -> EventCollector:
        self.collector = self.collect(partial(
            subscription, self.broker_url, self.topology.events, self.names.observed_events
        ))
        return self.collector

    def publish_backlog(self, commands: list[dict[str, Any]]) -> None:
        """Publish with confirms (unconfirmed ones were seen to go missing), then wait
        until the queue reports them all."""
        with connect(self.broker_url) as connection:
            producer = Producer(connection.channel())
            for command in commands:
                publish_command(producer, self.topology.commands, command)
        self.wait_queue_depth(self.topology.command_queue.name, len(commands))

    def publish_burst(self, commands: list[dict[str, Any]], timeout_s: float = 60.0) -> None:
        """Publish as fast as the broker takes them, as a flooding publisher would: the
        channel in confirm mode, every confirm awaited once all are sent; a nack raises."""
        with connect(self.broker_url, wait_for_confirms=False) as connection:
            channel = connection.channel()
            confirms = Confirms(channel)
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
        with connect(self.broker_url) as connection:
            try:
                return int(connection.channel().queue_declare(
                    queue_name, passive=True).message_count)
            except ChannelError:
                return None

    def wait_queue_depth(self, queue_name: str, count: int, timeout_s: float = 60.0) -> None:
        give_up_at = time.monotonic() + timeout_s
        with connect(self.broker_url) as connection:
            channel = connection.channel()
            while True:
                depth = channel.queue_declare(queue_name, passive=True).message_count
                if depth >= count:
                    return
                if time.monotonic() > give_up_at:
                    raise TimeoutError(f"{queue_name} holds {depth} of {count} messages")
                time.sleep(0.1)

    def _delete_broker_objects(self) -> None:
        with connect(self.broker_url) as connection:
            channel = connection.channel()
            # The replicas' queues (lanes and delay queues included) and the anchors'.
            for queue in [*self.topology.queues, *self.extra_queues]:
                channel.queue_delete(queue.name)
                if queue.exchange is not None and queue.exchange.name:
                    channel.exchange_delete(queue.exchange.name)
            channel.exchange_delete(self.topology.events.name)
            queue_names, exchange_names = self.extra_names
            for name in queue_names:
                channel.queue_delete(name)
            for name in exchange_names:
                channel.exchange_delete(name)
