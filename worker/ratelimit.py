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

KEY_PREFIX = "relay:pace:"

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


class MemoryPacer:
    """For one process (the embedded, single-host default)."""

    def __init__(self) -> None:
        self._free_at: dict[str, float] = {}

    async def reserve(self, key: str, interval_s: float) -> float:
        now = time.monotonic()
        free_at = max(self._free_at.get(key, 0.0), now)
        self._free_at[key] = free_at + interval_s
        return free_at - now


class RedisPacer:
    """For a fleet: one pace per account across every replica."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis  # the redis extra: only a fleet needs it

        self._reserve = Redis.from_url(url).register_script(RESERVE_SCRIPT)

    async def reserve(self, key: str, interval_s: float) -> float:
        return float(await self._reserve(keys=[KEY_PREFIX + key], args=[repr(interval_s)]))


class RateLimits:
    """All vendor limits of one worker."""

    def __init__(
        self, limits_by_vendor: dict[str, str], storage_url: str = "memory://",
        margin: float = 0.03,
    ) -> None:
        self._interval_s = {
            vendor: _interval_s(text) * (1 + margin) for vendor, text in limits_by_vendor.items()
        }
        self._pacer: Pacer = MemoryPacer() if storage_url == "memory://" else RedisPacer(
            storage_url
        )

    def slot(self, vendor: str, account: str) -> RateSlot | Unlimited:
        """The slot one vendor account's calls wait for."""
        interval_s = self._interval_s.get(vendor)
        if interval_s is None:
            return Unlimited()
        return RateSlot(self._pacer, f"{vendor}:{account}", interval_s)


@dataclass(frozen=True)
class RateSlot:
    pacer: Pacer
    key: str
    interval_s: float

    async def acquire(self) -> None:
        """Return at this call's moment; the slot is taken once it is reserved."""
        wait_s = await self.pacer.reserve(self.key, self.interval_s)
        if wait_s > 0:
            await asyncio.sleep(wait_s)


class Unlimited:
    """For vendors without a documented limit."""

    async def acquire(self) -> None:
        return None


def _interval_s(text: str) -> float:
    item = parse(text)
    return item.get_expiry() / item.amount
