"""Whether the stores answer, and a way to wait until they do.

While the idempotency store or the shared rate-limit store is unreachable, no command
can be done safely (a claim can not be taken, a vendor budget can not be counted). Such
commands are held, not failed: whoever hits the outage reports it here, new work waits
for :meth:`Outage.wait` before it starts, and one probe looks every ``probe_interval_s``
until the store answers again. Readiness reports :attr:`Outage.reason` meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.errors import StoreUnavailable

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]
T = TypeVar("T")


class Outage:
    def __init__(self, probes: dict[str, Probe], probe_interval_s: float = 0.5) -> None:
        self.probes = probes  # by store name: a call that raises while it is away
        self._probe_interval_s = probe_interval_s
        self._available = asyncio.Event()
        self._available.set()
        self._probing: asyncio.Task[None] | None = None
        self.reason: str | None = None  # what is away, while something is

    @property
    def available(self) -> bool:
        return self._available.is_set()

    def report(self, error: StoreUnavailable) -> None:
        """A store call failed: hold new work until the probe sees the stores answer."""
        if self._probing is not None and not self._probing.done():
            return
        self.reason = error.message
        self._available.clear()
        log.warning("holding commands: %s", error.message)
        self._probing = asyncio.ensure_future(self._probe_until_back())

    async def held(self, call: Callable[[], Awaitable[T]], hold_s: float) -> T:
        """``call()``, tried again each time the stores answer after it found one away,
        for ``hold_s`` at most; then its StoreUnavailable is raised."""
        give_up_at = time.monotonic() + hold_s
        while True:
            try:
                return await call()
            except StoreUnavailable as error:
                self.report(error)
                left_s = give_up_at - time.monotonic()
                if left_s <= 0 or not await self.wait(left_s):
                    raise

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Until the stores answer (True), or ``timeout_s`` passed (False)."""
        if self._available.is_set():
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._available.wait()
        except TimeoutError:
            return False
        return True

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                for probe in self.probes.values():
                    await probe()
            except Exception:  # still away: look again later
                continue
            break
        log.info("stores answer again; resuming")
        self.reason = None
        self._available.set()
