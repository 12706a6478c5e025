"""Vendor rate limits per account, shared by every replica when kept in Redis.

Calls are *paced*: each one reserves the next free moment of its account, one interval
(window / limit, plus a small margin) after the previous call, and waits until then.
Window counters (the ``limits`` library's strategies) let a whole budget through at once
at every window edge; a vendor that counts arrivals in a sliding second (ESET: 10 calls
in any second per account) then sees 11 when network delays shift a burst, and answers
429s. Pacing with a margin keeps calls apart by more than the jitter of the network.

Limits are written in the ``limits`` notation (``"10/second"``). The pace is kept in
process (``memory://``) or in Redis (``redis://…``), where a Lua script reserves the slot
atomically on the server's clock, so replicas on different hosts share one budget.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from limits import parse

from worker.errors import StoreUnavailable
from worker.outage import Outage

KEY_PREFIX = "relay:pace:"
# A call that leaves later than this after its slot gives the slot up and takes the next
# one: as a share of the pacing margin, so a late call never lands within one window of
# the calls after it (ESET counts arrivals in any sliding second). Bounded, so a loaded
# loop slows calls down rather than stopping them.
LATE_SHARE_OF_MARGIN = 0.5
MAX_LATE_RETAKES = 3

# Reserve the next free moment of a key: returns the seconds to wait (as a string, Lua
# numbers are returned as integers). KEYS[1]: the account; ARGV[1]: interval in seconds.
RESERVE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = tonumber(ARGV[1])
local free_at = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
redis.call('SET', KEYS[1], tostring(free_at + interval),
           'PX', math.ceil((free_at + interval - now) * 1000) + 1000)
return tostring(free_at - now)
"""


class Pacer(Protocol):
    async def reserve(self, key: str, interval_s: float) -> float:
        """Reserve the next slot of ``key``; the seconds to wait for it."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` while the pace can not be kept."""
        ...


class MemoryPacer:
    """For one process (the embedded, single-host default)."""

    def __init__(self) -> None:
        self._free_at: dict[str, float] = {}

    async def reserve(self, key: str, interval_s: float) -> float:
        now = time.monotonic()
        free_at = max(self._free_at.get(key, 0.0), now)
        self._free_at[key] = free_at + interval_s
        return free_at - now

    async def ping(self) -> None:
        return None


class RedisPacer:
    """For a fleet: one pace per account across every replica."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis  # the redis extra: only a fleet needs it

        from worker.idempotency_redis import SOCKET_TIMEOUT_S, UNREACHABLE

        self._unreachable = UNREACHABLE
        self._redis = Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self._reserve = self._redis.register_script(RESERVE_SCRIPT)

    async def reserve(self, key: str, interval_s: float) -> float:
        try:
            return float(await self._reserve(keys=[KEY_PREFIX + key], args=[repr(interval_s)]))
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error


class RateLimits:
    """All vendor limits of one worker."""

    def __init__(
        self, limits_by_vendor: dict[str, str], storage_url: str = "memory://",
        margin: float = 0.03, outage: Outage | None = None, outage_hold_s: float = 600.0,
    ) -> None:
        self._interval_s: dict[str, float] = {}
        self._late_s: dict[str, float] = {}
        for vendor, text in limits_by_vendor.items():
            window_s, amount = _window_s_and_amount(text)
            self._interval_s[vendor] = window_s / amount * (1 + margin)
            self._late_s[vendor] = window_s * margin * LATE_SHARE_OF_MARGIN
        self.pacer: Pacer = MemoryPacer() if storage_url == "memory://" else RedisPacer(
            storage_url
        )
        self._outage = outage or Outage({})
        self._outage_hold_s = outage_hold_s

    def slot(self, vendor: str, account: str) -> RateSlot | Unlimited:
        """The slot one vendor account's calls wait for."""
        interval_s = self._interval_s.get(vendor)
        if interval_s is None:
            return Unlimited()
        return RateSlot(
            self.pacer, f"{vendor}:{account}", interval_s, self._late_s[vendor],
            self._outage, self._outage_hold_s,
        )


@dataclass(frozen=True)
class RateSlot:
    pacer: Pacer
    key: str
    interval_s: float
    late_s: float  # a call later than this after its slot takes a new one
    outage: Outage
    outage_hold_s: float  # how long a call waits for an unreachable pace store

    async def acquire(self) -> float:
        """Return at this call's moment (a ``time.monotonic`` reading, given back); the
        slot is taken once it is reserved. A wake-up later than ``late_s`` takes the next
        slot instead, a few times at most (a loaded loop then slows calls down)."""
        for _ in range(MAX_LATE_RETAKES):
            asked_at = time.monotonic()
            wait_s = await self._reserve()
            # From before the reservation was asked: never later than the true moment.
            slot_at = asked_at + max(wait_s, 0.0)
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if self.on_time(slot_at):
                break
        return slot_at

    def on_time(self, slot_at: float) -> bool:
        """Whether a call sent now is close enough to its slot."""
        return time.monotonic() - slot_at <= self.late_s

    async def _reserve(self) -> float:
        give_up_at = time.monotonic() + self.outage_hold_s
        while True:
            try:
                return await self.pacer.reserve(self.key, self.interval_s)
            except StoreUnavailable as error:
                self.outage.report(error)
                if not await self.outage.wait(give_up_at - time.monotonic()):
                    raise


class Unlimited:
    """For vendors without a documented limit."""

    async def acquire(self) -> float:
        return time.monotonic()

    def on_time(self, slot_at: float) -> bool:
        return True


def _window_s_and_amount(text: str) -> tuple[float, int]:
    item = parse(text)
    return float(item.get_expiry()), int(item.amount)
