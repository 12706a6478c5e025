"""One scenario's world on RabbitMQ: sandbox, replicas, queues, Redis database, events.

    rig.start(replicas=3)
    rig.publish(workload)
    rig.run_until_answered(workload, timeout_s=90, chaos=every_so_often)
    figures = rig.finish(workload)

:meth:`ChaosRig.close` kills every process it started, puts RabbitMQ back if a scenario
stopped it, deletes the scenario's queues and exchanges and empties its Redis database,
also when the scenario failed half-way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import redis

from bench.rig.events import EventCollector

from .broker import (
    CONNECTION_ERRORS,
    Admin,
    PausableStream,
    Publishable,
    RabbitCtl,
    consume_over_pika,
    publish,
    publish_in_parallel,
    publish_paced,
)
from .figures import Workload
from .scenario import Chaos, ScenarioRig

REDIS_DB = 14  # the chaos suite's own database, emptied at the start of each scenario
READY_TIMEOUT_S = 30.0
PIKA_LOG = logging.getLogger("pika")


def chaos_redis_url(redis_url: str) -> str:
    return urlunparse(urlparse(redis_url)._replace(path=f"/{REDIS_DB}"))


class ChaosRig(ScenarioRig):
    def __init__(self, scenario: str, amqp_url: str, redis_url: str, log_dir: Path) -> None:
        self.redis_url = chaos_redis_url(redis_url)
        super().__init__(
            scenario, log_dir, amqp_url, store_url=self.redis_url, rate_limit_url=self.redis_url
        )
        self.admin = Admin(amqp_url, self.names)
        self._ctl: RabbitCtl | None = None  # found when a scenario needs it (it is slow)
        self.replies: EventCollector | None = None  # the reply_to queue, when observed
        self.published_at: dict[str, float] = {}  # command id -> monotonic, once confirmed
        self.rabbit_stopped = False
        self._publisher: threading.Thread | None = None
        self._streams: list[PausableStream] = []
        self._stop_publishing = threading.Event()  # ends a paced stream early (teardown)
        self._publish_error: BaseException | None = None
        with redis.Redis.from_url(self.redis_url) as client:
            client.flushdb()
        # pika logs every refused reconnect (the outage) and expected 404 (waiting for the
        # worker's queue) as errors; the figures count what matters.
        self._pika_log_level = PIKA_LOG.level
        PIKA_LOG.setLevel(logging.CRITICAL)

    @property
    def ctl(self) -> RabbitCtl | None:
        """``rabbitmqctl`` of the broker's node, None when it is not usable from here."""
        if self._ctl is None:
            self._ctl = RabbitCtl.find()
        return self._ctl

    # --- setting up ---

    def start(
        self,
        *,
        replicas: int,
        rate_limited: bool = False,
        concurrency: int = 32,
        claim_lease_s: float = 3.0,
        tenants: Iterable[str] = (),
        replica_env: Sequence[Mapping[str, str]] = (),
        **settings: str,
    ) -> None:
        """The sandbox, then ``replicas`` workers; returns once all of them consume.
        ``tenants``: besides ``default``, each with an ESET user of its own.
        ``replica_env[i]``: replica i's own settings, on top of ``settings``."""
        self._start_replicas(
            replicas,
            rate_limited=rate_limited,
            tenants=tenants,
            claim_lease_s=claim_lease_s,
            settings={"RELAY_CONCURRENCY": str(concurrency), **settings},
            replica_env=replica_env,
        )
        assert self.fleet is not None
        if not self.admin.wait_consumers(replicas, READY_TIMEOUT_S):
            raise AssertionError(
                f"{replicas} replicas were not consuming within {READY_TIMEOUT_S:g}s:\n"
                + self.fleet.log_tails()
            )
        self.admin.declare_observer()  # before anything is published
        self.collector = self._consume(self.names.observed_events)

    def observe_replies(self) -> str:
        """Declare and consume the scenario's ``reply_to`` queue (events by
        ``correlation_id``, in :attr:`replies`); returns its name."""
        self.admin.declare_replies()
        self.replies = self._consume(self.names.replies)
        return self.names.replies

    def _consume(self, queue: str) -> EventCollector:
        consume = partial(consume_over_pika, self.broker_url, queue)
        return self.collect(consume, reconnect_on=CONNECTION_ERRORS)

    def sandbox_faults(self, **faults: Any) -> None:
        """Switch vendor faults on (``Faults`` fields); they apply to every later call."""
        assert self.sandbox is not None
        self.sandbox.set_faults(**faults)
        self.extra["faults"] = faults

    def publish(
        self, workload: Workload, *, background: bool = False, rate_per_s: float | None = None
    ) -> None:
        """Publish every command (confirmed); the scenario clock starts here. In the
        background, :meth:`run_until_answered` runs its chaos while commands still go out.
        With ``rate_per_s``, a steady stream on one connection instead of all at once."""
        url, exchange, commands = self.broker_url, self.names.command_exchange, workload.commands

        def send() -> None:
            if rate_per_s is None:
                publish_in_parallel(url, exchange, list(commands), published=self._sent)
            else:
                publish_paced(
                    url, exchange, commands, rate_per_s, self._sent, self._stop_publishing
                )

        self._start_publishing(send, background)

    def publish_items(self, items: list[Publishable], *, background: bool = False) -> None:
        """Commands and raw messages (:class:`~.broker.RawMessage`), confirmed, over one
        connection so that they arrive in the order given; the scenario clock starts here."""
        url, exchange = self.broker_url, self.names.command_exchange
        self._start_publishing(lambda: publish(url, exchange, items, self._sent), background)

    def publish_stream(self, workload: Workload, rate_per_s: float) -> PausableStream:
        """Publish ``workload`` in the background at ``rate_per_s``, one connection per
        command, besides what :meth:`publish` sends (its clock is kept); the stream's
        ``paused()`` holds it, e.g. while RabbitMQ is stopped."""
        stream = PausableStream(
            self.broker_url, self.names.command_exchange, workload.commands, rate_per_s, self._sent
        )
        self._streams.append(stream)
        stream.start()
        return stream

    def _sent(self, item: Publishable) -> None:
        if isinstance(item, dict):
            self.published_at[item["id"]] = time.monotonic()

    def _start_publishing(self, send: Callable[[], None], background: bool) -> None:
        self.started_at = time.monotonic()
        if not background:
            self._publish(send)
            return
        self._publisher = threading.Thread(
            target=self._publish, args=(send,), name="publisher", daemon=True
        )
        self._publisher.start()

    def _publish(self, send: Callable[[], None]) -> None:
        try:
            send()
        except BaseException as error:
            self._publish_error = error
            raise
        self.extra["publish_s"] = round(time.monotonic() - self.started_at, 2)

    # --- running ---

    def run_until_answered(
        self, workload: Workload, timeout_s: float, chaos: Chaos | None = None
    ) -> bool:
        """Wait until every command has an event (True) or ``timeout_s`` has passed,
        calling ``chaos`` on the way; replicas that die on their own are started again
        (and counted as crashes)."""
        total = len(workload.commands)
        return self.run_until(lambda: self.answered(workload) == total, timeout_s, chaos)

    def _check_publishing(self) -> None:
        if self._publish_error is not None:
            raise AssertionError("publishing failed") from self._publish_error
        for stream in self._streams:
            if stream.error is not None:
                raise AssertionError("publishing a stream failed") from stream.error

    def stop_rabbitmq(self) -> None:
        assert self.ctl is not None
        self.rabbit_stopped = True
        self.ctl.stop_app()

    def start_rabbitmq(self) -> None:
        assert self.ctl is not None
        self.ctl.start_app()
        self.rabbit_stopped = False

    # --- results ---

    def _note_leftovers(self) -> None:
        with suppress(*CONNECTION_ERRORS):
            self.extra["left_in_queue"] = self._ready(self.names.command_queue)
            self.extra["dead_lettered"] = self._ready(self.names.dead_letter_queue)
            # Commands waiting out a delayed retry or a deferral, or routed into a lane:
            # where a command without its event may still be.
            delayed = self._waiting(q.name for q in self.topology.delay_queues.values())
            laned = self._waiting(lane.queue.name for lane in self.topology.lanes.values())
            if delayed:
                self.extra["in_delay_queues"] = delayed
            if laned:
                self.extra["in_lanes"] = laned

    def _waiting(self, queues: Iterable[str]) -> dict[str, int]:
        """The queues that hold messages ready, and how many."""
        return {name: ready for name in queues if (ready := self._ready(name))}

    def _ready(self, queue: str) -> int | None:
        state = self.admin.queue_state(queue)
        return None if state is None else state[0]

    # --- tearing down ---

    def close(self) -> None:
        try:
            super().close()
        finally:
            PIKA_LOG.setLevel(self._pika_log_level)

    def _closing_steps(self) -> list[Callable[[], None]]:
        return [
            self._stop_publishers,
            *super()._closing_steps(),
            self._restore_rabbitmq,
            self._delete_queues,
            self._empty_redis,
        ]

    def _stop_publishers(self) -> None:
        self._stop_publishing.set()
        if self._publisher is not None:
            self._publisher.join(30)
        for stream in self._streams:
            stream.stop()

    def _restore_rabbitmq(self) -> None:
        if self.rabbit_stopped and self._ctl is not None:
            self.start_rabbitmq()

    def _delete_queues(self) -> None:
        with suppress(*CONNECTION_ERRORS):
            self.admin.delete_everything(self._ctl, self.topology)

    def _empty_redis(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            client.flushdb()
