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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from opentelemetry import trace
from pydantic_core import from_json

from schemas.events import ErrorCode, VendorName
from worker.errors import (
    PermanentFailure,
    RelayError,
    TransientFailure,
    VendorThrottled,
    Withheld,
)
from worker.ops.telemetry import Telemetry
from worker.redaction import Redactor
from worker.replies import (
    VendorReply,
    VendorRequest,
    nested_deeper_than,
    retry_after_s,
    usable_id,
)
from worker.vendors.retries import RetryPolicy
from worker.vendors.transport import TOO_LARGE_HEADER, VendorClient, transport_failure

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BODY_DEPTH = 64  # the deepest answer body kept: events are stored and published as JSON
# While collecting, 504 means "ESET gave up waiting": not a pause to retry through.
COLLECT_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503})
MAX_ERROR_TEXT = 300


@dataclass
class CallBudget:
    """What one command may spend on its vendor calls, and what they cost so far (its
    event reports the cost, a failure's too: so it is kept here rather than returned)."""

    deadline: float  # a RetryPolicy.clock reading; no new call starts after it
    retry_deadline: float | None = None  # no back-off retry after it (default: deadline)
    attempts: int = 0
    prior_attempts: int = 0  # calls made for the command by earlier deliveries
    collects: int = 0
    statuses: list[int] = field(default_factory=list)
    vendor_time_s: float = 0.0  # time spent waiting on vendor HTTP answers

    @property
    def retry_until(self) -> float:
        return self.deadline if self.retry_deadline is None else self.retry_deadline

    @property
    def may_have_acted_before(self) -> bool:
        """Whether the vendor may have acted on an earlier call of this command whose
        answer did not come back as a refusal (a retry follows only a transient failure)."""
        return self.attempts > 1 or self.prior_attempts > 0


class Marks(Protocol):
    """The caller's say over a mutation (the handler keeps both marks with its claim, so
    a worker taking the key over knows what happened)."""

    async def sending(self) -> bool:
        """Asked before each send of a mutation, after its rate slot and before its body
        is read; False withholds it. (A merged batch delete settles its members here.)"""
        ...

    async def accepted(self, response_id: str) -> bool:
        """Told that ESET accepted the mutation (202) as ``response_id``, before it is
        collected; False: stop, the answer is no longer this caller's to collect."""
        ...


class GoAhead:
    """Marks for a caller that keeps no claim (reads, tests): always go ahead."""

    async def sending(self) -> bool:
        return True

    async def accepted(self, response_id: str) -> bool:
        return True


GO_AHEAD = GoAhead()


class Send(Protocol):
    """A :class:`Sender`, or what wraps one (the batch-delete coalescer)."""

    async def send(
        self, request: VendorRequest, budget: CallBudget, marks: Marks = ...
    ) -> VendorReply: ...

    async def collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply: ...


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
class Sender:
    """Sends the requests of one vendor account: ``send`` (retried with back-off, a 202
    collected), ``collect`` (a 202 accepted earlier), each HTTP exchange in
    ``_exchange``."""

    client: VendorClient
    auth: Auth
    rate_slot: RateSlot
    policy: RetryPolicy
    telemetry: Telemetry
    collect_interval_s: float
    redactor: Redactor  # what a vendor answers is scrubbed of every known secret
    follows_202: bool = False  # ESET: a 202 is collected with its response-id

    async def send(
        self, request: VendorRequest, budget: CallBudget, marks: Marks = GO_AHEAD
    ) -> VendorReply:
        """The final 2xx answer; raises a :class:`~worker.errors.RelayError` otherwise
        (:class:`~worker.errors.Withheld` when ``marks`` said no)."""
        while True:
            reply: VendorReply | None = None
            # The back-off stops at the retry deadline, where delayed retries take over.
            async for attempt in self.policy.retrying(budget.retry_until):
                with attempt:
                    budget.attempts += 1
                    self.telemetry.instruments.attempts.add(1, {"relay.vendor": request.vendor})
                    reply = self._checked(request, await self._exchange(request, budget, marks))
            assert reply is not None  # tenacity re-raises when no attempt succeeded
            if not (reply.status == 202 and self.follows_202):
                break
            response_id = self._kept_202(request, reply)
            await self._keep_accepted(request, response_id, marks)
            collected = await self._collected(request, response_id, budget)
            if collected is not None:
                return collected
        if not is_success(reply.status):
            raise refused(reply)
        return reply

    def _checked(self, request: VendorRequest, reply: VendorReply) -> VendorReply:
        """The answer, with a success's body read as the call reads it; raises for a
        pause to retry through: 429, 5xx gateways, a read's 202 that can not be collected
        and a success that is not the answer the call returns (both simply asked again)."""
        if reply.status in RETRYABLE_STATUSES:
            raise transient(reply)
        if reply.status == 202 and self.follows_202:
            if reply.response_id is None and not request.is_mutation:
                raise TransientFailure(
                    ErrorCode.VENDOR_UNAVAILABLE,
                    f"{reply.vendor} answered 202 without a usable response-id to collect "
                    "the answer with",
                    vendor_status=202,
                    reply=reply,
                )
            return reply
        if is_success(reply.status) and request.body_of is not None:
            return replace(reply, body=request.body_of(reply.body))
        return reply

    def _kept_202(self, request: VendorRequest, reply: VendorReply) -> str:
        """The response-id of a mutation's 202; a 202 without one that can be sent back
        (missing, empty, odd characters) leaves the answer uncollectable: the vendor may
        have acted, so the mutation is not sent again and the command fails as lost."""
        if reply.response_id is not None:
            return reply.response_id
        raise PermanentFailure(
            ErrorCode.RESULT_LOST,
            f"{reply.vendor} accepted the request (202) but gave no usable response-id to "
            "collect its answer with; it may or may not have taken effect, so it was not "
            "sent again: check before re-sending",
            vendor_status=202,
            reply=reply,
        )

    async def collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply:
        """The final 2xx answer to a request ESET accepted with 202 as ``response_id``
        (one accepted by a worker that died before collecting it)."""
        collected = await self._collected(request, response_id, budget)
        if collected is None:  # a read's cached answer is gone: it is asked again
            return await self.send(request, budget)
        return collected

    async def _keep_accepted(
        self, request: VendorRequest, response_id: str, marks: Marks
    ) -> None:
        if not request.is_mutation:
            return  # a read is simply asked again if its answer is lost
        if not await marks.accepted(response_id):
            raise Withheld(f"{request.vendor} accepted {request.route} (202), but its answer "
                           "is no longer this worker's to collect")

    async def _collected(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply | None:
        """The answer ESET cached as ``response_id``, asked for with the identical request
        every ``collect_interval_s`` until the deadline; None when a read's was lost."""
        wait_s = self.collect_interval_s
        while True:
            if self.policy.clock() + wait_s >= budget.deadline:
                raise PermanentFailure(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"{request.vendor} had not finished by the command's deadline; its answer "
                    f"stays cached for a while under response-id {response_id}",
                    vendor_status=202,
                )
            await self.policy.sleep(wait_s)
            budget.collects += 1
            try:
                reply = await self._exchange(request, budget, GO_AHEAD, response_id)
            except TransientFailure:
                continue  # the vendor could not be reached: its answer stays cached
            # 202: still working. A pause (429, 5xx) is waited out, never resent: the
            # vendor may already have acted. 504 means ESET gave up waiting: lost.
            if reply.status == 202 or reply.status in COLLECT_RETRYABLE_STATUSES:
                wait_s = max(self.collect_interval_s, reply.retry_after_s or 0.0)
                continue
            if is_success(reply.status):
                return replace(self._checked(request, reply), response_id=response_id)
            # Lost (404), given up (504), refused or redirected: a mutation's answer is
            # gone and says nothing of whether it was done; a read is asked again.
            _fail_if_mutation(request, reply)
            if reply.status in (404, 504):
                return None
            raise refused(reply)

    async def _exchange(
        self,
        request: VendorRequest,
        budget: CallBudget,
        marks: Marks,
        response_id: str | None = None,
    ) -> VendorReply:
        """One answer: an HTTP exchange after a rate slot, as a CLIENT span. A 401 renews
        the token and asks once more: tokens can be revoked or expire early."""
        headers = {} if response_id is None else {"response-id": response_id}
        for renewed in (False, True):
            authorization = await self.auth.authorization()
            send = await self._admitted(request, marks)
            sent_at = time.monotonic()
            # Not the exception itself: its chain may quote what the vendor sent (a
            # header line aiohttp refused). The span gets the error's type and status.
            with self.telemetry.tracer.start_as_current_span(
                f"{request.method} {request.route}",
                kind=trace.SpanKind.CLIENT,
                attributes=_span_attributes(request, response_id, budget, self.redactor),
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await self.client.request(
                        request.method, request.url, json=request.json,
                        headers={**headers, "Authorization": authorization},
                    )
                except httpx.TransportError as error:
                    raise _unreachable(request, span, error) from error
                except Exception as error:  # named by its type only (see above)
                    span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                    raise
                finally:
                    budget.vendor_time_s += time.monotonic() - sent_at
                    await self.rate_slot.answered(send)
                _record_response(span, response, self.redactor)
            status = response.status_code
            self.telemetry.instruments.vendor_responses.add(
                1, {"relay.vendor": request.vendor, "http.response.status_code": status}
            )
            if response.status_code != 401 or renewed:
                break
            self.auth.invalidate(authorization)
        budget.statuses.append(response.status_code)
        return read_reply(request.vendor, response, response_id, self.redactor)

    async def _admitted(self, request: VendorRequest, marks: Marks) -> str:
        """The rate slot's go for one send, with the caller's for a mutation in between.
        The vendor counts arrivals in a sliding window: what was awaited since the slot
        (the mark, a loaded loop) must not bunch calls up, so the last word is the window
        gate's, and nothing is awaited between it and the send."""
        waited_from = time.monotonic()
        await self.rate_slot.acquire()
        if request.is_mutation and not await marks.sending():
            raise Withheld(f"{request.vendor} {request.route} was not sent: its claim is lost")
        send = await self.rate_slot.admit()
        self.telemetry.instruments.rate_limit_wait.record(
            time.monotonic() - waited_from, {"relay.vendor": request.vendor}
        )
        return send


def _fail_if_mutation(request: VendorRequest, reply: VendorReply) -> None:
    """A 202's cached answer is gone: a mutation fails, as it may have taken effect."""
    if request.is_mutation:
        raise PermanentFailure(
            ErrorCode.RESULT_LOST,
            f"{request.vendor} accepted the request (202) but its answer could not be "
            f"collected (status {reply.status}); it may or may not have taken effect, "
            "so it was not sent again: check before re-sending",
            vendor_status=reply.status,
            reply=reply,
        )


def _unreachable(
    request: VendorRequest, span: trace.Span, error: httpx.TransportError
) -> RelayError:
    """Transient, but for a refused certificate: that fails for good."""
    failure = transport_failure(request.vendor, error)
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(trace.StatusCode.ERROR, failure.message)
    return failure


def _span_attributes(
    request: VendorRequest, response_id: str | None, budget: CallBudget, redactor: Redactor
) -> dict[str, str | int | bool]:
    url = urlsplit(request.url)
    attributes: dict[str, str | int | bool] = {
        "http.request.method": request.method,
        "url.full": _without_credentials(request.url),
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
        attributes["relay.vendor.response_id"] = redactor.text(response_id)
    return attributes


def _without_credentials(url: str) -> str:
    """``url`` with the user and password it may carry (a ``base_url`` of
    ``https://user:pw@host``) replaced by ``REDACTED``, as the semantic conventions ask
    of ``url.full``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"REDACTED:REDACTED@{host}"))


def _record_response(span: trace.Span, response: httpx.Response, redactor: Redactor) -> None:
    span.set_attribute("http.response.status_code", response.status_code)
    request_id = usable_id(response.headers.get("request-id"))
    if request_id:
        span.set_attribute("relay.vendor.request_id", redactor.text(request_id))
    if not is_success(response.status_code):
        span.set_attribute("error.type", str(response.status_code))
        span.set_status(trace.StatusCode.ERROR)


def is_success(status: int) -> bool:
    """2xx: the vendor did it. A 3xx is never followed (it could lead to a host no
    setting named), so it is no success either."""
    return 200 <= status <= 299


def read_reply(
    vendor: VendorName, response: httpx.Response, response_id: str | None, redactor: Redactor
) -> VendorReply:
    """The answer as the worker keeps it: ids that can be sent back and shown (else
    None), the body parsed within bounds, and nothing in it that the worker knows as a
    secret (a vendor or proxy may echo the request, its Authorization header included)."""
    request_id = usable_id(response.headers.get("request-id"))
    return VendorReply(
        vendor=vendor,
        status=response.status_code,
        body=redactor.value(_body(response)),
        request_id=None if request_id is None else redactor.text(request_id),
        response_id=usable_id(response.headers.get("response-id")) or response_id,
        retry_after_s=retry_after_s(response.headers.get("retry-after")),
    )


def _body(response: httpx.Response) -> Any:
    """The body as JSON when it is JSON (nested at most :data:`MAX_BODY_DEPTH` levels),
    else a short text; or a note of why it was not kept."""
    too_large = response.headers.get(TOO_LARGE_HEADER)
    if too_large:
        return f"(the answer's body was over {too_large} bytes and was not kept)"
    content = response.content
    if not content:
        return None
    try:
        body = from_json(content, allow_inf_nan=False)
    except ValueError:  # not JSON, not UTF-8, or nested past the parser's own limit
        return content[:MAX_ERROR_TEXT].decode("utf-8", "replace")
    if nested_deeper_than(body, MAX_BODY_DEPTH):
        return f"(the answer's body nested deeper than {MAX_BODY_DEPTH} levels; not kept)"
    return body


def transient(reply: VendorReply) -> TransientFailure:
    message = f"{reply.vendor} answered {reply.status}{_detail(reply)}"
    if reply.status == 429:
        return VendorThrottled(message, retry_after_s=reply.retry_after_s, reply=reply)
    return TransientFailure(
        ErrorCode.VENDOR_UNAVAILABLE, message, vendor_status=reply.status, reply=reply
    )


def refused(reply: VendorReply) -> PermanentFailure:
    code = ErrorCode.VENDOR_AUTH_FAILED if reply.status in (401, 403) else ErrorCode.VENDOR_REJECTED
    what = "refused the request with"
    if 300 <= reply.status <= 399:
        what = "answered with a redirect, which is never followed (check the tenant's host):"
    elif not 400 <= reply.status <= 599:
        what = "answered with a status that is neither success nor error:"
    return PermanentFailure(
        code,
        f"{reply.vendor} {what} {reply.status}{_detail(reply)}",
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
