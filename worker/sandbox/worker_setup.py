"""A worker pointed at the sandbox: the tenant accounts of its built-in credentials, the
settings that send every call there, and one command of each kind. The demo, the tests
and the benchmarks start from these."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr

from worker.sandbox.config import SandboxConfig
from worker.settings import EsetAccount, FylrAccount, Settings, SpaazaAccount, Tenant


def sandbox_tenant(base_url: str, config: SandboxConfig) -> Tenant:
    """Accounts for the sandbox's built-in credentials, marked as a sandbox: it is served
    over plain http://, which only a sandbox tenant may use."""
    return Tenant(
        sandbox=True,
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
    """One command of each kind (ESET and Spaaza update-triggers), each with its own key."""
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
