"""The worker assembled from its parts, as ``command-relay run`` starts it."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace

import httpx

from schemas.commands import Command
from worker.consumer import CommandConsumer, ConsumerSettings
from worker.handler import Handler, HandlerTimings, Settlement
from worker.idempotency import IdempotencyStore, open_store
from worker.ratelimit import RateLimits
from worker.retries import RetryPolicy, Sleep
from worker.runtime import HandlerLoop
from worker.settings import Settings
from worker.topology import Topology
from worker.vendors import Vendors

log = logging.getLogger(__name__)


@dataclass
class Overrides:
    """Test seams: a fake network for the vendor clients, a sleep that does not wait."""

    transport: httpx.AsyncBaseTransport | None = None
    sleep: Sleep | None = None
    shutdown_grace_s: float = 30.0


class RelayService:
    def __init__(self, settings: Settings, overrides: Overrides | None = None) -> None:
        self.settings = settings
        self._overrides = overrides or Overrides()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.loop = HandlerLoop()
        self.store: IdempotencyStore = open_store(
            settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s
        )
        policy = RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            initial_wait_s=settings.retry_initial_wait_s,
            max_wait_s=settings.retry_max_wait_s,
        )
        if self._overrides.sleep is not None:
            policy = replace(policy, sleep=self._overrides.sleep)
        rate_limits = RateLimits(settings.rate_limits, settings.rate_limit_url)
        self.vendors = Vendors(settings, rate_limits, policy, self._overrides.transport)
        self.handler = Handler(
            self.store,
            self.vendors,
            policy,
            HandlerTimings(command_timeout_s=settings.command_timeout_s),
            self.owner,
        )
        self.consumer = CommandConsumer(
            ConsumerSettings(
                broker_url=settings.broker_url,
                prefetch=settings.concurrency,
                poll_interval_s=settings.broker_poll_interval_s,
                shutdown_grace_s=self._overrides.shutdown_grace_s,
            ),
            Topology.from_settings(settings),
            self._submit,
        )

    def _submit(self, command: Command) -> Future[Settlement]:
        return self.loop.submit(self.handler.handle(command))

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then finish in-flight work and close everything."""
        self.loop.start()
        try:
            self.consumer.run(stop)
        finally:
            self.loop.run(self.vendors.aclose())
            self.loop.run(self.store.close())
            self.loop.stop()
            log.info("stopped")
