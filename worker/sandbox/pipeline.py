"""The steps every vendor API call passes, shared by the vendor modules."""

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from worker.sandbox.answers import Answer, Vendor, to_response, vendor_error
from worker.sandbox.state import SandboxState

Produce = Callable[[Request], Awaitable[Answer]]
Endpoint = Callable[[Request], Awaitable[Response]]
# A vendor operation proper: path parameters and body bytes in, answer out.
Operation = Callable[[Mapping[str, str], bytes], Answer]


def endpoint(
    state: SandboxState, route: str, produce: Produce, *, with_request_id: bool
) -> Endpoint:
    """A Starlette endpoint answering with `produce` and counting the call as `route`."""

    async def answer(request: Request) -> Response:
        result = await produce(request)
        state.record(route, result.status)
        return to_response(result, with_request_id=with_request_id)

    return answer


async def gate(state: SandboxState, vendor: Vendor, request: Request) -> Answer | None:
    """Latency, authentication, rate limit: the refusal to send, or None to go on."""
    latency_ms = state.faults.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)
    account = state.account_for(vendor, request.headers.get("authorization"))
    if account is None:
        return unauthorized(vendor)
    if not state.admit(vendor, account):
        return vendor_error(vendor, 429, "Rate limit reached. Try again later.")
    return None


async def call(
    state: SandboxState, vendor: Vendor, request: Request, operation: Operation
) -> Answer:
    """A vendor API call without ESET's 202 path: gate, fault draw, then the operation."""
    refusal = await gate(state, vendor, request)
    if refusal is not None:
        return refusal
    fault = state.pick_fault(request.scope["path"], pending_allowed=False)
    if fault is not None:
        if fault.answer_lost:
            operation(request.path_params, await request.body())
        return vendor_error(vendor, fault.status)
    return operation(request.path_params, await request.body())


def unauthorized(vendor: Vendor) -> Answer:
    """The vendor's 401 for a missing, unknown, expired or revoked credential."""
    if vendor == "fylr":
        return vendor_error(vendor, 401, "A valid user session is required.")
    if vendor == "spaaza":
        return vendor_error(vendor, 401, "No valid authentication provided.")
    return vendor_error(vendor, 401)


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body parsed as a JSON object, or None if it is not one."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


async def form_fields(request: Request) -> dict[str, str] | None:
    """A form-encoded body's fields (last value wins), or None for another content type."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    # Parsed by hand: Starlette's request.form() would need python-multipart.
    pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return dict(pairs)
