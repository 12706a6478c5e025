"""The worker assembled from its parts, as ``command-relay run`` starts it."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from worker.broker.consumer import CommandConsumer
from worker.broker.topology import Topology
from worker.handler import Handler
from worker.idempotency import IdempotencyStore, open_store
from worker.ops.health import Check, LoopHeartbeat, create_health_app
from worker.ops.http_server import BackgroundServer
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry
from worker.redaction import Redactor
from worker.runtime import HandlerLoop
from worker.settings import Settings
from worker.vendors import Vendors
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy

log = logging.getLogger(__name__)
STORE_PING_TIMEOUT_S = 2.0


class RelayService:
    """The worker as ``command-relay run`` starts it: settings in, the stores, vendor
    clients, handler and consumer wired together on one loop, with the health server.
    ``run(stop)`` serves until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        redactor: Redactor | None = None,
    ) -> None:
        """``redactor``: the process's (the log handler's too); by default one knowing
        the configuration's secrets. Every token a vendor issues is added to it."""
        self.settings = settings
        self.telemetry = telemetry
        self.health: BackgroundServer | None = None  # serving while run() runs, if enabled
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.loop = HandlerLoop()
        # /healthz fails when the loop has not stamped this for settings.liveness_stall_s.
        self.heartbeat = LoopHeartbeat(settings.liveness_stall_s)
        self.store: IdempotencyStore = open_store(
            settings.idempotency_url, settings.claim_lease_s, settings.idempotency_retention_s,
            settings.tls.redis,
        )
        policy = RetryPolicy.of(settings.retry)
        topology = Topology.from_settings(settings)
        # Filled in below: the probes of the stores whose outage holds the commands.
        self.outage = outage = Outage({})
        rate_limits = RateLimits(settings.rate_limit, outage)
        outage.probes.update({"idempotency": self.store.ping, "rate-limit": rate_limits.pacer.ping})
        self.vendors = Vendors(
            settings, rate_limits, policy, self.telemetry,
            redactor=redactor or Redactor(settings.secret_values()),
        )
        self.handler = Handler(
            self.store,
            self.vendors,
            policy,
            settings.handler_timings,
            self.owner,
            outage,
            settings.publisher_binding,
        )
        self.consumer = CommandConsumer(
            settings.consumer,
            topology,
            self.handler.handle,
            self.telemetry,
            outage,
        )

    def ready(self) -> dict[str, Check]:
        """Readiness checks: the broker connection, and the store answering a ping."""
        return {
            "broker": self.consumer.connected.is_set,
            # Also not ready while commands are held for a store outage (the rate-limit
            # store's too); /readyz's reasons say which store.
            "store": lambda: self.outage.available
            and self.loop.run(self.store.ping(), STORE_PING_TIMEOUT_S) is None,
        }

    def held_because(self) -> dict[str, str]:
        """Why commands are being held, if they are (for ``/readyz``)."""
        reason = self.outage.reason
        return {"store": reason} if reason else {}

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then finish in-flight work and close everything."""
        self.loop.start()
        beating = self.loop.submit(self.heartbeat.beat())
        health = self.health = None
        if self.settings.health_port is not None:
            health = self.health = BackgroundServer(
                create_health_app(self.ready(), self.held_because, self.heartbeat.stalled),
                self.settings.health_host,
                self.settings.health_port,
                "health",
            )
            health.start()
            log.info("health endpoints on port %d", health.port)
        monitor = threading.Thread(
            target=self.consumer.lane_monitor.run, args=(stop,), name="lanes", daemon=True
        )
        monitor.start()
        try:
            self.loop.run(self.consumer.run(stop))
        finally:
            monitor.join(STORE_PING_TIMEOUT_S)
            if health is not None:
                health.stop()
            beating.cancel()  # done before the closing below, which runs after it
            self.loop.run(self.vendors.aclose())
            self.loop.run(self.store.close())
            self.loop.stop()
            self.telemetry.shutdown()
            log.info("stopped")
