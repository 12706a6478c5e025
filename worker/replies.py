"""What is sent to a vendor and what comes back: value types that the vendor clients,
the errors, the handler and the result events share (a leaf: it imports no worker
module)."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

from schemas.events import VendorName


@dataclass(frozen=True)
class VendorRequest:
    """What to send; ``route`` is the URL template, for logs and spans."""

    vendor: VendorName
    method: str
    url: str
    route: str
    json: Any = None

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


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
