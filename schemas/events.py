"""Result events, contract version 1: what the worker publishes for each command.

A CloudEvents 1.0 event in structured JSON mode whose ``data`` is a :class:`ResultData`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, Field

from schemas._base import ContractModel

Outcome = Literal["succeeded", "failed", "rejected"]
VendorName = Literal["eset", "fylr", "spaaza"]

EVENT_SOURCE = "command-relay"
EVENT_CONTENT_TYPE = "application/cloudevents+json"


class ErrorCode(StrEnum):
    """Why a command did not succeed. Stable: playbooks branch on these."""

    # rejected: nothing was sent to a vendor
    INVALID_JSON = "invalid_json"
    INVALID_COMMAND = "invalid_command"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_TENANT = "unknown_tenant"
    VENDOR_NOT_CONFIGURED = "vendor_not_configured"
    REGION_NOT_SUPPORTED = "region_not_supported"
    DEADLINE_PASSED = "deadline_passed"
    IDEMPOTENCY_KEY_CONFLICT = "idempotency_key_conflict"
    FORBIDDEN_TENANT = "forbidden_tenant"  # its publisher (AMQP user) may not act for the tenant
    # failed: the vendor was called (or would have been) and the work did not happen
    VENDOR_REJECTED = "vendor_rejected"
    VENDOR_AUTH_FAILED = "vendor_auth_failed"
    VENDOR_UNAVAILABLE = "vendor_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    RESULT_LOST = "result_lost"
    DELIVERY_LIMIT = "delivery_limit"
    INTERNAL_ERROR = "internal_error"


class ErrorInfo(ContractModel):
    code: ErrorCode
    message: str
    retryable: bool = False
    vendor_status: int | None = None


class VendorAnswer(ContractModel):
    """The vendor's final answer; for a 202 the collected one."""

    name: VendorName
    status: int | None = None
    request_id: str | None = None
    response_id: str | None = None
    body: Any = None


class ResultData(ContractModel):
    command_id: str
    idempotency_key: str | None = None
    type: str | None = Field(default=None, description="The command type, when it had one.")
    tenant: str | None = None
    outcome: Outcome
    replayed: bool = False
    attempts: int = Field(default=0, ge=0, description="Vendor calls made, not counting collects.")
    started_at: AwareDatetime
    finished_at: AwareDatetime
    vendor: VendorAnswer | None = None
    error: ErrorInfo | None = None
    warnings: tuple[str, ...] = Field(
        default=(),
        description="What the worker did differently from what the message asked, and why "
        "(e.g. a reply_to that is not a reply queue was ignored).",
    )


class ResultEvent(ContractModel):
    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str = EVENT_SOURCE
    type: str = Field(description="relay.<command type>.<outcome>")
    subject: str = Field(description="The command id.")
    time: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: Literal["application/json"] = "application/json"
    data: ResultData

    @classmethod
    def for_result(cls, data: ResultData) -> ResultEvent:
        return cls(
            type=f"relay.{data.type or 'unknown'}.{data.outcome}",
            subject=data.command_id,
            data=data,
        )

    @property
    def routing_key(self) -> str:
        """``<type>.<outcome>`` on the events exchange."""
        return f"{self.data.type or 'unknown'}.{self.data.outcome}"

    def with_warning(self, warning: str) -> ResultEvent:
        """The same event, noting how this delivery of it differs from what was asked."""
        data = self.data.model_copy(update={"warnings": (*self.data.warnings, warning)})
        return self.model_copy(update={"data": data})

    def as_replay(self) -> ResultEvent:
        """The stored event sent again: same data, marked replayed, a new event id."""
        data = self.data.model_copy(update={"replayed": True})
        return self.model_copy(
            update={"data": data, "id": str(uuid.uuid4()), "time": datetime.now(UTC)}
        )
