"""Vendor calls end to end against the sandbox: what the vendor saw and what came back.

Each test builds :class:`Vendors` the way the service does (settings, rate limits, retry
policy) with short waits, runs one or two commands with ``asyncio.run``, and reads the
sandbox's counters: calls and statuses per route, applied effects, collects.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from schemas.commands import (
    BatchDeleteParams,
    CancelTaskParams,
    Command,
    EsetUpdateTriggersParams,
    SpaazaUpdateTriggersParams,
    parse_command,
)
from schemas.events import ErrorCode
from worker.errors import CommandRejected, PermanentFailure, RelayError, TransientFailure
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry
from worker.replies import VendorReply
from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault
from worker.sandbox.worker_setup import sandbox_settings, sandbox_tenant
from worker.settings import EsetAccount, Settings, SpaazaAccount, Tenant
from worker.vendors import Vendors
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import CallBudget

MAX_ATTEMPTS = 3


@dataclass
class Outcome:
    """What one command run gave: the reply or the error, and the budget it spent."""

    budget: CallBudget
    reply: VendorReply | None = None
    error: RelayError | None = None


def settings_for(sandbox: SandboxServer, **overrides: Any) -> Settings:
    return sandbox_settings(
        sandbox.base_url,
        sandbox.state.config,
        retry_initial_wait_s=0.01,
        collect_interval_s=0.05,
        **overrides,
    )


def vendors_for(
    settings: Settings, policy: RetryPolicy, transport: httpx.AsyncBaseTransport | None = None
) -> Vendors:
    """The vendor clients as the worker makes them from ``settings`` (no store outages)."""
    rate_limits = RateLimits(settings.rate_limit, Outage({}))
    return Vendors(settings, rate_limits, policy, Telemetry.using(), transport)


def execute(
    settings: Settings, *commands: Command, between: Callable[[], None] | None = None
) -> list[Outcome]:
    """Run the commands one after the other on one set of clients (tokens are reused),
    calling ``between`` after each but the last."""
    policy = RetryPolicy(
        max_attempts=MAX_ATTEMPTS,
        initial_wait_s=settings.retry_initial_wait_s,
        max_wait_s=0.05,
    )

    async def main() -> list[Outcome]:
        vendors = vendors_for(settings, policy)
        outcomes = []
        try:
            for index, command in enumerate(commands):
                if index and between is not None:
                    between()
                outcome = Outcome(CallBudget(deadline=policy.clock() + 20))
                try:
                    outcome.reply = await vendors.run(vendors.call_for(command), outcome.budget)
                except RelayError as error:
                    outcome.error = error
                outcomes.append(outcome)
        finally:
            await vendors.aclose()
        return outcomes

    return asyncio.run(main())


def succeeded(outcome: Outcome) -> VendorReply:
    assert outcome.error is None, outcome.error
    assert outcome.reply is not None
    return outcome.reply


def failed(outcome: Outcome, kind: type[RelayError], code: ErrorCode) -> Any:
    assert isinstance(outcome.error, kind), outcome.error or outcome.reply
    assert outcome.error.code == code
    return outcome.error


# --- commands ---

EXPIRE = (datetime.now(UTC) + timedelta(hours=1)).isoformat()


def eset_triggers(task_uuid: str | None = None, tenant: str = "default") -> Command:
    params = {"task_uuid": task_uuid or str(uuid.uuid4()), "triggers": [{"manual": {}}]}
    return parse_command({"type": "update-triggers", "tenant": tenant, "params": params})


def spaaza_trigger(task_id: int = 12345, tenant: str = "default") -> Command:
    trigger = {"once": EXPIRE, "repeat": "daily"}
    params = {"provider": "spaaza", "task_id": task_id, "trigger": trigger}
    return parse_command({"type": "update-triggers", "tenant": tenant, "params": params})


def batch_delete(*object_uuids: str, tenant: str = "default") -> Command:
    uuids = list(object_uuids) or [str(uuid.uuid4()), str(uuid.uuid4())]
    return parse_command(
        {"type": "batch-delete", "tenant": tenant, "params": {"object_uuids": uuids}}
    )


FYLR_TASK_IDS = itertools.count(1000)


def cancel_task(task_id: int | None = None, tenant: str = "default") -> Command:
    """A cancel of a running fylr task: a new one each time unless ``task_id`` is given."""
    task_id = task_id or next(FYLR_TASK_IDS)
    return parse_command({"type": "cancel-task", "tenant": tenant, "params": {"task_id": task_id}})


def fetch_patching(tenant: str = "default") -> Command:
    return parse_command({"type": "fetch-patching", "tenant": tenant})


def effects_of(command: Command) -> dict[str, dict[str, int]]:
    """The sandbox's effect counters after the command took effect exactly once."""
    match command.params:
        case SpaazaUpdateTriggersParams(task_id=task_id):
            return {"spaaza.update_task": {str(task_id): 1}}
        case EsetUpdateTriggersParams(task_uuid=task_uuid):
            return {"eset.update_task_triggers": {str(task_uuid): 1}}
        case BatchDeleteParams(object_uuids=object_uuids):
            return {"eset.batch_delete": {str(u): 1 for u in object_uuids}}
        case CancelTaskParams(task_id=task_id):
            return {"fylr.cancel": {str(task_id): 1}}
    return {}  # fetch-patching only reads


ROUTES = {
    "eset-update-triggers": "eset.update_task_triggers",
    "spaaza-update-triggers": "spaaza.update_task",
    "batch-delete": "eset.batch_delete",
    "cancel-task": "fylr.cancel",
    "fetch-patching": "eset.fetch_patching",
}
MAKERS = {
    "eset-update-triggers": eset_triggers,
    "spaaza-update-triggers": spaaza_trigger,
    "batch-delete": batch_delete,
    "cancel-task": cancel_task,
    "fetch-patching": fetch_patching,
}
ESET_VARIANTS = ["eset-update-triggers", "batch-delete", "fetch-patching"]
PATH_PARTS = {
    "eset-update-triggers": "updateTaskTriggers",
    "spaaza-update-triggers": "/spaaza/tasks/",
    "batch-delete": "quarantined-objects",
    "cancel-task": "/cancel",
    "fetch-patching": "application-patching-processes",
}


def api_calls(stats: dict[str, Any], route: str) -> int:
    return int(stats["calls"].get(route, 0))


# --- every command succeeds ---


def test_eset_update_triggers_succeeds_with_eset_answer(sandbox: SandboxServer) -> None:
    command = eset_triggers()
    reply = succeeded(execute(settings_for(sandbox), command)[0])
    assert (reply.vendor, reply.status, reply.body) == ("eset", 200, {})
    assert reply.request_id  # ESET support asks for it
    assert sandbox.state.stats()["effects"] == effects_of(command)


def test_spaaza_update_triggers_answers_the_whole_task(sandbox: SandboxServer) -> None:
    command = spaaza_trigger(task_id=321)
    reply = succeeded(execute(settings_for(sandbox), command)[0])
    assert (reply.vendor, reply.status) == ("spaaza", 200)
    assert reply.body["id"] == 321
    assert reply.body["trigger"]["repeat"] == "daily"
    assert datetime.fromisoformat(reply.body["trigger"]["once"]) == datetime.fromisoformat(EXPIRE)
    assert sandbox.state.stats()["effects"] == effects_of(command)


def test_batch_delete_succeeds_and_deletes_each_object_once(sandbox: SandboxServer) -> None:
    command = batch_delete()
    reply = succeeded(execute(settings_for(sandbox), command)[0])
    assert (reply.vendor, reply.status, reply.body) == ("eset", 200, {})
    assert sandbox.state.stats()["effects"] == effects_of(command)


def test_cancel_task_is_acknowledged_by_fylr(sandbox: SandboxServer) -> None:
    command = cancel_task(4711)
    reply = succeeded(execute(settings_for(sandbox), command)[0])
    assert (reply.vendor, reply.status) == ("fylr", 200)
    assert reply.body == {"status": {"acknowledged": "ok"}}
    assert sandbox.state.stats()["effects"] == effects_of(command)


def test_fetch_patching_replies_with_the_details_list(sandbox: SandboxServer) -> None:
    reply = succeeded(execute(settings_for(sandbox), fetch_patching())[0])
    assert (reply.vendor, reply.status) == ("eset", 200)
    assert [d["displayName"] for d in reply.body] == ["7-Zip", "Mozilla Firefox"]
    stats = sandbox.state.stats()
    assert stats["effects"] == {}  # a read changes nothing
    assert api_calls(stats, "eset.fetch_patching") == 1


# --- ESET's 202: collected with response-id ---


@pytest.mark.parametrize("variant", ESET_VARIANTS)
def test_pending_202_is_collected_with_response_id(sandbox: SandboxServer, variant: str) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])
    command = MAKERS[variant]()
    outcome = execute(settings_for(sandbox), command)[0]
    reply = succeeded(outcome)
    assert reply.status == 200
    assert reply.response_id
    stats = sandbox.state.stats()
    assert stats["collects"] > 0
    assert stats["statuses"][ROUTES[variant]]["202"] >= 1
    assert api_calls(stats, ROUTES[variant]) - stats["collects"] == 1  # one fresh request
    assert outcome.budget.attempts == 1
    assert stats["effects"] == effects_of(command)


# --- retried and not retried vendor errors ---


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("variant", ["batch-delete", "cancel-task", "spaaza-update-triggers"])
def test_throttle_and_unavailable_are_retried(
    sandbox: SandboxServer, variant: str, status: int
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(status, PATH_PARTS[variant])])
    command = MAKERS[variant]()
    outcome = execute(settings_for(sandbox), command)[0]
    assert succeeded(outcome).status == 200
    assert outcome.budget.attempts == 2
    assert outcome.budget.statuses == [status, 200]
    stats = sandbox.state.stats()
    assert stats["statuses"][ROUTES[variant]] == {str(status): 1, "200": 1}
    assert stats["effects"] == effects_of(command)


@pytest.mark.parametrize("variant", list(MAKERS))
def test_vendor_404_fails_at_once_as_vendor_rejected(sandbox: SandboxServer, variant: str) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(404, PATH_PARTS[variant])])
    outcome = execute(settings_for(sandbox), MAKERS[variant]())[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_REJECTED)
    assert error.vendor_status == 404
    assert error.reply is not None and error.reply.status == 404
    stats = sandbox.state.stats()
    assert api_calls(stats, ROUTES[variant]) == 1
    assert stats["effects"] == {}


def test_cancel_of_a_missing_fylr_task_is_404_without_retry(sandbox: SandboxServer) -> None:
    outcome = execute(settings_for(sandbox), cancel_task(900_000))[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_REJECTED)
    assert error.vendor_status == 404
    assert error.reply.body["code"] == "ObjectNotFound"
    assert outcome.budget.attempts == 1
    assert sandbox.state.stats()["statuses"]["fylr.cancel"] == {"404": 1}


def test_second_cancel_of_the_same_fylr_task_is_rejected_with_400(sandbox: SandboxServer) -> None:
    first, second = execute(settings_for(sandbox), cancel_task(77), cancel_task(77))
    succeeded(first)
    error = failed(second, PermanentFailure, ErrorCode.VENDOR_REJECTED)
    assert error.vendor_status == 400
    assert "already requested" in error.message
    assert second.budget.attempts == 1
    assert sandbox.state.stats()["effects"] == {"fylr.cancel": {"77": 1}}


def test_a_cancel_whose_answer_was_lost_is_read_back_as_a_success(
    sandbox: SandboxServer,
) -> None:
    """fylr cancelled, its answer was lost (502), the retry is refused with 400 "already
    requested": the task says the cancel is in, so the command succeeded."""
    sandbox.state.faults = Faults(script=[ScriptedFault(502, answer_lost=True)])
    outcome = execute(settings_for(sandbox), cancel_task(4712))[0]
    reply = succeeded(outcome)
    assert (reply.vendor, reply.status) == ("fylr", 200)
    assert reply.body["task"]["run_canceled_at"]
    assert outcome.budget.statuses == [502, 400, 200]  # the cancel, its retry, the task read
    assert sandbox.state.stats()["effects"] == {"fylr.cancel": {"4712": 1}}


# --- credentials ---


OAUTH_VARIANTS = ["batch-delete", "cancel-task"]  # ESET and fylr log in with OAuth2


def revoked_between(sandbox: SandboxServer, *commands: Command) -> Outcome:
    """The second of two commands on the same clients, the tokens revoked in between."""
    first, second = execute(settings_for(sandbox), *commands, between=sandbox.state.revoke_tokens)
    succeeded(first)
    return second


@pytest.mark.parametrize("variant", OAUTH_VARIANTS)
def test_revoked_token_gets_401_then_renewed_and_the_call_succeeds(
    sandbox: SandboxServer, variant: str
) -> None:
    first, second = MAKERS[variant](), MAKERS[variant]()
    outcome = revoked_between(sandbox, first, second)
    assert succeeded(outcome).status == 200
    assert outcome.budget.attempts == 1  # the renewal is not a retry
    stats = sandbox.state.stats()
    assert stats["statuses"][ROUTES[variant]] == {"200": 2, "401": 1}
    route = ROUTES[variant]
    assert stats["effects"] == {route: effects_of(first)[route] | effects_of(second)[route]}


@pytest.mark.parametrize(
    ("variant", "token_route"),
    [("batch-delete", "eset.token"), ("cancel-task", "fylr.token")],
)
def test_renewal_after_revocation_uses_the_refresh_token(
    sandbox: SandboxServer, variant: str, token_route: str
) -> None:
    """The first login and one refresh; no token request is refused along the way."""
    succeeded(revoked_between(sandbox, MAKERS[variant](), MAKERS[variant]()))
    assert sandbox.state.stats()["statuses"][token_route] == {"200": 2}


def test_wrong_eset_password_fails_as_vendor_auth_failed(sandbox: SandboxServer) -> None:
    config = sandbox.state.config
    tenant = Tenant(
        sandbox=True,
        eset=EsetAccount(region="eu", username=config.eset_username, password=SecretStr("wrong")),
    )
    outcome = execute(settings_for(sandbox, tenants={"default": tenant}), batch_delete())[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_AUTH_FAILED)
    assert "wrong" not in error.message  # the secret is never echoed
    stats = sandbox.state.stats()
    assert api_calls(stats, "eset.batch_delete") == 0
    assert stats["effects"] == {}


# --- rejected before any call ---


def test_batch_delete_in_japan_is_rejected_without_any_call(sandbox: SandboxServer) -> None:
    config = sandbox.state.config
    japan = Tenant(
        sandbox=True,
        eset=EsetAccount(
            region="jpn", username=config.eset_username, password=SecretStr(config.eset_password)
        )
    )
    settings = settings_for(sandbox, tenants={"tokyo": japan})
    outcome = execute(settings, batch_delete(tenant="tokyo"))[0]
    failed(outcome, CommandRejected, ErrorCode.REGION_NOT_SUPPORTED)
    assert outcome.budget.attempts == 0
    assert sandbox.state.stats()["calls"] == {}


def test_unknown_tenant_is_rejected_without_any_call(sandbox: SandboxServer) -> None:
    outcome = execute(settings_for(sandbox), cancel_task(tenant="nobody"))[0]
    error = failed(outcome, CommandRejected, ErrorCode.UNKNOWN_TENANT)
    assert "nobody" in error.message
    assert sandbox.state.stats()["calls"] == {}


# --- a 202 whose answer is lost ---

LOST_CACHE = {
    # The answer is ready at once but dropped before the first collect (every 0.05 s): 404.
    "expired": (SandboxConfig(pending_s=0, cache_ttl_s=0.01), 404),
    # The answer would take longer than ESET waits for it: the collect gets 504.
    "timed-out": (SandboxConfig(pending_s=5, collect_timeout_s=0.02), 504),
}


@pytest.fixture(params=list(LOST_CACHE))
def lossy_sandbox(request: pytest.FixtureRequest) -> Iterator[tuple[SandboxServer, int]]:
    config, lost_status = LOST_CACHE[request.param]
    with SandboxServer(config) as server:
        server.state.faults = Faults(script=[ScriptedFault(status=202)])
        yield server, lost_status


@pytest.mark.parametrize("variant", ["eset-update-triggers", "batch-delete"])
def test_mutation_whose_202_answer_is_lost_fails_as_result_lost_without_resending(
    lossy_sandbox: tuple[SandboxServer, int], variant: str
) -> None:
    sandbox, lost_status = lossy_sandbox
    command = MAKERS[variant]()
    outcome = execute(settings_for(sandbox), command)[0]
    error = failed(outcome, PermanentFailure, ErrorCode.RESULT_LOST)
    assert error.vendor_status == lost_status
    assert outcome.budget.attempts == 1
    stats = sandbox.state.stats()
    assert stats["collects"] == 1
    assert api_calls(stats, ROUTES[variant]) == 2  # the 202'd request and its one collect
    assert stats["statuses"][ROUTES[variant]] == {"202": 1, str(lost_status): 1}
    # ESET executes a request it can answer in time as soon as it accepts it.
    assert stats["effects"] == (effects_of(command) if lost_status == 404 else {})


def test_read_whose_202_answer_is_lost_is_asked_again(
    lossy_sandbox: tuple[SandboxServer, int],
) -> None:
    sandbox, lost_status = lossy_sandbox
    outcome = execute(settings_for(sandbox), fetch_patching())[0]
    reply = succeeded(outcome)
    assert reply.status == 200
    assert len(reply.body) == 2
    assert outcome.budget.attempts == 2
    stats = sandbox.state.stats()
    assert stats["statuses"]["eset.fetch_patching"] == {"202": 1, str(lost_status): 1, "200": 1}


# --- the vendor can not be reached ---


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("variant", ["spaaza-update-triggers", "cancel-task", "batch-delete"])
def test_unreachable_vendor_is_a_transient_failure_after_the_attempt_cap(
    sandbox: SandboxServer, closed_port: int, variant: str
) -> None:
    dead = f"http://127.0.0.1:{closed_port}"
    config = sandbox.state.config
    settings = settings_for(
        sandbox,
        eset_host_template=f"{dead}/eset/{{region}}/{{service}}",
        tenants={"default": sandbox_tenant(dead, config)},
    )
    outcome = execute(settings, MAKERS[variant]())[0]
    error = failed(outcome, TransientFailure, ErrorCode.VENDOR_UNAVAILABLE)
    assert error.retryable
    assert outcome.budget.attempts == MAX_ATTEMPTS
    assert sandbox.state.stats()["calls"] == {}


def test_wrong_spaaza_token_fails_as_vendor_auth_failed(sandbox: SandboxServer) -> None:
    """Spaaza's token is static: a wrong secret is refused for good, not retried."""
    config = sandbox.state.config
    tenant = Tenant(
        sandbox=True,
        spaaza=SpaazaAccount(
            base_url=f"{sandbox.base_url}/spaaza",
            token_id=config.spaaza_token_id,
            token_secret=SecretStr("wrong"),
        )
    )
    outcome = execute(settings_for(sandbox, tenants={"default": tenant}), spaaza_trigger())[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_AUTH_FAILED)
    assert error.vendor_status == 401
    assert outcome.budget.attempts == 1
    assert sandbox.state.stats()["effects"] == {}


def test_collects_failing_past_the_retry_cap_keep_collecting_instead_of_resending(
    sandbox: SandboxServer,
) -> None:
    """A 202'd mutation is only ever collected, however many collects fail on the way."""
    collect_failures = [ScriptedFault(status=503)] * 6  # more than the attempt cap
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202), *collect_failures])
    outcome = execute(settings_for(sandbox), MAKERS["batch-delete"]())[0]
    assert succeeded(outcome).response_id
    stats = sandbox.state.stats()
    assert outcome.budget.attempts == 1  # sent once; everything after was a collect
    assert set(stats["effects"]["eset.batch_delete"].values()) == {1}
