"""Rate-limit slots: a moving window per vendor account, shared through Redis by replicas."""

from __future__ import annotations

import asyncio
import time
import uuid

from worker.ratelimit import RateLimits, RateSlot, Unlimited

ESET_LIMIT = {"eset": "10/second"}


async def acquire_timed(slot: RateSlot | Unlimited, count: int) -> list[float]:
    """Seconds from the start at which each of ``count`` acquisitions returned."""
    start = time.monotonic()
    times = []
    for _ in range(count):
        await slot.acquire()
        times.append(time.monotonic() - start)
    return times


def test_full_window_admits_ten_at_once_and_the_eleventh_after_it_moves() -> None:
    async def scenario() -> list[float]:
        slot = RateLimits(ESET_LIMIT).slot("eset", f"account-{uuid.uuid4()}")
        return await acquire_timed(slot, 11)

    times = asyncio.run(scenario())
    assert times[9] < 0.5  # the first ten do not wait
    assert 0.9 <= times[10] < 2.5  # the eleventh waits for the first call to leave the window


def test_accounts_have_separate_budgets() -> None:
    async def scenario() -> list[float]:
        limits = RateLimits(ESET_LIMIT)
        await acquire_timed(limits.slot("eset", f"busy-{uuid.uuid4()}"), 10)
        return await acquire_timed(limits.slot("eset", f"idle-{uuid.uuid4()}"), 10)

    assert asyncio.run(scenario())[-1] < 0.5


def test_vendor_without_a_limit_never_waits() -> None:
    async def scenario() -> list[float]:
        return await acquire_timed(RateLimits(ESET_LIMIT).slot("fylr", "any"), 50)

    assert asyncio.run(scenario())[-1] < 0.5


def test_two_workers_over_one_redis_share_one_budget(redis_url: str) -> None:
    """Five calls from each of two replicas fill the account's ten; the next call from
    either waits for the window, as ESET counts per account and not per replica."""
    vendor = f"eset-{uuid.uuid4()}"
    account = f"account-{uuid.uuid4()}"
    limits = {vendor: "10/second"}

    async def scenario() -> tuple[float, float]:
        first = RateLimits(limits, redis_url).slot(vendor, account)
        second = RateLimits(limits, redis_url).slot(vendor, account)
        start = time.monotonic()
        for _ in range(5):
            await first.acquire()
            await second.acquire()
        filled = time.monotonic() - start
        await second.acquire()
        return filled, time.monotonic() - start

    filled, eleventh = asyncio.run(scenario())
    assert filled < 0.5
    assert 0.9 <= eleventh < 2.5
