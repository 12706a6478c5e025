"""Counters a test or demo reads to see what the vendors saw."""

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


class Counters:
    """Calls, statuses, applied effects, collects, 429s and hostile faults served; not
    thread-safe."""

    def __init__(self) -> None:
        self._calls: Counter[str] = Counter()
        self._statuses: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._effects: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._hostile: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._collects = 0
        self._throttled = 0

    def record(self, route: str, status: int) -> None:
        """One answered call of `route`."""
        self._calls[route] += 1
        self._statuses[route][str(status)] += 1
        if status == 429:
            self._throttled += 1

    def hostile(self, route: str, kind: str) -> None:
        """One call of `route` answered by a hostile fault of `kind` (no status recorded:
        what reached the client may not have had one)."""
        self._calls[route] += 1
        self._hostile[route][kind] += 1

    def effect(self, route: str, keys: Iterable[str]) -> None:
        """The effect of `route` was applied once to each resource in `keys`."""
        self._effects[route].update(keys)

    def collect(self) -> None:
        """One ESET collect (a request carrying `response-id`)."""
        self._collects += 1

    def snapshot(
        self, max_calls_in_window: Mapping[str, Mapping[str, int]] | None = None
    ) -> dict[str, Any]:
        """A plain-dict copy, safe to keep and to serialise as JSON.

        `max_calls_in_window` (vendor -> account -> calls), kept by the rate limiters, is
        included with the vendors that saw calls.
        """
        peaks = max_calls_in_window or {}
        return {
            "calls": dict(self._calls),
            "statuses": {route: dict(counts) for route, counts in self._statuses.items()},
            "effects": {route: dict(counts) for route, counts in self._effects.items()},
            "hostile": {route: dict(counts) for route, counts in self._hostile.items()},
            "collects": self._collects,
            "throttled": self._throttled,
            "max_calls_in_window": {
                vendor: dict(accounts) for vendor, accounts in peaks.items() if accounts
            },
        }
