"""Whether the stores answer, and a way to wait until they do.

While the idempotency store or the shared rate-limit store is unreachable, no command
can be done safely (a claim can not be taken, a vendor budget can not be counted). Such
commands are held, not failed: whoever hits the outage reports it here, new work waits
for :meth:`Outage.wait` before it starts, and one probe looks every ``probe_interval_s``
until the store answers again. Readiness reports :attr:`Outage.reason` meanwhile.

The store may be away for this replica only (a network partition, a broken route) while
the others reach it. So the consumer does not keep work it can not start: it stops taking
deliveries and calls :meth:`Outage.give_back_unstarted`, and from then until the stores
answer, calls held with ``nothing_held`` (a command taking its claim: it holds nothing of
the store's yet) are not held any more but raise their StoreUnavailable, so that their
deliveries go back to the broker for a replica that reaches the store. Calls of work
already started (a claim held, a vendor call under way) are held as before.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._giving_back = asyncio.Event()  # set from give_back_unstarted() until it is back
        self._probing: asyncio.Task[None] | None = None
        self.reason: str | None = None  # what is away, while something is

    @property
    def available(self) -> bool:
        return self._available.is_set()

    @property
    def giving_back(self) -> bool:
        """The consumer gives back the work it has not started, until the stores answer."""
        return self._giving_back.is_set()

    def report(self, error: StoreUnavailable) -> None:
        """A store call failed: hold new work until the probe sees the stores answer."""
        if self._probing is not None and not self._probing.done():
            return
        self.reason = error.message
        self._available.clear()
        log.warning("holding commands: %s", error.message)
        self._probing = asyncio.ensure_future(self._probe_until_back())

    def give_back_unstarted(self) -> None:
        """From now until the stores answer, calls held with ``nothing_held`` raise their
        StoreUnavailable instead of waiting (those waiting now too). Nothing while the
        stores answer: there is nothing to give back for."""
        if not self.available:
            self._giving_back.set()

    async def held(
        self, call: Callable[[], Awaitable[T]], hold_s: float, *, nothing_held: bool = False
    ) -> T:
        """``call()``, tried again each time the stores answer after it found one away,
        for ``hold_s`` at most; then its StoreUnavailable is raised. ``nothing_held``: the
        caller holds nothing of the store's yet (it is taking a claim), so it is given back
        rather than held once the consumer gives back what it has not started."""
        give_up_at = time.monotonic() + hold_s
        while True:
            try:
                return await call()
            except StoreUnavailable as error:
                self.report(error)
                left_s = give_up_at - time.monotonic()
                if left_s <= 0 or not await self.wait(left_s, unless_given_back=nothing_held):
                    raise

    async def wait(
        self, timeout_s: float | None = None, *, unless_given_back: bool = False
    ) -> bool:
        """Until the stores answer (True), or ``timeout_s`` passed (False); with
        ``unless_given_back``, also False once the consumer gives back unstarted work."""
        if self._available.is_set():
            return True
        if unless_given_back and self._giving_back.is_set():
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                if unless_given_back:
                    await _first_set(self._available, self._giving_back)
                else:
                    await self._available.wait()
        return self._available.is_set()

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
        self._giving_back.clear()
        self._available.set()


async def _first_set(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
