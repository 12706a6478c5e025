"""Idempotency keys and command ids belong to their tenant: two tenants never collide on
a key, nor learn that the other used it, and a tenant's name in another case is the same
tenant (one key space)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from schemas.events import ErrorCode, ErrorInfo, ResultEvent
from worker.admin.results import look_up
from worker.idempotency import Completed, open_store, tenant_scoped
from worker.results import now, result_event

from .scripted_vendor import ScriptedVendor, command, run

TENANTS = ("acme", "globex")


def test_the_same_key_under_a_tenants_other_spelling_is_the_same_work(tmp_path: Path):
    vendor = ScriptedVendor()
    key = f"playbook-{uuid.uuid4()}"
    first = command("cancel-task", tenant="acme", idempotency_key=key)
    shouted = command("cancel-task", tenant="ACME", idempotency_key=key)
    events = run(vendor, tmp_path, first, shouted, tenants=TENANTS)
    assert [(e.data.outcome, e.data.replayed) for e in events] == [
        ("succeeded", False), ("succeeded", True)
    ]
    assert len(vendor.calls) == 1


@pytest.mark.parametrize("same_params", [True, False])
def test_a_key_one_tenant_used_is_another_tenants_own(same_params: bool, tmp_path: Path):
    """Neither a replay of the other's result nor a conflict that says the key exists."""
    vendor = ScriptedVendor()
    key = f"playbook-{uuid.uuid4()}"
    acme = command("cancel-task", tenant="acme", idempotency_key=key)
    globex = command("cancel-task", tenant="globex", idempotency_key=key)
    if not same_params:
        globex = globex.model_copy(update={"params": globex.params.model_copy(
            update={"task_id": 77})})
    events = run(vendor, tmp_path, acme, globex, tenants=TENANTS)
    assert [(e.data.tenant, e.data.outcome, e.data.replayed) for e in events] == [
        ("acme", "succeeded", False), ("globex", "succeeded", False)
    ]
    assert len(vendor.calls) == 2


def test_a_result_is_looked_up_in_its_tenants_namespace_only(tmp_path: Path):
    vendor = ScriptedVendor()
    acme = command("cancel-task", tenant="acme")
    run(vendor, tmp_path, acme, tenants=TENANTS)

    async def lookups() -> tuple[str, str, str]:
        store = open_store(f"sqlite:///{tmp_path / 'claims.sqlite3'}", 30, 600)
        try:
            own = await look_up(store, acme.command_id, tenant="acme")
            others = await look_up(store, acme.command_id, tenant="globex")
            by_key = await look_up(store, key=acme.key, tenant="globex")
            return own.state, others.state, by_key.state
        finally:
            await store.close()

    assert asyncio.run(lookups()) == ("done", "unknown", "unknown")


def rejected(command_id: str) -> ResultEvent:
    return result_event(
        command_id=command_id, idempotency_key=command_id, command_type=None,
        tenant="acme", outcome="rejected", started_at=now(),
        error=ErrorInfo(code=ErrorCode.INVALID_COMMAND, message="not a command"),
    )


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:///{tmp_path / 'idempotency.sqlite3'}"


def test_a_rejection_naming_an_id_never_hides_the_work_of_that_id(store_url: str):
    """A message that fails validation may name any id (another publisher's, say): its
    rejection is found by that id only while no work is."""
    command_id = f"id-{uuid.uuid4()}"
    ref = tenant_scoped("acme", command_id)
    work, rejection = f"acme/key-{uuid.uuid4()}", f"rejected:{uuid.uuid4().hex}"

    async def scenario() -> tuple[str | None, str | None]:
        store = open_store(store_url, 30, 600)
        try:
            await store.claim(rejection, "digest", "worker-1")
            await store.complete(rejection, "worker-1", rejected(command_id), ref,
                                 replace_ref=False)
            before_work = await store.key_of(ref)
            await store.claim(work, "fingerprint", "worker-2", ref)
            again = f"rejected:{uuid.uuid4().hex}"
            await store.claim(again, "digest", "worker-3")
            await store.complete(again, "worker-3", rejected(command_id), ref,
                                 replace_ref=False)
            assert isinstance(await store.claim(again, "digest", "worker-4"), Completed)
            return before_work, await store.key_of(ref)
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (rejection, work)
