"""A replica that dies while collecting an ESET 202: the one that takes its key over
collects the cached answer with the stored response-id, instead of reporting the result
lost or sending the mutation again."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from worker.handler import Handler
from worker.idempotency import Claimed, SqliteStore, claim_key, fingerprint
from worker.ops.outage import Outage
from worker.sandbox import Faults, SandboxServer, ScriptedFault
from worker.settlement import Settlement
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import CallBudget

from .test_vendor_calls import batch_delete, settings_for, vendors_for

LEASE_S = 0.2


class Died(Exception):
    """Stands for the process ending right after ESET's 202 was kept with the claim."""


def test_the_taker_collects_a_dead_holders_202(sandbox: SandboxServer, tmp_path: Path) -> None:
    settings = settings_for(sandbox)
    policy = RetryPolicy(max_attempts=2, initial_wait_s=0.01, max_wait_s=0.05)
    object_uuid = str(uuid.uuid4())
    command = batch_delete(object_uuid).with_defaults(f"m-{uuid.uuid4()}")
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])

    async def main() -> tuple[str, Settlement]:
        store = SqliteStore(tmp_path / "store.sqlite3", lease_s=LEASE_S, retention_s=600)
        vendors = vendors_for(settings, policy)
        try:
            # The holder: claims, sends, gets the 202, keeps its response-id, dies.
            await store.claim(claim_key(command), fingerprint(command), "dead-holder")
            kept: list[str] = []

            class KeepAndDie:
                async def sending(self) -> bool:
                    return True

                async def accepted(self, response_id: str) -> bool:
                    await store.mark_accepted(claim_key(command), "dead-holder", response_id)
                    kept.append(response_id)
                    raise Died

            budget = CallBudget(policy.clock() + 10)
            with pytest.raises(Died):
                await vendors.run(vendors.call_for(command), budget, KeepAndDie())
            await asyncio.sleep(LEASE_S * 1.5)  # its lease runs out
            timings = replace(settings.handler_timings, command_timeout_s=10)
            taker = Handler(store, vendors, policy, timings, "taker", Outage({}))
            return kept[0], await taker.handle(command)
        finally:
            await vendors.aclose()
            await store.close()

    response_id, settlement = asyncio.run(main())
    event = settlement.event
    assert event is not None and event.data.outcome == "succeeded", event
    assert event.data.vendor is not None and event.data.vendor.response_id == response_id
    stats = sandbox.state.stats()
    assert stats["calls"]["eset.batch_delete"] >= 2  # the send, then the taker's collect(s)
    assert stats["effects"]["eset.batch_delete"] == {object_uuid: 1}


class WatchedStore(SqliteStore):
    """Says when a 202 has been kept with a claim."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, lease_s=LEASE_S, retention_s=600)
        self.accepted = asyncio.Event()

    async def mark_accepted(self, key: str, owner: str, response_id: str) -> bool:
        marked = await super().mark_accepted(key, owner, response_id)
        self.accepted.set()
        return marked


def test_a_holder_stopped_mid_collect_leaves_its_202_claimed(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Cancelled while it waits to collect (a shutdown), the holder does not release the
    key: a redelivery must collect the 202, not send the deletion again."""
    settings = settings_for(sandbox).model_copy(update={"collect_interval_s": 5.0})
    policy = RetryPolicy(max_attempts=2, initial_wait_s=0.01, max_wait_s=0.05)
    command = batch_delete(str(uuid.uuid4())).with_defaults(f"m-{uuid.uuid4()}")
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])

    async def main() -> object:
        store = WatchedStore(tmp_path / "store.sqlite3")
        vendors = vendors_for(settings, policy)
        timings = replace(settings.handler_timings, command_timeout_s=30)
        holder = Handler(store, vendors, policy, timings, "holder", Outage({}))
        try:
            handling = asyncio.ensure_future(holder.handle(command))
            await asyncio.wait_for(store.accepted.wait(), 10)
            handling.cancel()
            with pytest.raises(asyncio.CancelledError):
                await handling
            await asyncio.sleep(LEASE_S * 1.5)
            return await store.claim(claim_key(command), fingerprint(command), "next")
        finally:
            await vendors.aclose()
            await store.close()

    taken = asyncio.run(main())
    assert isinstance(taken, Claimed) and taken.after_send and taken.response_id


class FirstMarkStalls(SqliteStore):
    """The first "sent" mark waits for ``resume``: its delivery stalled (a lost
    connection, a starved loop) between taking its rate slot and marking the key."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, lease_s=5.0, retention_s=600)
        self.stalled, self.resume, self.marked = asyncio.Event(), asyncio.Event(), 0

    async def mark_sent(self, key: str, owner: str) -> bool:
        if not self.stalled.is_set():
            self.stalled.set()
            await self.resume.wait()
        self.marked += 1
        return await super().mark_sent(key, owner)

    async def expire_leases(self) -> None:
        await self._run(lambda: self._db.execute("UPDATE claims SET lease_until = 0"))


def test_a_delivery_that_lost_its_claim_does_not_send_beside_its_own_redelivery(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """A delivery stalled past its lease and the redelivery that took its key over run
    in the same process: only one of them may send."""
    settings = settings_for(sandbox)
    policy = RetryPolicy(max_attempts=2, initial_wait_s=0.01, max_wait_s=0.05)
    object_uuid = str(uuid.uuid4())
    command = batch_delete(object_uuid).with_defaults(f"m-{uuid.uuid4()}")
    sandbox.state.faults = Faults(latency_ms=500)  # the redelivery's call is in flight...

    async def main() -> list[Settlement]:
        store = FirstMarkStalls(tmp_path / "store.sqlite3")
        vendors = vendors_for(settings, policy)
        timings = replace(settings.handler_timings, command_timeout_s=10)
        handler = Handler(store, vendors, policy, timings, "one-process", Outage({}))
        try:
            first = asyncio.create_task(handler.handle(command))
            await store.stalled.wait()
            await store.expire_leases()  # its lease ran out while it stalled
            redelivery = asyncio.create_task(handler.handle(command))
            while store.marked == 0:
                await asyncio.sleep(0.01)
            store.resume.set()  # ...when the stalled delivery wakes up
            return list(await asyncio.gather(first, redelivery))
        finally:
            await vendors.aclose()
            await store.close()

    settlements = asyncio.run(main())
    stats = sandbox.state.stats()
    assert stats["calls"]["eset.batch_delete"] == 1
    assert stats["effects"]["eset.batch_delete"] == {object_uuid: 1}
    replayed = sorted(s.event.data.replayed for s in settlements if s.event is not None)
    assert replayed == [False, True]  # one sent, the other replays its event
