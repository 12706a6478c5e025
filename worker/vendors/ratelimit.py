"""Vendor rate limits per account, shared by every replica when kept in Redis.

Calls are *paced*: each one reserves the next free moment of its account, one interval
(window / limit, plus a small margin) after the previous call, and waits until then.
Window counters (the ``limits`` library's strategies) let a whole budget through at once
at every window edge; a vendor that counts arrivals in a sliding second (ESET: 10 calls
in any second per account) then sees 11 when network delays shift a burst, and answers
429s. Pacing with a margin keeps calls apart by more than the jitter of the network.

Pacing alone is not enough where the vendor counts: what is awaited between a call's
slot and its send (the "sent" mark, a loaded loop, the store's round trip) shifts calls
by more than the margin. So right before it is sent a call also passes a *window gate*:
the account's last sends are kept in a log, and a call goes only while fewer than the
limit were sent in the window plus a guard (the margin of the window); else it waits
until the oldest leaves. Sends that land at most the guard later than their gate keep
every sliding window at the limit. Paced calls rarely wait at the gate. A send that
leaves later than that (its process starved of CPU, its loop busy) would still bunch up
with the next ones where the vendor counts; so once its answer is back, a send's entry
in the log is moved to that moment, which is never earlier than the vendor counted it.

Limits are written in the ``limits`` notation (``"10/second"``). Pace and log are kept
in process (``memory://``) or in Redis (``redis://…``), where Lua scripts reserve and
admit atomically on the server's clock, so replicas on different hosts share one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from worker.errors import StoreUnavailable
from worker.ops.outage import Outage
from worker.settings import RateLimitSettings, TlsFiles, window_s_and_amount

KEY_PREFIX = "relay:pace:"
LOG_KEY_PREFIX = "relay:sent:"

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

# Admit one send of a key if fewer than ARGV[1] were admitted in the last ARGV[2] seconds:
# returns "0" (admitted, and logged as ARGV[3]), else the seconds until the oldest leaves
# the window.
ADMIT_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(math.max(tonumber(oldest[2]) + window - now, 0.001))
"""

# Move a logged send (ARGV[1]) to now, if it is still in the log; ARGV[2]: window seconds.
ANSWERED_SCRIPT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local clock = redis.call('TIME')
  redis.call('ZADD', KEYS[1], 'XX', tonumber(clock[1]) + tonumber(clock[2]) / 1000000, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
end
"""


class Pacer(Protocol):
    async def reserve(self, key: str, interval_s: float) -> float:
        """Reserve the next slot of ``key``; the seconds to wait for it."""
        ...

    async def admit(self, key: str, amount: int, window_s: float, send: str) -> float:
        """Log ``send`` of ``key`` if fewer than ``amount`` went in the last ``window_s``
        and return 0; else the seconds to wait before asking again."""
        ...

    async def answered(self, key: str, send: str, window_s: float) -> None:
        """Move ``send``'s entry in the log to now: its answer is back."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` while the pace can not be kept."""
        ...


class MemoryPacer:
    """For one process (the embedded, single-host default)."""

    def __init__(self) -> None:
        self._free_at: dict[str, float] = {}
        self._sent: dict[str, dict[str, float]] = {}  # by key: when each send was logged

    async def reserve(self, key: str, interval_s: float) -> float:
        now = time.monotonic()
        free_at = max(self._free_at.get(key, 0.0), now)
        self._free_at[key] = free_at + interval_s
        return free_at - now

    async def admit(self, key: str, amount: int, window_s: float, send: str) -> float:
        now = time.monotonic()
        sent = self._sent.setdefault(key, {})
        for gone in [name for name, at in sent.items() if at <= now - window_s]:
            del sent[gone]
        if len(sent) < amount:
            sent[send] = now
            return 0.0
        return max(min(sent.values()) + window_s - now, 0.001)

    async def answered(self, key: str, send: str, window_s: float) -> None:
        sent = self._sent.get(key, {})
        if send in sent:
            sent[send] = time.monotonic()

    async def ping(self) -> None:
        return None


class RedisPacer:
    """For a fleet: one pace per account across every replica."""

    def __init__(self, url: str, tls: TlsFiles) -> None:
        from redis.asyncio import Redis  # the redis extra: only a fleet needs it

        from worker.idempotency.redis import SOCKET_TIMEOUT_S, UNREACHABLE, tls_options

        self._unreachable = UNREACHABLE
        self._redis = Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
            **tls_options(url, tls),
        )
        self._reserve = self._redis.register_script(RESERVE_SCRIPT)
        self._admit = self._redis.register_script(ADMIT_SCRIPT)
        self._answered = self._redis.register_script(ANSWERED_SCRIPT)

    async def reserve(self, key: str, interval_s: float) -> float:
        try:
            return float(await self._reserve(keys=[KEY_PREFIX + key], args=[repr(interval_s)]))
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error

    async def admit(self, key: str, amount: int, window_s: float, send: str) -> float:
        args: list[str | int] = [amount, repr(window_s), send]
        try:
            return float(await self._admit(keys=[LOG_KEY_PREFIX + key], args=args))
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error

    async def answered(self, key: str, send: str, window_s: float) -> None:
        try:
            await self._answered(keys=[LOG_KEY_PREFIX + key], args=[send, repr(window_s)])
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except self._unreachable as error:
            raise StoreUnavailable("rate-limit", error) from error


class RateLimits:
    """All vendor limits of one worker."""

    def __init__(self, settings: RateLimitSettings, outage: Outage) -> None:
        self._limits: dict[str, tuple[float, int]] = {}
        for vendor, text in settings.limits.items():
            window_s, amount = window_s_and_amount(text)
            self._limits[vendor] = (window_s * (1 + settings.margin), amount)
        url = settings.storage_url
        self.pacer: Pacer = (
            MemoryPacer() if url == "memory://" else RedisPacer(url, settings.storage_tls)
        )
        self._outage = outage
        self._outage_hold_s = settings.outage_hold_s

    def slot(self, vendor: str, account: str) -> RateSlot | Unlimited:
        """The slot one vendor account's calls wait for."""
        limit = self._limits.get(vendor)
        if limit is None:
            return Unlimited()
        guarded_window_s, amount = limit
        return RateSlot(
            self.pacer, f"{vendor}:{account}", guarded_window_s, amount,
            self._outage, self._outage_hold_s,
        )


@dataclass(frozen=True)
class RateSlot:
    pacer: Pacer
    key: str
    window_s: float  # the vendor's window plus the guard (the margin)
    amount: int  # calls allowed in the window
    outage: Outage
    outage_hold_s: float  # how long a call waits for an unreachable pace store

    @property
    def interval_s(self) -> float:
        return self.window_s / self.amount

    async def acquire(self) -> None:
        """Wait for this call's paced moment; the slot is taken once it is reserved."""
        wait_s = await self.outage.held(
            lambda: self.pacer.reserve(self.key, self.interval_s), self.outage_hold_s
        )
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    async def admit(self) -> str:
        """Return once the call may be sent now; send it at once (nothing awaited). The
        name returned is the send's, for :meth:`answered`."""
        send = uuid.uuid4().hex
        while True:
            wait_s = await self.outage.held(
                lambda: self.pacer.admit(self.key, self.amount, self.window_s, send),
                self.outage_hold_s,
            )
            if wait_s <= 0:
                return send
            await asyncio.sleep(wait_s)

    async def answered(self, send: str) -> None:
        """The send's answer is back (or it failed): it counts in the window from now.
        Best effort: with the store away, it counts from when it was admitted."""
        with contextlib.suppress(StoreUnavailable):
            await self.pacer.answered(self.key, send, self.window_s)



class Unlimited:
    """For vendors without a documented limit."""

    async def acquire(self) -> None:
        return None

    async def admit(self) -> str:
        return ""

    async def answered(self, send: str) -> None:
        return None
