"""One vendor request, sent the way the vendors document: authenticated, within the rate
limit, retried with back-off, and for ESET followed through its 202 "request cached" answer.

ESET answers a slow call with ``202`` and a ``response-id``; the result is collected by
sending the *identical* request again with a ``response-id`` header until it answers
200. A mutation that got a 202 is never sent again without ``response-id``: the vendor
may already have done it, so a lost cache (404) or a vendor timeout (504) during the
collect fails the command as ``result_lost`` instead of risking the action twice. A read
(GET) is simply asked again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from opentelemetry import trace

from schemas.events import ErrorCode, VendorName
from worker.errors import PermanentFailure, TransientFailure, VendorThrottled
from worker.ops.telemetry import Telemetry
from worker.replies import VendorReply, VendorRequest, retry_after_s
from worker.vendors.retries import RetryPolicy
from worker.vendors.transport import TOO_LARGE_HEADER, VendorClient

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# While collecting, 504 means "ESET gave up waiting": not a pause to retry through.
COLLECT_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503})
MAX_ERROR_TEXT = 300


@dataclass
class CallBudget:
    """Per-command bookkeeping shared by every request the command makes."""

    deadline: float  # a RetryPolicy.clock reading; no new call starts after it
    retry_deadline: float | None = None  # no back-off retry after it (default: deadline)
    attempts: int = 0
    prior_attempts: int = 0  # calls made for the command by earlier deliveries
    collects: int = 0
    statuses: list[int] = field(default_factory=list)
    vendor_time_s: float = 0.0  # time spent waiting on vendor HTTP answers
    # Called once, just before a mutation first goes out (the handler marks its claim):
    # after the rate-limit slot, and before the request's body is read. A merged batch
    # delete (coalescing.py) settles its members, and so fills in its body, in it.
    before_first_mutation: Callable[[], Awaitable[None]] | None = None
    # Called with the response-id when a mutation is answered 202, before it is collected
    # (the handler keeps it with its claim, so a worker taking over collects it too). A
    # merged batch delete has none: its request can not be rebuilt from one command.
    on_accepted: Callable[[str], Awaitable[None]] | None = None
    accepted_as: str | None = None  # the response-id of a 202'd mutation being collected

    @property
    def may_have_acted_before(self) -> bool:
        """Whether the vendor may have acted on an earlier call of this command whose
        answer did not come back as a refusal (a retry follows only a transient failure)."""
        return self.attempts > 1 or self.prior_attempts > 0

    async def mark_first_mutation(self) -> None:
        """Run ``before_first_mutation``, once: later sends (retries, collects) do not."""
        mark, self.before_first_mutation = self.before_first_mutation, None
        if mark is not None:
            await mark()


class Auth(Protocol):
    """Supplies the Authorization header; told when the vendor rejected it."""

    async def authorization(self) -> str: ...

    def invalidate(self, rejected: str) -> None: ...


class RateSlot(Protocol):
    """Waits until the vendor account may be called once more."""

    async def acquire(self) -> None: ...

    async def admit(self) -> str: ...

    async def answered(self, send: str) -> None: ...


@dataclass(frozen=True)
class VendorHttp:
    """Sends requests for one vendor account."""

    client: VendorClient
    auth: Auth
    rate_slot: RateSlot
    policy: RetryPolicy
    telemetry: Telemetry
    collect_interval_s: float
    follows_202: bool = False  # ESET: a 202 is collected with its response-id

    async def call(self, request: VendorRequest, budget: CallBudget) -> VendorReply:
        """The final 2xx answer; raises a :class:`~worker.errors.RelayError` otherwise."""
        reply = await self._send_with_retries(request, budget, response_id=None)
        if reply.status == 202 and self.follows_202 and reply.response_id:
            if request.is_mutation:
                budget.accepted_as = reply.response_id
                if budget.on_accepted is not None:
                    await budget.on_accepted(reply.response_id)
            return await self.collect(request, reply.response_id, budget)
        if reply.status >= 400:
            raise refused(reply)
        return reply

    async def collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply:
        """The final 2xx answer to a request ESET accepted with 202 as ``response_id``
        (also one accepted by a worker that died before collecting it)."""
        reply = await self._collect(request, response_id, budget)
        if reply.status >= 400:
            raise refused(reply)
        return reply

    async def _send_with_retries(
        self, request: VendorRequest, budget: CallBudget, response_id: str | None
    ) -> VendorReply:
        reply: VendorReply | None = None
        # A collect may wait out the vendor as long as the command may; the back-off of
        # a failing call stops earlier when delayed retries (delay queues) take over.
        deadline = budget.deadline
        if response_id is None and budget.retry_deadline is not None:
            deadline = budget.retry_deadline
        async for attempt in self.policy.retrying(deadline):
            with attempt:
                if response_id is None:
                    budget.attempts += 1
                    self.telemetry.instruments.attempts.add(1, {"relay.vendor": request.vendor})
                else:
                    budget.collects += 1
                reply = await self._send_once(request, response_id, budget)
                budget.statuses.append(reply.status)
                collecting = response_id is not None
                retryable = COLLECT_RETRYABLE_STATUSES if collecting else RETRYABLE_STATUSES
                if reply.status in retryable:
                    raise transient(reply)
        assert reply is not None  # tenacity re-raises when no attempt succeeded
        return reply

    async def _send_once(
        self, request: VendorRequest, response_id: str | None, budget: CallBudget
    ) -> VendorReply:
        authorization = await self.auth.authorization()
        response = await self._http(request, authorization, response_id, budget)
        if response.status_code == 401:
            # Tokens can be revoked or expire early: renew once, then take the answer.
            self.auth.invalidate(authorization)
            authorization = await self.auth.authorization()
            response = await self._http(request, authorization, response_id, budget)
        return as_reply(request.vendor, response, response_id)

    async def _http(
        self,
        request: VendorRequest,
        authorization: str,
        response_id: str | None,
        budget: CallBudget,
    ) -> httpx.Response:
        """One HTTP exchange, as a CLIENT span, after a rate-limit slot."""
        metrics = self.telemetry.instruments
        headers = {"Authorization": authorization}
        if response_id is not None:
            headers["response-id"] = response_id
        waited_from = time.monotonic()
        await self.rate_slot.acquire()
        if request.is_mutation:
            await budget.mark_first_mutation()
        # The vendor counts arrivals in a sliding window: what was awaited since the slot
        # (the mark, a loaded loop) must not bunch calls up, so the last word is the
        # window gate's, and nothing is awaited between it and the send.
        send = await self.rate_slot.admit()
        sent_at = time.monotonic()
        metrics.rate_limit_wait.record(sent_at - waited_from, {"relay.vendor": request.vendor})
        with self.telemetry.tracer.start_as_current_span(
            f"{request.method} {request.route}",
            kind=trace.SpanKind.CLIENT,
            attributes=_span_attributes(request, response_id, budget),
        ) as span:
            try:
                response = await self.client.request(
                    request.method, request.url, json=request.json, headers=headers
                )
            except httpx.TransportError as error:
                span.set_attribute("error.type", type(error).__name__)
                raise TransientFailure(
                    ErrorCode.VENDOR_UNAVAILABLE,
                    f"{request.vendor} could not be reached: {type(error).__name__}",
                ) from error
            finally:
                budget.vendor_time_s += time.monotonic() - sent_at
                await self.rate_slot.answered(send)
            _record_response(span, response)
        status = {"relay.vendor": request.vendor, "http.response.status_code": response.status_code}
        metrics.vendor_responses.add(1, status)
        return response

    async def _collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply:
        while True:
            if self.policy.clock() + self.collect_interval_s >= budget.deadline:
                raise PermanentFailure(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"{request.vendor} had not finished by the command's deadline; its answer "
                    f"stays cached for a while under response-id {response_id}",
                    vendor_status=202,
                )
            await self.policy.sleep(self.collect_interval_s)
            try:
                reply = await self._send_with_retries(request, budget, response_id)
            except TransientFailure:
                # The answer stays cached at the vendor: keep collecting until the deadline
                # rather than give up into a retry that would send the request again.
                continue
            if reply.status == 202:
                continue
            if reply.status in (404, 504):
                return await self._after_lost_cache(request, reply, budget)
            return replace(reply, response_id=response_id)

    async def _after_lost_cache(
        self, request: VendorRequest, reply: VendorReply, budget: CallBudget
    ) -> VendorReply:
        if request.is_mutation:
            raise PermanentFailure(
                ErrorCode.RESULT_LOST,
                f"{request.vendor} accepted the request (202) but its answer could not be "
                f"collected (status {reply.status}); it may or may not have taken effect, "
                "so it was not sent again: check before re-sending",
                vendor_status=reply.status,
                reply=reply,
            )
        return await self.call(request, budget)  # a read is safe to ask again


def _span_attributes(
    request: VendorRequest, response_id: str | None, budget: CallBudget
) -> dict[str, str | int | bool]:
    url = urlsplit(request.url)
    attributes: dict[str, str | int | bool] = {
        "http.request.method": request.method,
        "url.full": request.url,
        "url.template": request.route,
        "server.address": url.hostname or "",
        "relay.vendor": request.vendor,
        "relay.collect": response_id is not None,
    }
    if url.port:
        attributes["server.port"] = url.port
    if response_id is None and budget.attempts > 1:
        attributes["http.request.resend_count"] = budget.attempts - 1
    if response_id is not None:
        attributes["relay.vendor.response_id"] = response_id
    return attributes


def _record_response(span: trace.Span, response: httpx.Response) -> None:
    span.set_attribute("http.response.status_code", response.status_code)
    request_id = response.headers.get("request-id")
    if request_id:
        span.set_attribute("relay.vendor.request_id", request_id)
    if response.status_code >= 400:
        span.set_attribute("error.type", str(response.status_code))
        span.set_status(trace.StatusCode.ERROR)


def as_reply(vendor: VendorName, response: httpx.Response, response_id: str | None) -> VendorReply:
    return VendorReply(
        vendor=vendor,
        status=response.status_code,
        body=_json_or_text(response),
        request_id=response.headers.get("request-id"),
        response_id=response.headers.get("response-id", response_id),
        retry_after_s=retry_after_s(response.headers.get("retry-after")),
    )


def _json_or_text(response: httpx.Response) -> Any:
    too_large = response.headers.get(TOO_LARGE_HEADER)
    if too_large:
        return f"(the answer's body was over {too_large} bytes and was not kept)"
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text[:MAX_ERROR_TEXT]


def transient(reply: VendorReply) -> TransientFailure:
    message = f"{reply.vendor} answered {reply.status}{_detail(reply)}"
    if reply.status == 429:
        return VendorThrottled(message, retry_after_s=reply.retry_after_s, reply=reply)
    return TransientFailure(
        ErrorCode.VENDOR_UNAVAILABLE, message, vendor_status=reply.status, reply=reply
    )


def refused(reply: VendorReply) -> PermanentFailure:
    code = ErrorCode.VENDOR_AUTH_FAILED if reply.status in (401, 403) else ErrorCode.VENDOR_REJECTED
    return PermanentFailure(
        code,
        f"{reply.vendor} refused the request with {reply.status}{_detail(reply)}",
        vendor_status=reply.status,
        reply=reply,
    )


def _detail(reply: VendorReply) -> str:
    body = reply.body
    if isinstance(body, dict):
        text = body.get("message") or body.get("description") or body.get("error")
        if text:
            return f": {str(text)[:MAX_ERROR_TEXT]}"
    return ""
