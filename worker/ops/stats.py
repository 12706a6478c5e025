"""A line of counts in the log every ``RELAY_STATS_INTERVAL_S`` (a minute by default):
commands done since the last line, by outcome, those in flight, and the messages
dead-lettered. Whoever reads only the log still sees that the worker works.

The counts are those the metrics are recorded with: :class:`Tally` wraps the three
instruments (``relay.commands``, ``relay.commands.in_flight``, ``relay.dead_letters``) and
counts what passes through, so no component records anything twice.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Counts
from collections.abc import Callable

from opentelemetry.context import Context
from opentelemetry.metrics import Counter, UpDownCounter
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

OUTCOME_ATTRIBUTE = "relay.outcome"
TERMINAL_OUTCOMES = ("succeeded", "failed", "rejected")  # always shown, even at 0


class Tally:
    """Counts since the last :meth:`take`; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: Counts[str] = Counts()
        self._dead_lettered = 0
        self._in_flight = 0

    def done(self, amount: float, attributes: Attributes) -> None:
        outcome = str((attributes or {}).get(OUTCOME_ATTRIBUTE, "unknown"))
        with self._lock:
            self._done[outcome] += int(amount)

    def dead_lettered(self, amount: float, attributes: Attributes) -> None:
        with self._lock:
            self._dead_lettered += int(amount)

    def in_flight(self, amount: float, attributes: Attributes) -> None:
        with self._lock:
            self._in_flight += int(amount)

    def take(self) -> tuple[dict[str, int], int, int]:
        """Commands done by outcome and dead-lettered since the last call, and those in
        flight now."""
        with self._lock:
            done, self._done = dict(self._done), Counts()
            dead, self._dead_lettered = self._dead_lettered, 0
            return done, self._in_flight, dead

    def line(self, interval_s: float) -> str:
        done, in_flight, dead = self.take()
        outcomes = [*TERMINAL_OUTCOMES, *sorted(set(done) - set(TERMINAL_OUTCOMES))]
        counts = ", ".join(f"{done.get(outcome, 0)} {outcome}" for outcome in outcomes)
        return (
            f"last {interval_s:g}s: {counts}; {in_flight} in flight; "
            f"{dead} dead-lettered"
        )


class _Counting:
    """An instrument's ``add`` that is also counted."""

    def __init__(
        self, inner: Counter | UpDownCounter, count: Callable[[float, Attributes], None]
    ) -> None:
        self._inner = inner
        self._count = count

    def add(
        self, amount: float, attributes: Attributes = None, context: Context | None = None
    ) -> None:
        self._count(amount, attributes)
        self._inner.add(amount, attributes, context)


class CountedCounter(_Counting, Counter):
    """A counter whose every ``add`` is also counted."""


class CountedUpDownCounter(_Counting, UpDownCounter):
    """An up-down counter whose every ``add`` is also counted."""


def log_every(tally: Tally, interval_s: float, stop: threading.Event) -> None:
    """Log the counts every ``interval_s`` until ``stop`` is set (the body of a thread)."""
    while not stop.wait(interval_s):
        log.info("stats: %s", tally.line(interval_s))
