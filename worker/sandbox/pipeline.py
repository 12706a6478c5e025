"""The steps every vendor API call passes, shared by the vendor modules."""

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from worker.sandbox.answers import Answer, Vendor, to_response, vendor_error
from worker.sandbox.hostile import Call, HostileFault
from worker.sandbox.state import SandboxState
from worker.sandbox.wire import send_wire

Produce = Callable[[Request], Awaitable[Answer]]
Endpoint = Callable[[Request], Awaitable[Response]]
# A vendor operation proper: path parameters and body bytes in, answer out.
Operation = Callable[[Mapping[str, str], bytes], Answer]


def endpoint(
    state: SandboxState, route: str, produce: Produce, *, with_request_id: bool
) -> Endpoint:
    """A Starlette endpoint answering with `produce` and counting the call as `route`, or
    with the hostile fault scripted for it."""

    async def answer(request: Request) -> Response:
        fault = state.pick_hostile(route, request.scope["path"])
        if fault is not None:
            return await _serve_hostile(state, route, fault, request, produce)
        result = await produce(request)
        state.record(route, result.status)
        return to_response(result, with_request_id=with_request_id)

    return answer


async def _serve_hostile(
    state: SandboxState, route: str, fault: HostileFault, request: Request, produce: Produce
) -> Response:
    """Write `fault`'s bytes on the request's connection, and close it.

    The response returned afterwards is never sent: uvicorn drops it, the connection being
    gone (see `connections`).
    """
    channel = state.connections.channel_for(request.scope.get("client"))
    if channel is None:
        return PlainTextResponse("Hostile faults are served by the sandbox's own server.", 501)
    answer = await produce(request) if fault.carries_out else None
    scope = request.scope
    query = scope["query_string"]
    target = scope["raw_path"] + (b"?" + query if query else b"")
    call = Call(route, request.method, target, tuple(request.headers.raw), await request.body())
    state.record_hostile(route, fault.kind)
    await send_wire(channel, fault.wire(call, answer))
    return Response(status_code=204)


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
