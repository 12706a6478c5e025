"""``command-relay demo``: the whole pipeline on one machine, no server, no vendor account.

Starts the vendor sandbox and a worker on the embedded broker, publishes one of each
command (ESET answers the patching call with a 202 first, and the batch delete meets a
429), and prints each result event as it arrives.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from schemas.events import ResultEvent
from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.ops.telemetry import from_environment
from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault
from worker.sandbox.worker_setup import demo_commands, sandbox_settings
from worker.service import RelayService
from worker.settings import Settings

DEMO_FAULTS = Faults(
    script=[
        ScriptedFault(status=202, path_contains="application-patching-processes"),
        ScriptedFault(status=429, path_contains="quarantined-objects"),
    ]
)


def run_demo(timeout_s: float, show: Callable[[ResultEvent], None]) -> bool:
    """True when every demo command succeeded."""
    config = SandboxConfig()
    with tempfile.TemporaryDirectory() as tmp, SandboxServer(config) as sandbox:
        sandbox.state.faults = DEMO_FAULTS
        settings = sandbox_settings(
            sandbox.base_url,
            config,
            broker_url=f"sqla+sqlite:///{Path(tmp, 'broker.sqlite3')}",
            idempotency_url=f"sqlite:///{Path(tmp, 'idempotency.sqlite3')}",
        )
        # OTEL_TRACES_EXPORTER=console shows the demo's traces (see the README).
        service = RelayService(settings, telemetry=from_environment())
        stop = threading.Event()
        worker = threading.Thread(target=service.run, args=(stop,), name="worker")
        worker.start()
        try:
            return _publish_and_collect(settings, timeout_s, show)
        finally:
            stop.set()
            worker.join()


def _publish_and_collect(
    settings: Settings, timeout_s: float, show: Callable[[ResultEvent], None]
) -> bool:
    topology = Topology.from_settings(settings)
    with CommandClient(settings.broker_url, topology, settings.tls.broker) as client:
        reply_to = client.reply_queue()
        pending = {client.publish(c, reply_to=reply_to) for c in demo_commands()}
        outcomes = []
        for reply in client.events(timeout_s):
            show(reply.event)
            pending.discard(reply.correlation_id or "")
            outcomes.append(reply.event.data.outcome)
            if not pending:
                break
        return not pending and all(o == "succeeded" for o in outcomes)
