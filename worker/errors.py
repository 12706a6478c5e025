"""Errors, sorted by what the worker must do with the command.

    RelayError
    ├── CommandRejected      nothing was sent; the command must change → ``rejected``
    ├── PermanentFailure     the vendor refused for good, or the answer is lost → ``failed``
    ├── TransientFailure     may work later: retry, then ``failed`` (retryable)
    │   └── VendorThrottled  429, with the vendor's Retry-After when it sent one
    ├── StoreUnavailable     a store (idempotency, rate limit) does not answer: the command
    │                        waits, or goes back to the queue; never an outcome
    └── Withheld             a mutation's claim was lost (another holder has the key):
                             nothing was sent, and this holder stops; never an outcome

Each carries the contract's :class:`~schemas.events.ErrorCode` and a message that says what
happened or what to fix. Foreign errors are wrapped at the boundary with ``raise … from e``.
"""

from __future__ import annotations

import ssl
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
        refusal = refused_certificate(error)
        message = f"the {store} store is unreachable: {type(error).__name__}"
        if refusal is not None:  # not an outage that passes: say what to fix
            message = (
                f"the {store} store's TLS certificate was refused ({certificate_reason(refusal)}); "
                + certificate_fix(refusal, STORE_URL_SETTINGS.get(store, "its URL"),
                                  "RELAY_REDIS_TLS_CA_FILE")
            )
        super().__init__(ErrorCode.INTERNAL_ERROR, message)
        self.store = store


class Withheld(RelayError):
    """Raised when a mutation's claim said no before it was sent (another holder has
    the key now, and does the work): nothing was sent, and this holder stops."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL_ERROR, message)


# The setting of each store's URL, by the name StoreUnavailable is given.
STORE_URL_SETTINGS = {"idempotency": "RELAY_IDEMPOTENCY_URL", "rate-limit": "RELAY_RATE_LIMIT_URL"}
# OpenSSL's verify codes of a certificate that names another host, or that has expired.
_NAME_MISMATCH_CODES = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_
_EXPIRED_CODE = 10  # X509_V_ERR_CERT_HAS_EXPIRED


def refused_certificate(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The refused certificate behind ``error`` (itself, or what it was raised from),
    or None: a server whose certificate was refused is not one to retry until it answers,
    but a setting (or a server) to fix."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        # aiohttp's wrapper is one too, but keeps OpenSSL's own as certificate_error.
        inner = getattr(current, "certificate_error", None)
        if isinstance(inner, ssl.SSLCertVerificationError):
            return inner
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def certificate_reason(refusal: ssl.SSLCertVerificationError) -> str:
    """Why OpenSSL refused it (``Hostname mismatch, certificate is not valid for 'x'``)."""
    reason = getattr(refusal, "verify_message", None) or refusal.reason or refusal
    return str(reason).rstrip(".")


def certificate_fix(
    refusal: ssl.SSLCertVerificationError, host_setting: str, ca_setting: str
) -> str:
    """What to do about a refused certificate: reach the server by a name its certificate
    holds, trust the CA that signed it (``ca_setting``), or renew it."""
    code = getattr(refusal, "verify_code", None)
    if code in _NAME_MISMATCH_CODES:
        return (
            f"name the server in {host_setting} as its certificate does (the name is always "
            "checked), or give it a certificate for the name used"
        )
    if code == _EXPIRED_CODE:
        return "renew the server's certificate"
    return f"set {ca_setting} to the PEM file of the CA that signed the server's certificate"
