"""What is sent to a vendor and what comes back: value types that the vendor clients,
the errors, the handler and the result events share (a leaf: it imports no worker
module)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.events import VendorName


@dataclass(frozen=True)
class VendorRequest:
    """What to send; ``route`` is the URL template, for logs and spans; ``body_of`` turns
    a success's body into the event's (and raises a retryable error when the answer is
    not what the call returns)."""

    vendor: VendorName
    method: str
    url: str
    route: str
    json: Any = None
    body_of: Callable[[Any], Any] | None = field(default=None, compare=False)

    @property
    def is_mutation(self) -> bool:
        return self.method != "GET"


@dataclass(frozen=True)
class VendorReply:
    """The vendor's answer, as the result event reports it."""

    vendor: VendorName
    status: int
    body: Any
    request_id: str | None = None
    response_id: str | None = None
    retry_after_s: float | None = None


MAX_RETRY_AFTER_S = 86_400.0  # a longer wait than a day is no wait worth following
MAX_ID_CHARS = 200  # a vendor's request-id or response-id


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (ASCII digits only:
    ``²`` is a digit to Python, not to HTTP) or an HTTP date, at most a day; None for
    anything else."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # int() of thousands of digits is refused by Python; no wait is that long anyway.
        return MAX_RETRY_AFTER_S if len(text) > 6 else min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
        wait_s = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, wait_s), MAX_RETRY_AFTER_S)


def usable_id(value: str | None) -> str | None:
    """A vendor's id header (``request-id``, ``response-id``) when it can be sent back and
    shown: 1 to 200 visible ASCII characters; None otherwise."""
    if value is None or not 0 < len(value) <= MAX_ID_CHARS:
        return None
    return value if all("!" <= char <= "~" for char in value) else None


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON containers nest more than ``limit`` levels (iterative: a hostile
    document can not exhaust the stack)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False
