"""Tenants with ESET accounts of their own, and the flood-and-quiet workload the lane
tests send over either broker."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import SecretStr

from worker.sandbox import SandboxConfig, SandboxServer
from worker.sandbox.worker_setup import sandbox_tenant
from worker.settings import EsetAccount, Tenant

from .harness import RunningRelay

FLOOD = 150  # 15 s of one account's budget at 10 calls/s


def tenant_with_own_eset(base_url: str, config: SandboxConfig, name: str) -> Tenant:
    """The sandbox tenant, with an ESET account (and rate limit) of its own."""
    local, domain = config.eset_username.split("@")
    account = EsetAccount(
        region="eu", username=f"{local}+{name}@{domain}", password=SecretStr(config.eset_password)
    )
    return sandbox_tenant(base_url, config).model_copy(update={"eset": account})


def flood_and_quiet(sandbox: SandboxServer) -> dict[str, Any]:
    """Settings overrides: tenants ``flood`` and ``quiet``, ESET limited to 10 calls/s."""
    config, url = sandbox.state.config, sandbox.base_url
    return {
        "tenants": {name: tenant_with_own_eset(url, config, name) for name in ("flood", "quiet")},
        "rate_limits": {"eset": "10/second"},
    }


def batch_delete(tenant: str) -> dict[str, Any]:
    return {"type": "batch-delete", "id": str(uuid.uuid4()), "tenant": tenant,
            "params": {"object_uuids": [str(uuid.uuid4())]}}


def quiet_commands() -> list[dict[str, Any]]:
    """Three commands on quiet's own ESET account, three on fylr (no limit)."""
    patching = [{"type": "fetch-patching", "params": {}} for _ in range(3)]
    cancels = [{"type": "cancel-task", "params": {"task_id": 4711 + i}} for i in range(3)]
    return [{**c, "id": str(uuid.uuid4()), "tenant": "quiet"} for c in patching + cancels]


def quiet_answered_during_the_flood(relay: RunningRelay) -> tuple[int, float]:
    """Publish the flood, then the quiet commands; return how many flood commands were
    answered by the time every quiet one was, and how long the quiet ones took."""
    flood_ids = {relay.send(batch_delete("flood")) for _ in range(FLOOD)}
    quiet = quiet_commands()
    sent_at = time.monotonic()
    quiet_ids = {relay.send(command) for command in quiet}
    answered_flood = 0
    waiting = set(quiet_ids)
    for reply in relay.client.events(timeout_s=20):
        command_id = reply.event.data.command_id
        if command_id in flood_ids:
            answered_flood += 1
        elif command_id in waiting:
            assert reply.event.data.outcome == "succeeded", reply.event
            waiting.discard(command_id)
            if not waiting:
                break
    assert not waiting, f"{len(waiting)} quiet commands unanswered"
    return answered_flood, time.monotonic() - sent_at
