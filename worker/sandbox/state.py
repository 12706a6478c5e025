"""The live state of one sandbox: everything its endpoints read and change.

The app runs on one event loop while tests read stats and flip faults from their own
thread, so every public method takes one lock; none calls another public method.
"""

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from worker.sandbox.answers import Answer, Vendor
from worker.sandbox.config import SandboxConfig
from worker.sandbox.connections import Connections
from worker.sandbox.faults import Drawn, Faults, pick_fault, pick_hostile
from worker.sandbox.hostile import HostileFault
from worker.sandbox.pending import Collected, PendingCache, RequestKey
from worker.sandbox.ratelimit import SlidingWindowLimiter
from worker.sandbox.resources import CancelOutcome, FylrTasks, SpaazaTasks
from worker.sandbox.stats import Counters
from worker.sandbox.tokens import Grant, TokenStore

_VENDORS: tuple[Vendor, ...] = ("eset", "fylr", "spaaza")
_BEARER = "bearer "


class SandboxState:
    """Tokens, rate windows, ESET's 202 cache, vendor objects, counters and faults, and the
    server's connections (which hostile faults are written on)."""

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        # Touched only on the server's event loop (no lock); a reset keeps them.
        self.connections = Connections()
        self._clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(config.random_seed)
        self._faults = Faults()
        self._start_afresh()

    def _start_afresh(self) -> None:
        config = self.config
        self._tokens = TokenStore(config.token_ttl_s)
        self._limiters = {
            vendor: SlidingWindowLimiter(config.rate_limit_per_s.get(vendor)) for vendor in _VENDORS
        }
        self._pending = PendingCache(config.pending_s, config.collect_timeout_s, config.cache_ttl_s)
        self._fylr_tasks = FylrTasks(config.fylr_cancel_settle_s)
        self._spaaza_tasks = SpaazaTasks()
        self._counters = Counters()

    # --- control: tests, demos and the /_sandbox routes ---

    @property
    def faults(self) -> Faults:
        """The live fault switches (mutating them in place takes effect too)."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self.set_faults(faults)

    def set_faults(self, faults: Faults) -> None:
        """Replace all fault switches at once."""
        with self._lock:
            self._faults = faults

    def reset(self) -> None:
        """Forget counters, effects, cached 202s, tokens, vendor objects and faults."""
        with self._lock:
            self._start_afresh()
            self._faults = Faults()

    def revoke_tokens(self) -> None:
        """Invalidate every issued access token (401 until the client refreshes)."""
        with self._lock:
            self._tokens.revoke_access()

    def stats(self) -> dict[str, Any]:
        """calls, statuses and effects per route, hostile faults served per route and kind,
        collects and throttled counts, and `max_calls_in_window`: per vendor and account,
        the most calls that arrived (admitted or refused with 429) within any sliding
        second."""
        with self._lock:
            peaks: dict[str, dict[str, int]] = {
                vendor: limiter.peaks() for vendor, limiter in self._limiters.items()
            }
            return self._counters.snapshot(max_calls_in_window=peaks)

    # --- per call ---

    def record(self, route: str, status: int) -> None:
        """Count one answered call of `route`."""
        with self._lock:
            self._counters.record(route, status)

    def record_hostile(self, route: str, kind: str) -> None:
        """Count one call of `route` answered by a hostile fault of `kind`."""
        with self._lock:
            self._counters.hostile(route, kind)

    def apply_effect(self, route: str, keys: Iterable[str]) -> None:
        """Count one application of `route`'s effect on each resource in `keys`."""
        with self._lock:
            self._counters.effect(route, keys)

    def issue_token(self, vendor: Vendor, account: str, *, with_refresh: bool) -> Grant:
        """A fresh access token for `account` at `vendor`."""
        with self._lock:
            return self._tokens.issue(vendor, account, self._clock(), with_refresh=with_refresh)

    def refresh_token(self, vendor: Vendor, refresh_token: str) -> Grant | None:
        """New tokens for a valid refresh token (which is spent), else None."""
        with self._lock:
            return self._tokens.refresh(vendor, refresh_token, self._clock())

    def account_for(self, vendor: Vendor, authorization: str | None) -> str | None:
        """The account an `Authorization` header authenticates at `vendor`, else None."""
        if authorization is None or authorization[:7].lower() != _BEARER:
            return None
        credential = authorization[7:].strip()
        if vendor == "spaaza":
            # Spaaza's privileged calls carry a static `{token_id}:{token_secret}` pair.
            expected = f"{self.config.spaaza_token_id}:{self.config.spaaza_token_secret}"
            return self.config.spaaza_token_id if credential == expected else None
        with self._lock:
            return self._tokens.account_for(vendor, credential, self._clock())

    def admit(self, vendor: Vendor, account: str) -> bool:
        """Count a call against `account`'s rate limit; False when over it."""
        with self._lock:
            return self._limiters[vendor].admit(account, self._clock())

    def pick_fault(self, path: str, *, pending_allowed: bool) -> Drawn | None:
        """The fault this call must answer, or None (consumes scripted faults)."""
        with self._lock:
            return pick_fault(self._faults, path, self._rng, pending_allowed=pending_allowed)

    def pick_hostile(self, route: str, path: str) -> HostileFault | None:
        """The hostile fault answering this call, or None (uses up one of its `times`)."""
        with self._lock:
            return pick_hostile(self._faults, route, path)

    @property
    def pending_answers_in_time(self) -> bool:
        """False when a 202'd request always times out (pending_s >= collect_timeout_s)."""
        return self._pending.answers_in_time

    def accept_pending(self, key: RequestKey, answer: Answer | None) -> str:
        """Cache the answer to a 202'd request; returns its response-id."""
        with self._lock:
            return self._pending.accept(key, answer, self._clock())

    def collect(self, response_id: str, key: RequestKey) -> Collected:
        """What a collect of `response_id` with request `key` gets now."""
        with self._lock:
            self._counters.collect()
            return self._pending.collect(response_id, key, self._clock())

    def fylr_task(self, task_id: int) -> dict[str, Any]:
        """A fylr task as `GET /api/v1/task/{id}` shows it."""
        with self._lock:
            return self._fylr_tasks.view(task_id, self._clock())

    def cancel_fylr_task(self, task_id: int) -> CancelOutcome:
        """Request the cancel of a fylr task."""
        with self._lock:
            return self._fylr_tasks.cancel(task_id, self._clock())

    def update_spaaza_task(self, task_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Overwrite fields of a Spaaza task; returns the whole task."""
        with self._lock:
            return self._spaaza_tasks.update(task_id, changes)
