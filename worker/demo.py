"""``command-relay demo``: the whole pipeline on one machine, no server, no vendor account.

Starts the vendor sandbox and a worker on the embedded broker, publishes one of each
command (ESET answers the patching call with a 202 first, and the batch delete meets a
429), and prints each result event as it arrives.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from schemas.events import ResultEvent
from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.ops.telemetry import from_environment
from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault
from worker.service import RelayService
from worker.settings import EsetAccount, FylrAccount, Settings, SpaazaAccount, Tenant


def sandbox_tenant(base_url: str, config: SandboxConfig) -> Tenant:
    """Accounts for the sandbox's built-in credentials."""
    return Tenant(
        eset=EsetAccount(
            region="eu", username=config.eset_username, password=SecretStr(config.eset_password)
        ),
        fylr=FylrAccount(
            base_url=f"{base_url}/fylr",
            client_id=config.fylr_client_id,
            client_secret=SecretStr(config.fylr_client_secret),
            username=config.fylr_username,
            password=SecretStr(config.fylr_password),
        ),
        spaaza=SpaazaAccount(
            base_url=f"{base_url}/spaaza",
            token_id=config.spaaza_token_id,
            token_secret=SecretStr(config.spaaza_token_secret),
        ),
    )


def sandbox_settings(base_url: str, config: SandboxConfig, **overrides: Any) -> Settings:
    """Settings that point every tenant account at the sandbox."""
    values: dict[str, Any] = {
        "eset_host_template": f"{base_url}/eset/{{region}}/{{service}}",
        "tenants": {"default": sandbox_tenant(base_url, config)},
        "collect_interval_s": 0.2,
        "retry_initial_wait_s": 0.2,
        **overrides,
    }
    return Settings(**values)


def demo_commands() -> list[dict[str, Any]]:
    expire = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    run = uuid.uuid4().hex[:8]

    def command(kind: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"type": kind, "id": str(uuid.uuid4()), "idempotency_key": f"demo-{run}-{kind}-"
                f"{params.get('provider', '')}", "params": params}

    return [
        command("update-triggers", {"task_uuid": str(uuid.uuid4()),
                                    "triggers": [{"manual": {"expire_time": expire}}]}),
        command("update-triggers", {"provider": "spaaza", "task_id": 12345,
                                    "trigger": {"once": expire, "repeat": "daily"}}),
        command("batch-delete", {"object_uuids": [str(uuid.uuid4()), str(uuid.uuid4())]}),
        command("cancel-task", {"task_id": 4711}),
        command("fetch-patching", {}),
    ]


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
    with CommandClient(settings.broker_url, Topology.from_settings(settings)) as client:
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
