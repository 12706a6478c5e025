"""The one retry policy for vendor calls.

Exponential back-off with full jitter, on errors that say they are retryable only,
bounded both by an attempt cap and by a deadline; a ``Retry-After`` from the vendor
replaces the computed wait. Sleeping is injected, so tests run without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from worker.errors import RelayError, VendorThrottled
from worker.settings import RetrySettings

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one vendor request is tried."""

    max_attempts: int
    initial_wait_s: float
    max_wait_s: float
    sleep: Sleep = field(default=asyncio.sleep, compare=False)
    clock: Clock = field(default=time.monotonic, compare=False)

    @classmethod
    def of(
        cls, settings: RetrySettings, sleep: Sleep = asyncio.sleep, clock: Clock = time.monotonic
    ) -> RetryPolicy:
        return cls(settings.max_attempts, settings.initial_wait_s, settings.max_wait_s,
                   sleep, clock)

    def wait_s(self, state: RetryCallState) -> float:
        """The pause before the next attempt: Retry-After when given, else full jitter."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, VendorThrottled) and error.retry_after_s is not None:
            return error.retry_after_s
        jitter = wait_random_exponential(multiplier=self.initial_wait_s, max=self.max_wait_s)
        return float(jitter(state))

    def retrying(self, deadline: float) -> AsyncRetrying:
        """A tenacity loop that stops at the cap, or when the next try would start past
        ``deadline`` (a :attr:`clock` reading); the last error is re-raised."""

        return AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.max_attempts) | StopBeforeDeadline(deadline, self.clock),
            wait=self.wait_s,
            sleep=self.sleep,
            reraise=True,
        )


class StopBeforeDeadline(stop_base):
    """Stop when the next attempt, after its pause, would start past the deadline."""

    def __init__(self, deadline: float, clock: Clock) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() + (retry_state.upcoming_sleep or 0.0) >= self.deadline


def _retryable(error: BaseException) -> bool:
    return isinstance(error, RelayError) and error.retryable
