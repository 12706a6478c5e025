"""The handler's decisions as a table: what the idempotency store holds for the key,
crossed with what the vendor answers, gives the settlement, the event and the vendor
calls made.

No broker and no server: a SQLite store in memory, the vendor as an ``httpx.MockTransport``
(the clients' ``transport=`` seam) and a retry policy whose sleeping moves a fake clock.
"""

from __future__ import annotations

import asyncio
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from schemas.commands import Command, parse_command
from worker.handler import Handler
from worker.idempotency import SqliteStore, claim_key, command_ref, fingerprint
from worker.ops.outage import Outage
from worker.results import now, result_event
from worker.settings import EsetAccount, Settings, Tenant
from worker.settlement import Action, Settlement
from worker.vendors.retries import RetryPolicy

from .test_vendor_calls import vendors_for

TOKEN = {"access_token": "token", "token_type": "Bearer", "expires_in": 3600,
         "refresh_token": "refresh"}
OTHER = "another-replica:1:ab"


@dataclass
class Vendor:
    """ESET, answering the API calls from a script of statuses (then 200)."""

    script: list[int]
    calls: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth/token"):
            return httpx.Response(200, json=TOKEN)
        self.calls.append(request)
        status = self.script.pop(0) if self.script else 200
        headers = {"X-Request-Id": f"req-{len(self.calls)}"}
        if status == 202:
            headers["response-id"] = "cached-1"
        return httpx.Response(status, json={"status": status}, headers=headers)


class Clock:
    """A retry policy's clock that sleeping moves on: no test waits."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.now_s += seconds
        await asyncio.sleep(0)


def command(kind: str) -> Command:
    params: dict[str, Any] = (
        {"object_uuids": [str(uuid.uuid4())]} if kind == "batch-delete" else {}
    )
    parsed: Command = parse_command({"type": kind, "params": params}).with_defaults(
        str(uuid.uuid4())
    )
    return parsed


# What the store holds for the key before the command arrives.
Before = Callable[[SqliteStore, Command], Any]


async def nothing(store: SqliteStore, cmd: Command) -> None:
    return None


async def completed(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), fingerprint(cmd), OTHER)
    event = result_event(command_id="earlier", command_type=cmd.type, tenant=cmd.tenant,
                         idempotency_key=cmd.key, outcome="succeeded", started_at=now())
    await store.complete(claim_key(cmd), OTHER, event, command_ref(cmd))


async def held_by_a_live_replica(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), fingerprint(cmd), OTHER)


async def used_for_another_payload(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), "f" * 64, OTHER)


async def dead_holder_before_sending(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), fingerprint(cmd), OTHER)
    await expire(store)


async def dead_holder_after_sending(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), fingerprint(cmd), OTHER)
    await store.mark_sent(claim_key(cmd), OTHER)
    await expire(store)


async def dead_holder_collecting_a_202(store: SqliteStore, cmd: Command) -> None:
    await store.claim(claim_key(cmd), fingerprint(cmd), OTHER)
    await store.mark_accepted(claim_key(cmd), OTHER, "cached-0")
    await expire(store)


async def expire(store: SqliteStore) -> None:
    """The holder's lease ran out (it died)."""
    await store._run(lambda: store._db.execute("UPDATE claims SET lease_until = 0"))


@dataclass(frozen=True)
class Row:
    kind: str
    before: Before
    script: list[int]
    delay_queues: bool  # RabbitMQ: later retries and deferrals go through delay queues
    action: Action
    outcome: str | None  # the event's, None: no event
    error: str | None
    calls: int  # API calls the vendor saw (collects included)
    replayed: bool = False


TABLE = {
    "fresh key, 200": Row("batch-delete", nothing, [200], True, Action.ACK, "succeeded", None, 1),
    "fresh key, 400": Row("batch-delete", nothing, [400], True, Action.DEAD_LETTER, "failed",
                          "vendor_rejected", 1),
    "fresh key, 401 twice": Row("batch-delete", nothing, [401, 401], True, Action.DEAD_LETTER,
                                "failed", "vendor_auth_failed", 2),
    "fresh key, 429 then 200": Row("batch-delete", nothing, [429, 200], True, Action.ACK,
                                   "succeeded", None, 2),
    "fresh key, 202 then the answer": Row("batch-delete", nothing, [202, 200], True, Action.ACK,
                                          "succeeded", None, 2),
    "fresh key, 503 every time, delay queues": Row(
        "batch-delete", nothing, [503] * 20, True, Action.DELAY, None, None, 5),
    "fresh key, 503 every time, in process only": Row(
        "batch-delete", nothing, [503] * 20, False, Action.DEAD_LETTER, "failed",
        "vendor_unavailable", 5),
    "completed before": Row("batch-delete", completed, [], True, Action.ACK, "succeeded", None,
                            0, replayed=True),
    "held by a live replica, delay queues": Row(
        "batch-delete", held_by_a_live_replica, [], True, Action.DELAY, None, None, 0),
    "held by a live replica, in process only": Row(
        "batch-delete", held_by_a_live_replica, [], False, Action.REQUEUE, None, None, 0),
    "key used for another payload": Row(
        "batch-delete", used_for_another_payload, [], True, Action.DEAD_LETTER, "rejected",
        "idempotency_key_conflict", 0),
    "dead holder, before sending": Row(
        "batch-delete", dead_holder_before_sending, [200], True, Action.ACK, "succeeded", None, 1),
    "dead holder, after sending a mutation": Row(
        "batch-delete", dead_holder_after_sending, [], True, Action.DEAD_LETTER, "failed",
        "result_lost", 0),
    "dead holder, after sending a read": Row(
        "fetch-patching", dead_holder_after_sending, [200], True, Action.ACK, "succeeded", None, 1),
    "dead holder, collecting a 202": Row(
        "batch-delete", dead_holder_collecting_a_202, [200], True, Action.ACK, "succeeded", None,
        1),
}


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_the_handler_settles_each_case_as_the_table_says(row: Row, tmp_path: Path) -> None:
    vendor = Vendor(list(row.script))
    cmd = command(row.kind)
    settlement = asyncio.run(handle(cmd, row, vendor, tmp_path))

    assert settlement.action is row.action
    event = settlement.event
    assert (event.data.outcome if event else None) == row.outcome
    error = event.data.error if event else None
    assert (str(error.code) if error else None) == row.error
    assert len(vendor.calls) == row.calls
    if event is not None:
        assert event.data.replayed is row.replayed
        assert event.data.command_id == cmd.command_id


def test_a_dead_holders_202_is_collected_with_its_response_id(tmp_path: Path) -> None:
    vendor = Vendor([200])
    row = TABLE["dead holder, collecting a 202"]
    asyncio.run(handle(command("batch-delete"), row, vendor, tmp_path))
    (collect,) = vendor.calls
    assert collect.headers["response-id"] == "cached-0"


@dataclass
class StackTakingVendor(Vendor):
    """Notes the worker's functions on the stack when an API call reaches the transport."""

    stacks: list[list[str]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/oauth/token"):
            frames = traceback.extract_stack()
            self.stacks.append([f.name for f in frames if "/worker/" in f.filename])
        return super().__call__(request)


@pytest.mark.parametrize("kind", ["batch-delete", "fetch-patching"])
def test_from_the_handler_to_the_transport_each_call_has_one_concern(
    kind: str, tmp_path: Path
) -> None:
    """The path a command takes to the vendor, as the stack shows it: claim and settle,
    the command's call, retries and 202s, one HTTP exchange, the transport. Five calls
    from the handler (six from the delivery's task), none of them back up."""
    vendor = StackTakingVendor([200])
    asyncio.run(handle(command(kind), TABLE["fresh key, 200"], vendor, tmp_path))
    (stack,) = vendor.stacks
    assert stack == ["handle", "_run_claimed", "run", "send", "_exchange", "request"]


async def handle(cmd: Command, row: Row, vendor: Vendor, tmp_path: Path) -> Settlement:
    clock = Clock()
    policy = RetryPolicy(max_attempts=5, initial_wait_s=0.5, max_wait_s=30,
                         sleep=clock.sleep, clock=clock)
    settings = Settings(
        tenants={"default": Tenant(eset=EsetAccount(username="api@example.com",
                                                    password=SecretStr("pw")))},
        rate_limits={}, collect_interval_s=0,
    )
    store = SqliteStore(tmp_path / "claims.sqlite3", lease_s=30, retention_s=600)
    vendors = vendors_for(settings, policy, httpx.MockTransport(vendor))
    timings = replace(
        settings.handler_timings, command_timeout_s=60, retry_in_process_s=20,
        retry_delays_s=(5.0,) if row.delay_queues else (), claim_lease_s=30,
    )
    try:
        await row.before(store, cmd)
        handler = Handler(store, vendors, policy, timings, "this-replica", Outage({}))
        return await handler.handle(cmd)
    finally:
        await vendors.aclose()
        await store.close()
