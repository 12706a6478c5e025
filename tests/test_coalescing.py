"""Batch-delete coalescing: concurrent batch deletes of one tenant go out as one ESET call,
and each command still gets its own outcome for its own objects.

Most tests run several commands at once through :class:`Vendors` against the sandbox and
read what the vendor saw (calls, effects per object) and what each command got back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.commands import Command
from schemas.events import ErrorCode
from worker.errors import PermanentFailure, TransientFailure, Withheld
from worker.replies import VendorReply, VendorRequest
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.sandbox.worker_setup import sandbox_tenant
from worker.settings import Settings
from worker.vendors.coalescing import BatchDeleteCoalescer
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import GO_AHEAD, CallBudget, Marks

from .harness import RunningRelay, embedded, running_relay
from .test_vendor_calls import MAX_ATTEMPTS, batch_delete, settings_for, vendors_for

ROUTE = "eset.batch_delete"
WINDOW_MS = 100


@dataclass
class Outcome:
    """What one command got: the reply or the exception, and the budget it was charged."""

    command: Command
    budget: CallBudget
    reply: VendorReply | None = None
    error: BaseException | None = None


@dataclass
class Marking:
    """A command's marks in these tests: ``sending`` asks ``on_send``; False withholds."""

    on_send: Callable[[], Awaitable[bool]]

    async def sending(self) -> bool:
        return await self.on_send()

    async def accepted(self, response_id: str) -> bool:
        return True


def coalescing(sandbox: SandboxServer, **overrides: Any) -> Settings:
    return settings_for(sandbox, **{"batch_delete_window_ms": WINDOW_MS, **overrides})


def run_together(
    settings: Settings,
    commands: list[Command],
    marks: dict[int, Marks] | None = None,
    stagger_s: dict[int, float] | None = None,
) -> list[Outcome]:
    """Run the commands concurrently on one set of clients; ``marks`` gives a command (by
    index) its marks, ``stagger_s`` makes it start that much later."""
    policy = RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_wait_s=0.01, max_wait_s=0.05)
    marks, stagger_s = marks or {}, stagger_s or {}

    async def main() -> list[Outcome]:
        vendors = vendors_for(settings, policy)
        outcomes = [
            Outcome(c, CallBudget(policy.clock() + 20)) for c in commands
        ]

        async def run(index: int, outcome: Outcome) -> None:
            await asyncio.sleep(stagger_s.get(index, 0.0))
            try:
                call = vendors.call_for(outcome.command)
                outcome.reply = await vendors.run(call, outcome.budget, marks.get(index, GO_AHEAD))
            except Exception as error:
                outcome.error = error

        try:
            await asyncio.gather(*(run(i, o) for i, o in enumerate(outcomes)))
        finally:
            await vendors.aclose()
        return outcomes

    return asyncio.run(main())


def single_object_deletes(count: int, tenant: str = "default") -> list[Command]:
    return [batch_delete(str(uuid.uuid4()), tenant=tenant) for _ in range(count)]


def objects_of(*outcomes: Outcome) -> dict[str, int]:
    """Each object of the commands deleted once: the sandbox's effects if they all were."""
    return {str(u): 1 for o in outcomes for u in o.command.params.object_uuids}


def calls(sandbox: SandboxServer) -> int:
    return int(sandbox.state.stats()["calls"].get(ROUTE, 0))


def effects(sandbox: SandboxServer) -> dict[str, int]:
    return dict(sandbox.state.stats()["effects"].get(ROUTE, {}))


def ok(outcome: Outcome) -> VendorReply:
    assert outcome.error is None, outcome.error
    assert outcome.reply is not None and outcome.reply.status == 200
    return outcome.reply


# --- merging ---


def test_concurrent_single_object_deletes_go_out_as_one_call(sandbox: SandboxServer) -> None:
    outcomes = run_together(coalescing(sandbox), single_object_deletes(8))
    replies = [ok(o) for o in outcomes]
    assert calls(sandbox) == 1
    assert effects(sandbox) == objects_of(*outcomes)
    assert len({r.request_id for r in replies}) == 1  # one vendor answer, given to each
    for outcome in outcomes:  # each is charged the one call its event reports
        assert (outcome.budget.attempts, outcome.budget.statuses) == (1, [200])
        assert outcome.budget.vendor_time_s > 0


def test_window_zero_sends_each_command_alone(sandbox: SandboxServer) -> None:
    outcomes = run_together(settings_for(sandbox), single_object_deletes(4))
    assert len({ok(o).request_id for o in outcomes}) == 4
    assert calls(sandbox) == 4
    assert effects(sandbox) == objects_of(*outcomes)


def test_commands_beyond_the_batch_size_go_in_a_second_call(sandbox: SandboxServer) -> None:
    outcomes = run_together(coalescing(sandbox, batch_delete_max_objects=3),
                            single_object_deletes(5))
    request_ids = [ok(o).request_id for o in outcomes]
    assert calls(sandbox) == 2
    assert sorted(request_ids.count(r) for r in set(request_ids)) == [2, 3]
    assert effects(sandbox) == objects_of(*outcomes)


def test_a_command_larger_than_the_batch_size_is_sent_alone(sandbox: SandboxServer) -> None:
    big = batch_delete(*(str(uuid.uuid4()) for _ in range(3)))
    outcomes = run_together(coalescing(sandbox, batch_delete_max_objects=2),
                            [big, *single_object_deletes(2)])
    replies = [ok(o) for o in outcomes]
    assert calls(sandbox) == 2
    assert replies[0].request_id != replies[1].request_id == replies[2].request_id
    assert effects(sandbox) == objects_of(*outcomes)


def test_objects_named_by_several_commands_are_sent_once(sandbox: SandboxServer) -> None:
    shared = str(uuid.uuid4())
    commands = [batch_delete(shared, str(uuid.uuid4())) for _ in range(3)]
    outcomes = run_together(coalescing(sandbox), commands)
    for outcome in outcomes:
        ok(outcome)
    assert calls(sandbox) == 1
    assert effects(sandbox) == objects_of(*outcomes)  # the shared one deleted once
    assert effects(sandbox)[shared] == 1


def test_commands_of_different_tenants_are_never_merged(sandbox: SandboxServer) -> None:
    tenant = sandbox_tenant(sandbox.base_url, sandbox.state.config)
    settings = coalescing(sandbox, tenants={"default": tenant, "other": tenant})
    commands = [*single_object_deletes(3), *single_object_deletes(3, tenant="other")]
    replies = [ok(o) for o in run_together(settings, commands)]
    assert calls(sandbox) == 2
    assert len({r.request_id for r in replies[:3]}) == 1
    assert len({r.request_id for r in replies[3:]}) == 1
    assert replies[0].request_id != replies[3].request_id


def test_commands_arriving_while_the_call_waits_for_its_rate_slot_join_it(
    sandbox: SandboxServer,
) -> None:
    """At 1 call/s the second call waits ~1 s for its slot; a command arriving meanwhile
    still goes out with it."""
    settings = coalescing(sandbox, batch_delete_window_ms=20, rate_limits={"eset": "1/second"})
    first, waiting, joining = run_together(
        settings, single_object_deletes(3), stagger_s={1: 0.4, 2: 0.7}
    )
    assert calls(sandbox) == 2
    assert ok(first).request_id != ok(waiting).request_id == ok(joining).request_id
    assert effects(sandbox) == objects_of(first, waiting, joining)


# --- outcomes ---


def test_a_400_to_the_merged_call_sends_each_command_alone(sandbox: SandboxServer) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(400, "quarantined-objects")])
    outcomes = run_together(coalescing(sandbox), single_object_deletes(3))
    replies = [ok(o) for o in outcomes]
    assert calls(sandbox) == 1 + 3
    assert len({r.request_id for r in replies}) == 3
    assert effects(sandbox) == objects_of(*outcomes)
    for outcome in outcomes:  # the refused merged call, then its own
        assert (outcome.budget.attempts, outcome.budget.statuses) == (2, [400, 200])


def test_after_a_400_only_the_command_refused_on_its_own_fails(sandbox: SandboxServer) -> None:
    refusals = [ScriptedFault(400, "quarantined-objects")] * 2  # the merged call, then one
    sandbox.state.faults = Faults(script=refusals)
    outcomes = run_together(coalescing(sandbox), single_object_deletes(3))
    refused = [o for o in outcomes if o.error is not None]
    done = [o for o in outcomes if o.error is None]
    assert len(refused) == 1 and len(done) == 2
    assert isinstance(refused[0].error, PermanentFailure)
    assert (refused[0].error.code, refused[0].error.vendor_status) == (
        ErrorCode.VENDOR_REJECTED, 400,
    )
    assert effects(sandbox) == objects_of(*done)


def test_a_merged_call_failing_for_good_fails_every_command(sandbox: SandboxServer) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(503)] * MAX_ATTEMPTS)
    outcomes = run_together(coalescing(sandbox), single_object_deletes(3))
    for outcome in outcomes:
        assert isinstance(outcome.error, TransientFailure)
        assert outcome.budget.attempts == MAX_ATTEMPTS
        assert outcome.budget.statuses == [503] * MAX_ATTEMPTS
    assert calls(sandbox) == MAX_ATTEMPTS  # retried as one call, not split
    assert effects(sandbox) == {}


def test_a_202_to_the_merged_call_is_collected_once_for_every_command(
    sandbox: SandboxServer,
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(202)])
    outcomes = run_together(coalescing(sandbox), single_object_deletes(3))
    assert len({ok(o).response_id for o in outcomes}) == 1
    assert outcomes[0].reply is not None and outcomes[0].reply.response_id
    stats = sandbox.state.stats()
    assert calls(sandbox) - stats["collects"] == 1
    assert all(o.budget.collects == stats["collects"] > 0 for o in outcomes)
    assert effects(sandbox) == objects_of(*outcomes)


# --- the mark before sending (the handler's idempotency claim) ---


class StoreAway(Exception):
    pass


def test_every_mark_runs_before_the_merged_call_goes_out(sandbox: SandboxServer) -> None:
    calls_at_mark: list[int] = []

    async def mark() -> bool:
        calls_at_mark.append(calls(sandbox))
        return True

    outcomes = run_together(coalescing(sandbox), single_object_deletes(3),
                            marks={i: Marking(mark) for i in range(3)})
    for outcome in outcomes:
        ok(outcome)
    assert calls_at_mark == [0, 0, 0]
    assert calls(sandbox) == 1


async def lost() -> bool:
    return False  # another worker holds the key


async def store_away() -> bool:
    raise StoreAway("the store does not answer")


async def marked() -> bool:
    return True


@pytest.mark.parametrize(("mark", "error"), [(lost, Withheld), (store_away, StoreAway)])
def test_a_command_whose_mark_says_no_or_fails_is_left_out_of_the_call(
    sandbox: SandboxServer, mark: Callable[[], Awaitable[bool]], error: type[Exception]
) -> None:
    outcomes = run_together(coalescing(sandbox), single_object_deletes(3),
                            marks={0: Marking(marked), 1: Marking(mark), 2: Marking(marked)})
    assert isinstance(outcomes[1].error, error)
    assert outcomes[1].budget.attempts == 0
    ok(outcomes[0])
    ok(outcomes[2])
    assert calls(sandbox) == 1
    assert effects(sandbox) == objects_of(outcomes[0], outcomes[2])


def test_no_call_is_made_when_every_mark_says_no(sandbox: SandboxServer) -> None:
    outcomes = run_together(coalescing(sandbox), single_object_deletes(2),
                            marks={0: Marking(lost), 1: Marking(lost)})
    assert all(isinstance(o.error, Withheld) for o in outcomes)
    assert calls(sandbox) == 0


# --- deadlines (a fake send that holds the call, standing in for a rate-slot wait) ---


class HeldSend:
    """Stands for an account's sender: records each call's budget and keeps it waiting
    until released, then asks its marks and answers 200 for the body it would send."""

    def __init__(self) -> None:
        self.budgets: list[CallBudget] = []
        self.bodies: list[list[str]] = []
        self.release = asyncio.Event()

    async def send(
        self, request: VendorRequest, budget: CallBudget, marks: Marks = GO_AHEAD
    ) -> VendorReply:
        self.budgets.append(budget)
        await self.release.wait()
        assert await marks.sending()
        self.bodies.append(list(request.json["objectUuids"]))
        return VendorReply(vendor="eset", status=200, body={})

    async def collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply:
        raise AssertionError("a 200 is never collected")


def delete(object_uuids: list[str]) -> VendorRequest:
    return VendorRequest("eset", "POST", "http://eset.invalid/", "/", {"objectUuids": object_uuids})


def test_the_merged_call_has_the_earliest_deadlines_and_late_joiners_need_later_ones() -> None:
    async def main() -> HeldSend:
        send = HeldSend()
        coalescer = BatchDeleteCoalescer(send, window_s=0.01, max_objects=100)
        first = coalescer.send(delete(["a"]), CallBudget(deadline=50.0, retry_deadline=30.0))
        second = coalescer.send(delete(["b"]), CallBudget(deadline=40.0))
        tasks = [asyncio.create_task(first), asyncio.create_task(second)]
        while not send.budgets:  # the window ended: the call waits for its "slot"
            await asyncio.sleep(0.005)
        later = asyncio.create_task(coalescer.send(delete(["c"]), CallBudget(deadline=60.0)))
        earlier = asyncio.create_task(coalescer.send(delete(["d"]), CallBudget(deadline=39.0)))
        await asyncio.sleep(0.05)
        send.release.set()
        await asyncio.gather(*tasks, later, earlier)
        return send

    send = asyncio.run(main())
    merged, alone = send.budgets
    assert (merged.deadline, merged.retry_deadline) == (40.0, 30.0)
    assert send.bodies == [["a", "b", "c"], ["d"]]  # "d" could not join a call under way
    assert alone.deadline == 39.0


# --- through the whole pipeline ---


@pytest.fixture
def coalescing_relay(sandbox: SandboxServer, data_dir: Path) -> Iterator[RunningRelay]:
    with running_relay(
        sandbox,
        **embedded(data_dir, batch_delete_window_ms=500),
    ) as running:
        yield running


def test_each_merged_command_gets_its_own_succeeded_event(
    coalescing_relay: RunningRelay, sandbox: SandboxServer
) -> None:
    commands = [
        {"type": "batch-delete", "id": str(uuid.uuid4()),
         "params": {"object_uuids": [str(uuid.uuid4())]}}
        for _ in range(6)
    ]
    for command in commands:
        coalescing_relay.send(command)
    events = {e.data.command_id: e for e in coalescing_relay.events(len(commands))}
    assert set(events) == {c["id"] for c in commands}
    assert {e.data.outcome for e in events.values()} == {"succeeded"}
    assert {e.data.attempts for e in events.values()} == {1}
    assert effects(sandbox) == {c["params"]["object_uuids"][0]: 1 for c in commands}
    assert calls(sandbox) < len(commands)  # merged
    request_ids = [e.data.vendor.request_id for e in events.values() if e.data.vendor]
    assert len(set(request_ids)) == calls(sandbox)
