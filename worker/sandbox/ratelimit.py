"""Per-account sliding-window call limits, as vendors enforce them."""

from collections import deque


class SlidingWindowLimiter:
    """At most `limit` admitted calls per account in any `window_s`; not thread-safe.

    Refused calls are not counted, so a client that backs off gets through again once
    its own earlier calls leave the window.
    """

    def __init__(self, limit: int | None, window_s: float = 1.0) -> None:
        self._limit = limit
        self._window_s = window_s
        self._calls: dict[str, deque[float]] = {}

    def admit(self, account: str, now: float) -> bool:
        """Count one call of `account` at `now`; False if it is over the limit."""
        if self._limit is None:
            return True
        calls = self._calls.setdefault(account, deque())
        while calls and calls[0] <= now - self._window_s:
            calls.popleft()
        if len(calls) >= self._limit:
            return False
        calls.append(now)
        return True
