"""RetryPolicy: which errors are retried, how long it waits, and when it gives up.

A recording fake ``sleep`` advances a fake clock instead of waiting, so no test sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from schemas.events import ErrorCode
from worker.errors import (
    CommandRejected,
    PermanentFailure,
    RelayError,
    TransientFailure,
    VendorThrottled,
)
from worker.vendors.retries import RetryPolicy


class FakeTime:
    """A clock that only moves when the policy sleeps; every pause is recorded."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def policy(time: FakeTime, **overrides: float) -> RetryPolicy:
    values = {"max_attempts": 5, "initial_wait_s": 0.5, "max_wait_s": 30.0, **overrides}
    return RetryPolicy(
        max_attempts=int(values["max_attempts"]),
        initial_wait_s=values["initial_wait_s"],
        max_wait_s=values["max_wait_s"],
        sleep=time.sleep,
        clock=time.clock,
    )


def run(
    retry_policy: RetryPolicy, deadline: float, fail: Callable[[int], RelayError | None]
) -> list[int]:
    """Attempt numbers made until ``fail(n)`` returns None; re-raises what the loop raised."""
    attempts: list[int] = []

    async def loop() -> None:
        async for attempt in retry_policy.retrying(deadline):
            with attempt:
                attempts.append(len(attempts) + 1)
                error = fail(len(attempts))
                if error is not None:
                    raise error

    asyncio.run(loop())
    return attempts


def transient(n: int) -> TransientFailure:
    return TransientFailure(ErrorCode.VENDOR_UNAVAILABLE, f"attempt {n} failed", 503)


def test_transient_failure_is_retried_until_it_passes() -> None:
    time = FakeTime()
    attempts = run(policy(time), time.now + 600, lambda n: transient(n) if n < 3 else None)
    assert attempts == [1, 2, 3]
    assert len(time.sleeps) == 2


def test_transient_failure_stops_at_the_attempt_cap_and_reraises_the_last_error() -> None:
    time = FakeTime()
    errors: list[TransientFailure] = []

    def fail(n: int) -> TransientFailure:
        errors.append(transient(n))
        return errors[-1]

    with pytest.raises(TransientFailure) as raised:
        run(policy(time, max_attempts=4), time.now + 600, fail)
    assert len(errors) == 4
    assert raised.value is errors[-1]
    assert len(time.sleeps) == 3  # no pause after the last attempt


@pytest.mark.parametrize(
    "error",
    [
        PermanentFailure(ErrorCode.VENDOR_REJECTED, "no such task", vendor_status=404),
        CommandRejected(ErrorCode.REGION_NOT_SUPPORTED, "no quarantine in jpn"),
    ],
    ids=["permanent-failure", "command-rejected"],
)
def test_refusals_are_not_retried(error: RelayError) -> None:
    time = FakeTime()
    with pytest.raises(type(error)) as raised:
        run(policy(time), time.now + 600, lambda n: error)
    assert raised.value is error
    assert time.sleeps == []


def test_waits_use_full_jitter_within_a_doubling_window_capped_at_max_wait() -> None:
    """The k-th pause lies in [0, initial * 2**k], never above max_wait_s, and the window
    really widens (over many runs some pause exceeds the previous window)."""
    initial, max_wait, retries = 0.5, 3.0, 6
    by_retry: list[list[float]] = [[] for _ in range(retries)]
    for _ in range(200):
        time = FakeTime()
        with pytest.raises(TransientFailure):
            run(
                policy(time, max_attempts=retries + 1, initial_wait_s=initial, max_wait_s=max_wait),
                time.now + 10_000,
                transient,
            )
        for k, wait in enumerate(time.sleeps):
            by_retry[k].append(wait)

    windows = [min(initial * 2**k, max_wait) for k in range(retries)]
    for k, waits in enumerate(by_retry):
        assert len(waits) == 200
        assert all(0 <= wait <= windows[k] for wait in waits), (k, max(waits))
    for k in range(1, retries):
        if windows[k] > windows[k - 1]:
            assert max(by_retry[k]) > windows[k - 1]  # fails with odds of 2**-200
    assert max(by_retry[-1]) > windows[-2] * 0.9  # capped windows are still used in full


def test_retry_after_from_a_throttled_vendor_is_the_exact_wait() -> None:
    time = FakeTime()

    def throttled(n: int) -> VendorThrottled | None:
        return VendorThrottled("slow down", retry_after_s=7.0) if n < 3 else None

    attempts = run(policy(time, initial_wait_s=0.5, max_wait_s=1.0), time.now + 600, throttled)
    assert attempts == [1, 2, 3]
    assert time.sleeps == [7.0, 7.0]


def test_throttle_without_retry_after_falls_back_to_jitter() -> None:
    time = FakeTime()

    def throttled(n: int) -> VendorThrottled | None:
        return VendorThrottled("slow down", retry_after_s=None) if n < 2 else None

    run(policy(time, initial_wait_s=0.5), time.now + 600, throttled)
    assert len(time.sleeps) == 1
    assert 0 <= time.sleeps[0] <= 0.5


def test_no_attempt_starts_at_or_past_the_deadline() -> None:
    """Fixed 1 s pauses and a deadline 2.5 s away: tries at +0, +1, +2; a fourth would
    start at +3, past the deadline, so the last error is raised instead of sleeping."""
    time = FakeTime()
    start = time.now
    started_at: list[float] = []

    def throttled(n: int) -> VendorThrottled:
        started_at.append(time.now - start)
        return VendorThrottled(f"attempt {n}", retry_after_s=1.0)

    with pytest.raises(VendorThrottled, match="attempt 3"):
        run(policy(time, max_attempts=10), start + 2.5, throttled)
    assert started_at == [0.0, 1.0, 2.0]
    assert time.sleeps == [1.0, 1.0]
