"""Per-account sliding-window call limits, as vendors enforce them."""

from collections import deque


class SlidingWindowLimiter:
    """At most `limit` admitted calls per account in any `window_s`; not thread-safe.

    Refused calls are not counted against the limit, so a client that backs off gets
    through again once its own earlier calls leave the window. They are counted as
    arrivals, though: :meth:`peaks` reports, per account, the most calls that arrived
    (admitted or refused) within any `window_s`, which is what a stricter vendor, one
    counting every call it receives, would have held against the client.
    """

    def __init__(self, limit: int | None, window_s: float = 1.0) -> None:
        self._limit = limit
        self._window_s = window_s
        self._calls: dict[str, deque[float]] = {}  # admitted, within the window
        self._arrivals: dict[str, deque[float]] = {}  # admitted or refused, within the window
        self._peaks: dict[str, int] = {}

    def admit(self, account: str, now: float) -> bool:
        """Count one call of `account` at `now`; False if it is over the limit."""
        self._arrive(account, now)
        if self._limit is None:
            return True
        calls = self._calls.setdefault(account, deque())
        self._evict(calls, now)
        if len(calls) >= self._limit:
            return False
        calls.append(now)
        return True

    def peaks(self) -> dict[str, int]:
        """Per account, the most calls that arrived within any sliding `window_s`."""
        return dict(self._peaks)

    def _arrive(self, account: str, now: float) -> None:
        arrivals = self._arrivals.setdefault(account, deque())
        self._evict(arrivals, now)
        arrivals.append(now)
        # The busiest window ends at some arrival: the one that just came in, or earlier.
        self._peaks[account] = max(self._peaks.get(account, 0), len(arrivals))

    def _evict(self, times: deque[float], now: float) -> None:
        """Drop the times that have left the window ``(now - window_s, now]``."""
        while times and times[0] <= now - self._window_s:
            times.popleft()
