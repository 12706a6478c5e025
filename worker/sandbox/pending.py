"""ESET's cache of 202'd requests, collected by repeating the request with `response-id`."""

import enum
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from worker.sandbox.answers import Answer


@dataclass(frozen=True, slots=True)
class RequestKey:
    """What makes a collect "the identical request" (the token may differ)."""

    method: str
    path: str
    query: bytes
    body: bytes


class CollectOutcome(enum.Enum):
    READY = "ready"  # the cached answer; the entry is gone
    PENDING = "pending"  # not ready yet: answer 202 again
    MISMATCH = "mismatch"  # method, path, query or body differ from the cached request
    UNKNOWN = "unknown"  # never issued, already collected, or dropped after the cache TTL
    TIMED_OUT = "timed_out"  # pending past the collect timeout; the entry is gone


@dataclass(frozen=True, slots=True)
class Collected:
    outcome: CollectOutcome
    answer: Answer | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    key: RequestKey
    accepted_at: float
    ready_at: float | None  # None: the answer never becomes ready (it will time out)
    expires_at: float
    answer: Answer | None


class PendingCache:
    """Cached 202'd requests by response-id; not thread-safe (the state locks it)."""

    def __init__(self, pending_s: float, collect_timeout_s: float, cache_ttl_s: float) -> None:
        self._pending_s = pending_s
        self._collect_timeout_s = collect_timeout_s
        self._cache_ttl_s = cache_ttl_s
        # Every entry lives equally long, so insertion order is expiry order.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    @property
    def answers_in_time(self) -> bool:
        """False when a 202'd request always times out, so it must not be executed at all."""
        return self._pending_s < self._collect_timeout_s

    def accept(self, key: RequestKey, answer: Answer | None, now: float) -> str:
        """Cache `answer` to `key`, ready after `pending_s`; returns the new response-id."""
        self._prune(now)
        ready_at = now + self._pending_s if answer is not None else None
        settled_at = ready_at if ready_at is not None else now + self._collect_timeout_s
        response_id = str(uuid.uuid4())
        entry = _Entry(key, now, ready_at, settled_at + self._cache_ttl_s, answer)
        self._entries[response_id] = entry
        return response_id

    def collect(self, response_id: str, key: RequestKey, now: float) -> Collected:
        """What a collect of `response_id` with request `key` gets at `now`."""
        entry = self._entries.get(response_id)
        if entry is None or entry.expires_at <= now:
            self._entries.pop(response_id, None)
            return Collected(CollectOutcome.UNKNOWN)
        if entry.key != key:
            return Collected(CollectOutcome.MISMATCH)
        if entry.ready_at is None or now < entry.ready_at:
            if now - entry.accepted_at < self._collect_timeout_s:
                return Collected(CollectOutcome.PENDING)
            del self._entries[response_id]
            return Collected(CollectOutcome.TIMED_OUT)
        del self._entries[response_id]
        return Collected(CollectOutcome.READY, entry.answer)

    def _prune(self, now: float) -> None:
        while self._entries:
            response_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                return
            del self._entries[response_id]
