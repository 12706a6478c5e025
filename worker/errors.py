"""Errors, sorted by what the worker must do with the command.

    RelayError
    ├── CommandRejected      nothing was sent; the command must change → ``rejected``
    ├── PermanentFailure     the vendor refused for good, or the answer is lost → ``failed``
    ├── TransientFailure     may work later: retry, then ``failed`` (retryable)
    │   └── VendorThrottled  429, with the vendor's Retry-After when it sent one
    └── StoreUnavailable     a store (idempotency, rate limit) does not answer: the command
                             waits, or goes back to the queue; never an outcome

Each carries the contract's :class:`~schemas.events.ErrorCode` and a message that says what
happened or what to fix. Foreign errors are wrapped at the boundary with ``raise … from e``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.events import ErrorCode, ErrorInfo

if TYPE_CHECKING:
    from worker.replies import VendorReply


class RelayError(Exception):
    """Root of every error the worker raises on purpose."""

    retryable = False

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        vendor_status: int | None = None,
        reply: VendorReply | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.vendor_status = vendor_status
        self.reply = reply  # the vendor's answer that caused it, for the event

    def info(self) -> ErrorInfo:
        """The ``error`` object of the result event."""
        return ErrorInfo(
            code=self.code,
            message=self.message,
            retryable=self.retryable,
            vendor_status=self.vendor_status,
        )


class CommandRejected(RelayError):
    """Raised when a command is not acceptable as sent: schema, tenant, region, deadline, key."""


class PermanentFailure(RelayError):
    """Raised when the vendor refused for good (4xx) or a cached answer can not be collected."""


class TransientFailure(RelayError):
    """Raised when a call failed in a way that may pass: transport error, 5xx, 429."""

    retryable = True


class VendorThrottled(TransientFailure):
    """Raised on 429; ``retry_after_s`` is the vendor's ``Retry-After`` when it sent one."""

    def __init__(
        self, message: str, retry_after_s: float | None, reply: VendorReply | None = None
    ) -> None:
        super().__init__(ErrorCode.VENDOR_UNAVAILABLE, message, vendor_status=429, reply=reply)
        self.retry_after_s = retry_after_s


class StoreUnavailable(RelayError):
    """Raised when the idempotency or rate-limit store can not be reached; the command is
    held until it answers (and requeued if that takes too long), never failed for it."""

    def __init__(self, store: str, error: BaseException) -> None:
        super().__init__(
            ErrorCode.INTERNAL_ERROR, f"the {store} store is unreachable: {type(error).__name__}"
        )
        self.store = store


class Withheld(Exception):
    """Raised by a vendor sender when its caller withheld a mutation's go-ahead (the
    handler does when its claim on the key was lost): the request was not sent."""
