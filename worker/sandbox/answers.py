"""What a sandbox endpoint answers, and each vendor's error body.

Endpoints build an `Answer` (a plain value) rather than a Starlette response, so an ESET
answer can be cached behind a 202 and replayed to the collect unchanged.
"""

import json
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from starlette.responses import Response

Vendor = Literal["eset", "fylr", "spaaza"]


@dataclass(frozen=True, slots=True)
class Answer:
    """Status, JSON body bytes (may be empty) and extra headers of one response."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def json_answer(status: int, payload: object) -> Answer:
    """An answer whose body is `payload` as compact JSON."""
    return Answer(status, json.dumps(payload, separators=(",", ":")).encode())


def to_response(answer: Answer, *, with_request_id: bool) -> Response:
    """The Starlette response for `answer`; ESET stamps every response with a request-id."""
    headers = dict(answer.headers)
    if with_request_id:
        headers["request-id"] = str(uuid.uuid4())
    media_type = "application/json" if answer.body else None
    return Response(answer.body, answer.status, headers, media_type)


# ESET answers through a gRPC gateway: google.rpc.Status carries the gRPC code, not HTTP's.
_GRPC_CODES = MappingProxyType(
    {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 415: 3, 429: 8, 500: 13, 502: 14, 503: 14, 504: 4}
)
# Wording from the ESET Connect pages' response table.
_ESET_MESSAGES = MappingProxyType(
    {
        400: "Validation error. Invalid argument provided.",
        401: "Token has expired or is invalid.",
        403: "Access denied. Check permissions.",
        404: "Requested resource not found.",
        429: "Rate limit reached. Try again later.",
        500: "Internal server failure. Try again later.",
        502: "Internal server failure. Try again later.",
        503: "Environment under maintenance. Try again later.",
        504: "Action took too long; timeout reached",
    }
)
# fylr publishes stable codes for 401/403/404 only; the others are this sandbox's inventions.
_FYLR_CODES = MappingProxyType(
    {
        400: "BadRequest",
        401: "UserRequired",
        404: "ObjectNotFound",
        405: "MethodNotAllowed",
        429: "TooManyRequests",
        500: "InternalServerError",
        502: "BadGateway",
        503: "ServiceUnavailable",
        504: "GatewayTimeout",
    }
)
# Spaaza publishes no error body; this shape follows its other APIs' `errors` list.
_SPAAZA_NAMES = MappingProxyType(
    {
        400: "invalid_parameters",
        401: "no_valid_session",
        404: "task_not_found",
        405: "method_not_allowed",
        429: "rate_limited",
        500: "internal_error",
        502: "bad_gateway",
        503: "service_unavailable",
        504: "gateway_timeout",
    }
)


def eset_error(status: int, message: str | None = None) -> Answer:
    """A google.rpc.Status body, as ESET Connect answers errors."""
    text = message or _ESET_MESSAGES.get(status, "Error.")
    return json_answer(status, {"code": _GRPC_CODES.get(status, 2), "message": text, "details": []})


def fylr_error(status: int, message: str, code: str | None = None) -> Answer:
    """fylr's `{code, error, parameters, realm, statuscode}` error body."""
    payload = {
        "code": code or _FYLR_CODES.get(status, "Error"),
        "error": message,
        "parameters": {},
        "realm": "api",
        "statuscode": status,
    }
    return json_answer(status, payload)


def spaaza_error(status: int, description: str, name: str | None = None) -> Answer:
    """An `errors` list with one entry (Spaaza documents no error body)."""
    entry = {
        "code": status,
        "name": name or _SPAAZA_NAMES.get(status, "error"),
        "description": description,
    }
    return json_answer(status, {"errors": [entry]})


def oauth_error(status: int, error: str, description: str) -> Answer:
    """RFC 6749 §5.2 token-endpoint error."""
    return json_answer(status, {"error": error, "error_description": description})


def vendor_error(vendor: Vendor, status: int, message: str | None = None) -> Answer:
    """The error body `vendor` sends for `status`, for faults and unmatched routes."""
    text = message or f"Sandbox fault: HTTP {status}."
    if vendor == "eset":
        return eset_error(status, message)
    if vendor == "fylr":
        return fylr_error(status, text)
    return spaaza_error(status, text)
