"""Rate limits per vendor account, shared by every replica when backed by Redis.

Limits are written as the ``limits`` library parses them (``"10/second"``); the storage
is ``memory://`` for one process or ``redis://…`` for a fleet. A moving window matches
how ESET counts (10 calls in any second per account), so a full budget is used without
collecting 429s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

# Shortest pause while waiting for a slot, so a busy wait can not spin.
MIN_WAIT_S = 0.005


class RateLimits:
    """All vendor limits of one worker, over one storage."""

    def __init__(self, limits_by_vendor: dict[str, str], storage_url: str = "memory://") -> None:
        self._items = {vendor: parse(text) for vendor, text in limits_by_vendor.items()}
        storage = _storage(storage_url)
        self._limiter = MovingWindowRateLimiter(storage)

    def slot(self, vendor: str, account: str) -> RateSlot | Unlimited:
        """The slot one vendor account's calls wait for."""
        item = self._items.get(vendor)
        if item is None:
            return Unlimited()
        return RateSlot(self._limiter, item, vendor, account)


@dataclass(frozen=True)
class RateSlot:
    limiter: MovingWindowRateLimiter
    item: RateLimitItem
    vendor: str
    account: str

    async def acquire(self) -> None:
        """Return once a call fits in the window; the call is counted."""
        while not await self.limiter.hit(self.item, self.vendor, self.account):
            stats = await self.limiter.get_window_stats(self.item, self.vendor, self.account)
            await asyncio.sleep(max(stats.reset_time - time.time(), MIN_WAIT_S))


class Unlimited:
    """For vendors without a documented limit."""

    async def acquire(self) -> None:
        return None


def _storage(url: str) -> Any:
    # The handlers run on asyncio, so the storage must be the async flavour; for Redis,
    # through redis-py (the worker's own Redis client) rather than coredis.
    async_url = url if url.startswith("async+") else f"async+{url}"
    if "redis" in url:
        return storage_from_string(async_url, implementation="redispy")
    return storage_from_string(async_url)
