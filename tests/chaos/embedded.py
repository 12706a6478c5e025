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
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from kombu import Connection, Producer

from .broker import EventCollector, Names, Publishable, RawMessage
from .figures import Figures, Workload, closing_figures
from .poison import DeadLetter
from .processes import Fleet, SandboxProcess, diagnostics, tenants_json

POLL_S = 0.1
SETTLE_S = 1.0
PERSISTENT = 2


class KombuEventCollector(EventCollector):
    """:class:`EventCollector` polling a queue of the embedded broker."""

    errors = (Exception,)  # SQLite "database is locked" and the like: poll again

    def _consume(self) -> None:
        with Connection(self._url) as connection:
            channel = connection.default_channel
            while not self._stop.is_set():
                message = channel.basic_get(self._queue, no_ack=True)
                if message is None:
                    self._stop.wait(0.05)
                    continue
                self._add(message.body, message.properties.get("correlation_id"))


class EmbeddedRig:
    def __init__(self, scenario: str, log_dir: Path) -> None:
        self.scenario = scenario
        self.log_dir = log_dir
        self.names = Names.unique(scenario)
        self.broker_url = f"sqla+sqlite:///{log_dir / 'broker.sqlite3'}"
        self.idempotency_url = f"sqlite:///{log_dir / 'idempotency.sqlite3'}"
        self.sandbox: SandboxProcess | None = None
        self.fleet: Fleet | None = None
        self.collector: KombuEventCollector | None = None
        self.started_at = 0.0
        self.answered_at: float | None = None
        self.extra: dict[str, Any] = {}

    @property
    def replies(self) -> KombuEventCollector | None:
        return self.collector

    def start(self, *, replicas: int, claim_lease_s: float = 30.0, **settings: str) -> None:
        self.sandbox = SandboxProcess(self.log_dir, rate_limited=False)
        env = {
            **self.names.worker_env(),
            "RELAY_BROKER_URL": self.broker_url,
            "RELAY_IDEMPOTENCY_URL": self.idempotency_url,
            "RELAY_RATE_LIMIT_URL": "memory://",
            "RELAY_RATE_LIMITS": "{}",
            "RELAY_ESET_HOST_TEMPLATE": f"{self.sandbox.base_url}/eset/{{region}}/{{service}}",
            "RELAY_TENANTS": tenants_json(self.sandbox.base_url),
            "RELAY_RETRY_INITIAL_WAIT_S": "0.05",
            "RELAY_COLLECT_INTERVAL_S": "0.1",
            "RELAY_CLAIM_LEASE_S": str(claim_lease_s),
            "RELAY_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
            "RELAY_LOG_FORMAT": "json",
            **settings,
        }
        self.fleet = Fleet(env, self.log_dir, replicas)
        self.collector = KombuEventCollector(self.broker_url, self.names.replies)
        self.collector.start()

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

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def answered(self, workload: Workload) -> int:
        assert self.collector is not None
        return self.collector.answered(workload.command_ids)

    def run_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Until ``done()`` (True) or ``timeout_s`` after publishing started; replicas
        that die on their own are started again (and counted as crashes)."""
        assert self.fleet is not None
        give_up_at = self.started_at + timeout_s
        while time.monotonic() < give_up_at:
            self.fleet.check_alive()
            if done():
                self.answered_at = time.monotonic()
                return True
            time.sleep(POLL_S)
        return False

    def finish(self, workload: Workload) -> Figures:
        """Let late events arrive, stop the replicas (SIGTERM), and compute the figures."""
        assert self.fleet is not None and self.sandbox is not None and self.collector is not None
        duration_s = (self.answered_at or time.monotonic()) - self.started_at
        time.sleep(SETTLE_S)
        return closing_figures(
            self.scenario, workload, self.fleet, self.collector, self.sandbox, duration_s,
            self.extra,
        )

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

    def diagnostics(self) -> str:
        """Log tails of the replicas and the sandbox, for a failure message."""
        return diagnostics(self.fleet, self.sandbox, self.log_dir)

    def close(self) -> None:
        if self.collector is not None:
            self.collector.stop()
        if self.fleet is not None:
            for proc in self.fleet.procs:
                with suppress(Exception):
                    proc.kill()
        if self.sandbox is not None:
            self.sandbox.close()
