"""The outage's holds once the replica gives back the work it has not started: a call made
with nothing held (taking a claim) is given up, a call of started work is held on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from worker.errors import StoreUnavailable
from worker.ops.outage import Outage

HOLD_S = 30.0  # longer than any test: a hold that ends, ends for the give-back


class Store:
    """A store that answers only while ``up``."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0

    async def call(self) -> str:
        self.calls += 1
        if not self.up:
            raise StoreUnavailable("idempotency", ConnectionRefusedError())
        return "answered"

    async def ping(self) -> None:
        await self.call()


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 10))


async def until_called(store: Store) -> None:
    while store.calls == 0:
        await asyncio.sleep(0)


def test_a_call_with_nothing_held_is_given_up_once_the_replica_gives_back():
    async def scenario() -> None:
        store = Store()
        outage = Outage({"idempotency": store.ping}, probe_interval_s=0.01)
        claim = asyncio.ensure_future(outage.held(store.call, HOLD_S, nothing_held=True))
        await until_called(store)
        outage.give_back_unstarted()
        with pytest.raises(StoreUnavailable):
            await claim

    run(scenario())


def test_a_call_of_started_work_is_held_past_the_give_back_until_the_store_answers():
    async def scenario() -> None:
        store = Store()
        outage = Outage({"idempotency": store.ping}, probe_interval_s=0.01)
        complete = asyncio.ensure_future(outage.held(store.call, HOLD_S))
        await until_called(store)
        outage.give_back_unstarted()
        await asyncio.sleep(0.05)
        assert not complete.done()
        store.up = True
        assert await complete == "answered"

    run(scenario())


def test_once_the_stores_answer_calls_with_nothing_held_are_held_again():
    """The give-back lasts for one outage: the next one holds claims until the consumer
    gives back again."""
    async def scenario() -> None:
        store = Store()
        outage = Outage({"idempotency": store.ping}, probe_interval_s=0.01)
        outage.report(StoreUnavailable("idempotency", ConnectionRefusedError()))
        outage.give_back_unstarted()
        assert outage.giving_back
        store.up = True
        assert await outage.wait(HOLD_S)
        assert not outage.giving_back
        store.up = False
        claim = asyncio.ensure_future(outage.held(store.call, HOLD_S, nothing_held=True))
        await asyncio.sleep(0.05)
        assert not claim.done()
        store.up = True
        assert await claim == "answered"

    run(scenario())


def test_nothing_is_given_back_while_the_stores_answer():
    async def scenario() -> None:
        outage = Outage({}, probe_interval_s=0.01)
        outage.give_back_unstarted()
        assert not outage.giving_back

    run(scenario())
