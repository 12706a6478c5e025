"""One scenario's world: sandbox, replicas, queues, Redis database, event collector.

    rig.start(replicas=3)
    rig.publish(workload)
    rig.run_until_answered(workload, timeout_s=90, chaos=every_so_often)
    figures = rig.finish(workload)

:meth:`ChaosRig.close` kills every process it started, puts RabbitMQ back if a scenario
stopped it, deletes the scenario's queues and exchanges and empties its Redis database,
also when the scenario failed half-way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import redis

from .broker import (
    CONNECTION_ERRORS,
    Admin,
    EventCollector,
    Names,
    PausableStream,
    Publishable,
    RabbitCtl,
    publish,
    publish_in_parallel,
    publish_paced,
)
from .figures import Figures, Workload, closing_figures
from .processes import Fleet, SandboxProcess, diagnostics, tenants_json

REDIS_DB = 14  # the chaos suite's own database, emptied at the start of each scenario
READY_TIMEOUT_S = 30.0
SETTLE_S = 1.0  # after the last command is answered, for late replays to arrive
POLL_S = 0.1
PIKA_LOG = logging.getLogger("pika")

Chaos = Callable[[float], None]  # called with the seconds since publishing started


def chaos_redis_url(redis_url: str) -> str:
    return urlunparse(urlparse(redis_url)._replace(path=f"/{REDIS_DB}"))


class ChaosRig:
    def __init__(self, scenario: str, amqp_url: str, redis_url: str, log_dir: Path) -> None:
        self.scenario = scenario
        self.amqp_url = amqp_url
        self.redis_url = chaos_redis_url(redis_url)
        self.log_dir = log_dir
        self.names = Names.unique(scenario)
        self.admin = Admin(amqp_url, self.names)
        self._ctl: RabbitCtl | None = None  # found when a scenario needs it (it is slow)
        self.sandbox: SandboxProcess | None = None
        self.fleet: Fleet | None = None
        self.lanes: list[str] = []  # the worker's lane queues, by the tenants and limits
        self.collector: EventCollector | None = None
        self.replies: EventCollector | None = None  # the reply_to queue, when observed
        self.published_at: dict[str, float] = {}  # command id -> monotonic, once confirmed
        self.rabbit_stopped = False
        self.started_at = 0.0
        self.answered_at: float | None = None
        self.extra: dict[str, Any] = {}
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
        eset_users: Mapping[str, str] | None = None,
        **settings: str,
    ) -> None:
        """The sandbox, then ``replicas`` workers; returns once all of them consume.
        ``eset_users``: tenants besides ``default``, each with an ESET user of its own
        (:func:`~.processes.tenants_json`)."""
        self.sandbox = SandboxProcess(self.log_dir, rate_limited=rate_limited)
        rate_limits = {"eset": "10/second"} if rate_limited else {}
        # A lane per tenant with an account of a limited vendor (each has an ESET one).
        self.lanes = [
            self.names.lane_queue(vendor, tenant)
            for vendor in rate_limits
            for tenant in ["default", *(eset_users or {})]
        ]
        env = {
            **self.names.worker_env(),
            "RELAY_BROKER_URL": self.amqp_url,
            "RELAY_IDEMPOTENCY_URL": self.redis_url,
            "RELAY_RATE_LIMIT_URL": self.redis_url,
            "RELAY_RATE_LIMITS": json.dumps(rate_limits),
            "RELAY_ESET_HOST_TEMPLATE": f"{self.sandbox.base_url}/eset/{{region}}/{{service}}",
            "RELAY_TENANTS": tenants_json(self.sandbox.base_url, eset_users),
            "RELAY_RETRY_INITIAL_WAIT_S": "0.05",
            "RELAY_COLLECT_INTERVAL_S": "0.1",
            "RELAY_CLAIM_LEASE_S": str(claim_lease_s),
            "RELAY_CONCURRENCY": str(concurrency),
            # Per-command lines cost CPU the replicas need; CHAOS_LOG_LEVEL=INFO to see them.
            "RELAY_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
            "RELAY_LOG_FORMAT": "json",  # with command ids and keys, to trace one key
            **settings,
        }
        self.fleet = Fleet(env, self.log_dir, replicas)
        if not self.admin.wait_consumers(replicas, READY_TIMEOUT_S):
            raise AssertionError(
                f"{replicas} replicas were not consuming within {READY_TIMEOUT_S:g}s:\n"
                + self.fleet.log_tails()
            )
        self.admin.declare_observer()  # before anything is published
        self.collector = EventCollector(self.amqp_url, self.names.observed_events)
        self.collector.start()

    def observe_replies(self) -> str:
        """Declare and consume the scenario's ``reply_to`` queue (events by
        ``correlation_id``, in :attr:`replies`); returns its name."""
        self.admin.declare_replies()
        self.replies = EventCollector(self.amqp_url, self.names.replies)
        self.replies.start()
        return self.names.replies

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
        url, exchange, commands = self.amqp_url, self.names.command_exchange, workload.commands

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
        url, exchange = self.amqp_url, self.names.command_exchange
        self._start_publishing(lambda: publish(url, exchange, items, self._sent), background)

    def publish_stream(self, workload: Workload, rate_per_s: float) -> PausableStream:
        """Publish ``workload`` in the background at ``rate_per_s``, one connection per
        command, besides what :meth:`publish` sends (its clock is kept); the stream's
        ``paused()`` holds it, e.g. while RabbitMQ is stopped."""
        stream = PausableStream(
            self.amqp_url, self.names.command_exchange, workload.commands, rate_per_s, self._sent
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

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def answered(self, workload: Workload) -> int:
        assert self.collector is not None
        return self.collector.answered(workload.command_ids)

    def run_until_answered(
        self, workload: Workload, timeout_s: float, chaos: Chaos | None = None
    ) -> bool:
        """Wait until every command has an event (True) or ``timeout_s`` has passed,
        calling ``chaos`` on the way; replicas that die on their own are started again
        (and counted as crashes)."""
        total = len(workload.commands)
        return self.run_until(lambda: self.answered(workload) == total, timeout_s, chaos)

    def run_until(
        self, done: Callable[[], bool], timeout_s: float, chaos: Chaos | None = None
    ) -> bool:
        """:meth:`run_until_answered` with a condition of the scenario's own."""
        assert self.fleet is not None
        give_up_at = self.started_at + timeout_s
        while time.monotonic() < give_up_at:
            if self._publish_error is not None:
                raise AssertionError("publishing failed") from self._publish_error
            for stream in self._streams:
                if stream.error is not None:
                    raise AssertionError("publishing a stream failed") from stream.error
            self.fleet.check_alive()
            if done():
                self.answered_at = time.monotonic()
                return True
            if chaos is not None:
                chaos(self.elapsed_s)
            time.sleep(POLL_S)
        return False

    def stop_rabbitmq(self) -> None:
        assert self.ctl is not None
        self.rabbit_stopped = True
        self.ctl.stop_app()

    def start_rabbitmq(self) -> None:
        assert self.ctl is not None
        self.ctl.start_app()
        self.rabbit_stopped = False

    # --- results ---

    def finish(self, workload: Workload) -> Figures:
        """Let late events arrive, stop the replicas (SIGTERM), and compute the figures."""
        assert self.fleet is not None and self.sandbox is not None and self.collector is not None
        duration_s = (self.answered_at or time.monotonic()) - self.started_at
        time.sleep(SETTLE_S)
        with suppress(*CONNECTION_ERRORS):
            self.extra["left_in_queue"] = _ready(self.admin.queue_state(self.names.command_queue))
            self.extra["dead_lettered"] = _ready(
                self.admin.queue_state(self.names.dead_letter_queue)
            )
            # Commands waiting out a delayed retry or a deferral, by delay queue: where a
            # command without its event may still be.
            waiting = {
                name: ready
                for name in self.names.delay_queues()
                if (ready := _ready(self.admin.queue_state(name)))
            }
            if waiting:
                self.extra["in_delay_queues"] = waiting
            laned = {
                name: ready
                for name in self.lanes
                if (ready := _ready(self.admin.queue_state(name)))
            }
            if laned:
                self.extra["in_lanes"] = laned
        return closing_figures(
            self.scenario, workload, self.fleet, self.collector, self.sandbox, duration_s,
            self.extra,
        )

    def diagnostics(self) -> str:
        """Log tails of the replicas and the sandbox, for a failure message."""
        return diagnostics(self.fleet, self.sandbox, self.log_dir)

    # --- tearing down ---

    def close(self) -> None:
        """Every step is tried even when an earlier one failed; the first error is raised."""
        errors: list[BaseException] = []
        for step in (
            self._stop_observers,
            self._kill_fleet,
            self._stop_sandbox,
            self._restore_rabbitmq,
            self._delete_queues,
            self._empty_redis,
        ):
            try:
                step()
            except Exception as error:  # each step gets its chance
                errors.append(error)
        PIKA_LOG.setLevel(self._pika_log_level)
        if errors:
            raise errors[0]

    def _stop_observers(self) -> None:
        self._stop_publishing.set()
        if self._publisher is not None:
            self._publisher.join(30)
        for stream in self._streams:
            stream.stop()
        for collector in (self.collector, self.replies):
            if collector is not None:
                collector.stop()

    def _kill_fleet(self) -> None:
        if self.fleet is not None:
            for proc in self.fleet.procs:
                proc.kill()

    def _stop_sandbox(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()

    def _restore_rabbitmq(self) -> None:
        if self.rabbit_stopped and self._ctl is not None:
            self.start_rabbitmq()

    def _delete_queues(self) -> None:
        with suppress(*CONNECTION_ERRORS):
            self.admin.delete_everything(self._ctl, self.lanes)

    def _empty_redis(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            client.flushdb()


def _ready(state: tuple[int, int] | None) -> int | None:
    return None if state is None else state[0]
