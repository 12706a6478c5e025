"""Property-based fuzzing of vendor answers: whatever a vendor (or what sits between) sends
back, on every API call and token endpoint, the worker keeps its promises.

hypothesis drives a raw HTTP/1.1 server (``tests/hostile_http.py``) standing in for ESET
(token endpoint, the three API calls, the 202 collect), fylr (token, cancel, the
confirming task read) and Spaaza: any status from 100 to 999, any headers, any body, any
framing, any pace. The worker side runs in process with its real HTTP stack: the
:class:`~worker.handler.Handler` over a SQLite idempotency store, the tenant's accounts
pointing at that server, memory rate limits and a retry policy with small waits, all
built by one factory (:func:`make_worker`).

Each example sends one command through ``Handler.handle``, then the same command again (a
resend), and checks (:func:`check`):

- no exception escapes ``handle``; it returns one terminal event, which can be published;
- the outcome is honest: ``succeeded`` only on a final 2xx the server sent in full (for
  ESET, a 202 only once a collect answered 2xx), ``failed`` with a status the server sent,
  any 3xx is a ``vendor_rejected`` failure with that status, a 202 without a usable
  ``response-id`` is a failure that says so, and never ``internal_error``;
- at most one effect per key: a mutation is sent again only after an answer that says
  nothing happened (401, 408, 429) or a transient failure (5xx, no answer, a broken one),
  never more than the attempt cap allows, and the resend calls no vendor at all: it gets
  the stored event again, marked replayed;
- no known secret (the accounts' passwords and secrets, every token the server issued)
  in the events, the dead-letter header, the log lines or the spans, and no request
  carries a header a token or an id smuggled in;
- the deadline holds: ``handle`` returns within the command's deadline plus one HTTP
  timeout (plus :data:`ALLOWANCE_S` for a loaded machine).

An answer the client may have read either way (a head no two parsers read alike, a
slow answer the client may have given up on, bytes an earlier answer left on the
connection) only ever loosens what is expected of the outcome, never the rest.

``RELAY_VENDOR_FUZZ_EXAMPLES`` scales the number of generated examples (default 1.0).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from schemas.commands import Command, parse_command
from schemas.events import ErrorCode, ErrorInfo, Outcome, ResultEvent, VendorName
from worker.handler import Handler, replay_for
from worker.idempotency import SqliteStore
from worker.ops.logs import handler_for
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry
from worker.redaction import Redactor
from worker.replies import VendorReply
from worker.results import now, result_event
from worker.settings import EsetAccount, FylrAccount, Settings, SpaazaAccount, Tenant
from worker.settlement import Action, DeliveryInfo, Settlement
from worker.vendors import Vendors
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy

from .hostile_http import (
    AUTH,
    BEARER,
    HUGE_HEADER,
    INJECTED_HEADER,
    JSON_TYPE,
    MANY_HEADERS,
    Answer,
    Exchange,
    HostileVendor,
    Script,
    Timing,
    answers,
    bodies,
    header_lists,
    nested,
    plainly_formed,
    status_of,
    statuses,
    timings_hostile,
)

DEADLINE_S = 2.0  # each command's deadline, from when it is sent
HTTP_TIMEOUT_S = 1.0  # RELAY_HTTP_TIMEOUT_S
# What a loaded machine (2 shared cores) may add to a command's time: loop turns, the
# SQLite store's thread, the rate limit's pacing. Anything beyond it is the worker waiting.
ALLOWANCE_S = 1.5
BOUND_S = DEADLINE_S + HTTP_TIMEOUT_S + ALLOWANCE_S
MAX_ATTEMPTS = 3
MAX_BODY = 256 * 1024  # RELAY_MAX_RESPONSE_BYTES
DEAD_LETTER_MESSAGE_CHARS = 300  # x-relay-error-message: at most this much of error.message

# The accounts' secrets: each holds a marker no other text has, so a leak is found by it.
ESET_PASSWORD = f"eset-pw-{uuid.uuid4().hex}"
FYLR_CLIENT_SECRET = f"fylr-cs-{uuid.uuid4().hex}"
FYLR_PASSWORD = f"fylr-pw-{uuid.uuid4().hex}"
SPAAZA_SECRET = f"spaaza-ts-{uuid.uuid4().hex}"
ACCOUNT_SECRETS = (ESET_PASSWORD, FYLR_CLIENT_SECRET, FYLR_PASSWORD, SPAAZA_SECRET)


# --- the worker side: the one place that builds it -----------------------------------


@dataclass
class Worker:
    """The worker side of one example: its handler, and what to close after it."""

    handler: Handler
    vendors: Vendors
    store: SqliteStore

    async def aclose(self) -> None:
        await self.vendors.aclose()
        await self.store.close()


def make_worker(
    settings: Settings, store_path: Path, telemetry: Telemetry, redactor: Redactor
) -> Worker:
    """The handler as ``RelayService`` builds it (no store outages): vendor clients from
    ``settings``, memory rate limits, the settings' retry policy, a SQLite store, and the
    process's redactor (the log handlers' too, as ``command-relay run`` shares it)."""
    policy = RetryPolicy.of(settings.retry)
    outage = Outage({})
    vendors = Vendors(settings, RateLimits(settings.rate_limit, outage), policy, telemetry,
                      redactor=redactor)
    store = SqliteStore(store_path, settings.claim_lease_s, settings.idempotency_retention_s)
    handler = Handler(store, vendors, policy, settings.handler_timings, "fuzz-replica", outage)
    return Worker(handler, vendors, store)


def settings_for(base_url: str) -> Settings:
    """Every account of tenant ``default`` at the hostile server, short timings."""
    tenant = Tenant(
        sandbox=True,  # plain http:// to the test server
        eset=EsetAccount(region="eu", username="api@example.com",
                         password=SecretStr(ESET_PASSWORD)),
        fylr=FylrAccount(base_url=f"{base_url}/fylr", client_id="relay",
                         client_secret=SecretStr(FYLR_CLIENT_SECRET), username="relay",
                         password=SecretStr(FYLR_PASSWORD)),
        spaaza=SpaazaAccount(base_url=f"{base_url}/spaaza", token_id="7",
                             token_secret=SecretStr(SPAAZA_SECRET)),
    )
    return Settings(
        broker_url="sqla+sqlite:///unused.sqlite3",  # embedded: retries stay in process
        eset_host_template=f"{base_url}/eset/{{region}}/{{service}}",
        tenants={"default": tenant},
        http_timeout_s=HTTP_TIMEOUT_S,
        max_response_bytes=MAX_BODY,
        retry_max_attempts=MAX_ATTEMPTS,
        retry_initial_wait_s=0.01,
        retry_max_wait_s=0.05,
        collect_interval_s=0.05,
        command_timeout_s=60,
        rate_limits={"eset": "10/second"},
        rate_limit_url="memory://",
        batch_delete_window_ms=0,
    )


# --- commands and what the server answers --------------------------------------------

KINDS = ("eset-update-triggers", "spaaza-update-triggers", "batch-delete", "cancel-task",
         "fetch-patching")
ESET_KINDS = ("eset-update-triggers", "batch-delete", "fetch-patching")
OAUTH_KINDS = (*ESET_KINDS, "cancel-task")  # the vendors with a token endpoint
VENDOR: dict[str, VendorName] = {
    "eset-update-triggers": "eset", "batch-delete": "eset", "fetch-patching": "eset",
    "spaaza-update-triggers": "spaaza", "cancel-task": "fylr",
}


def command_for(kind: str) -> Command:
    """A valid command of ``kind``, its own id and key, due in :data:`DEADLINE_S`."""
    later = (now() + timedelta(days=1)).isoformat()
    params_of: dict[str, dict[str, Any]] = {
        "eset-update-triggers": {"task_uuid": str(uuid.uuid4()), "triggers": [{"manual": {}}]},
        "spaaza-update-triggers": {"provider": "spaaza", "task_id": 12345,
                                   "trigger": {"once": later, "repeat": "daily"}},
        "batch-delete": {"object_uuids": [str(uuid.uuid4())]},
        "cancel-task": {"task_id": 4711},
        "fetch-patching": {},
    }
    return parse_command({
        "type": "update-triggers" if kind.endswith("update-triggers") else kind,
        "id": str(uuid.uuid4()),
        "idempotency_key": f"vendor-fuzz-{uuid.uuid4()}",
        "tenant": "default",
        "deadline": (now() + timedelta(seconds=DEADLINE_S)).isoformat(),
        "params": params_of[kind],
    })


GOOD_TOKEN = Answer(200, headers=JSON_TYPE, body=b'{"access_token": "@ACCESS@", "token_type": '
                    b'"Bearer", "expires_in": 3600, "refresh_token": "@REFRESH@"}')
GOOD = {
    "token": GOOD_TOKEN,
    "call": Answer(200, headers=JSON_TYPE, body=b"{}"),
    "collect": Answer(200, headers=JSON_TYPE, body=b"{}"),
    "confirm": Answer(200, headers=JSON_TYPE, body=b'{"task": {"status": "canceled"}}'),
}
GOOD_PATCHING = Answer(200, headers=JSON_TYPE, body=b'{"patchingDetails": []}')


@dataclass(frozen=True)
class Scenario:
    """What the vendor answers one command: each role's answers in order, then good
    ones (``repeat``: its last answer again)."""

    kind: str
    token: tuple[Answer, ...] = ()
    call: tuple[Answer, ...] = ()
    collect: tuple[Answer, ...] = ()
    confirm: tuple[Answer, ...] = ()
    repeat: bool = False

    def scripts(self) -> dict[str, Script]:
        scripts = {}
        for role, good in GOOD.items():
            if role == "call" and self.kind == "fetch-patching":
                good = GOOD_PATCHING
            scripted: tuple[Answer, ...] = getattr(self, role)
            then = scripted[-1] if self.repeat and scripted else good
            scripts[role] = Script(scripted, then)
        return scripts

    def __repr__(self) -> str:
        parts = [repr(self.kind)]
        parts += [f"{role}={list(getattr(self, role))!r}" for role in GOOD if getattr(self, role)]
        if self.repeat:
            parts.append("repeat=True")
        return f"Scenario({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """hypothesis prints falsifying examples with this: long bodies cut short."""
        printer.text(repr(self))


# --- one example: the command, then its resend ----------------------------------------


@dataclass
class Handled:
    """What one ``handle`` call gave: its settlement, or what went wrong, and its time."""

    settlement: Settlement | None
    error: str | None  # the traceback of what escaped, or why it was stopped
    elapsed_s: float
    returned_at: float  # time.monotonic()
    timed_out: bool = False
    ended: bool = True  # False: it went on even after it was cancelled


@dataclass
class Run:
    scenario: Scenario
    command: Command
    deadline_at: float  # time.monotonic() of the command's deadline
    first: Handled
    resend: Handled | None
    exchanges: list[Exchange]  # those of the first handle
    resend_exchanges: list[Exchange]
    logs: str
    spans: list[ReadableSpan]
    secrets: tuple[str, ...] = field(default=())

    @property
    def vendor(self) -> str:
        return VENDOR[self.scenario.kind]

    @property
    def event(self) -> ResultEvent | None:
        settlement = self.first.settlement
        return settlement.event if settlement is not None else None

    def describe(self) -> str:
        lines = [f"handle took {self.first.elapsed_s:.2f}s; exchanges:"]
        lines += [f"  {e!r} after {e.arrived_at - self.deadline_at + DEADLINE_S:.2f}s"
                  for e in self.exchanges]
        event = self.event
        if event is not None:
            data = event.data
            vendor = data.vendor
            error = data.error
            lines.append(
                f"event: {data.outcome}"
                + (f", vendor status {vendor.status}" if vendor is not None else "")
                + (f", error {error.code} (vendor_status {error.vendor_status}): "
                   f"{error.message[:200]!r}" if error is not None else "")
            )
        return "\n".join(lines)


async def handle_within(handler: Handler, command: Command, until: float) -> Handled:
    """``handle`` run as the consumer runs it, stopped if it is still running at
    ``until`` (a time.monotonic() reading; then cancelled, and given a few seconds to
    end)."""
    started = time.monotonic()
    task = asyncio.ensure_future(handler.handle(command, DeliveryInfo()))
    done, _ = await asyncio.wait({task}, timeout=max(0.0, until - started))
    returned_at = time.monotonic()
    elapsed_s = returned_at - started
    if not done:
        task.cancel()
        ended, _ = await asyncio.wait({task}, timeout=5)
        return Handled(None, f"still running after {elapsed_s:.2f}s", elapsed_s, returned_at,
                       timed_out=True, ended=bool(ended))
    error = task.exception()
    if error is not None:
        text = "".join(traceback.format_exception(error))
        return Handled(None, text, elapsed_s, returned_at)
    return Handled(task.result(), None, elapsed_s, returned_at)


@contextmanager
def captured_logs(redactor: Redactor) -> Iterator[io.StringIO]:
    """Every record, DEBUG and up, as the worker's own log handlers write it (text and
    JSON lines, with their redaction)."""
    stream = io.StringIO()
    handlers = [handler_for("text", stream, redactor), handler_for("json", stream, redactor)]
    root = logging.getLogger()
    previous = root.level
    for log_handler in handlers:
        root.addHandler(log_handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        for log_handler in handlers:
            root.removeHandler(log_handler)
        root.setLevel(previous)


def run(vendor: HostileVendor, scenario: Scenario, scratch: Path) -> Run:
    """One example: the command, then the same command again, against the scripted
    vendor; what came of both, and what the vendor saw."""
    vendor.play(scenario.scripts())
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    command = command_for(scenario.kind)
    deadline_at = time.monotonic() + DEADLINE_S
    settings = settings_for(vendor.base_url)
    redactor = Redactor(settings.secret_values())

    async def twice() -> tuple[Handled, Handled | None, int]:
        worker = make_worker(settings, scratch / "claims.sqlite3", Telemetry.using(provider),
                             redactor)
        try:
            latest = deadline_at + HTTP_TIMEOUT_S + ALLOWANCE_S
            first = await handle_within(worker.handler, command, latest)
            seen = len(vendor.exchanges)
            if not first.ended:
                return first, None, seen
            # Sent again at once, as a redelivery (or a publisher's retry) would be; also
            # after a crash or a cancellation, which must not have let go of the claim.
            resend = await handle_within(worker.handler, command, time.monotonic() + BOUND_S)
            return first, resend, seen
        finally:
            await worker.aclose()

    with captured_logs(redactor) as logs:
        first, resend, seen = asyncio.run(twice())
    exchanges = vendor.finish()
    provider.shutdown()
    issued = tuple(token for e in exchanges for token in e.issued)
    return Run(scenario, command, deadline_at, first, resend, exchanges[:seen],
               exchanges[seen:], logs.getvalue(), list(spans.get_finished_spans()),
               ACCOUNT_SECRETS + issued)


# --- the promises -------------------------------------------------------------------


class BrokenPromise(AssertionError):
    """A promise the worker broke, on one example (a class of its own per promise, so
    hypothesis reports each as a bug of its own)."""


class Crashed(BrokenPromise):
    """An exception escaped ``handle``."""


class DeadlineMissed(BrokenPromise):
    """``handle`` ran past the deadline plus one HTTP timeout."""


class NoTerminalEvent(BrokenPromise):
    """``handle`` did not give one publishable terminal event."""


class InternalError(BrokenPromise):
    """A vendor's answer ended as ``internal_error``."""


class DishonestOutcome(BrokenPromise):
    """The outcome says something the vendor did not answer."""


class RedirectNotRefused(BrokenPromise):
    """A 3xx was not a ``vendor_rejected`` failure with its status."""


class ResponseIdMishandled(BrokenPromise):
    """A 202's ``response-id`` was collected when unusable, or not when usable."""


class ActedTwice(BrokenPromise):
    """A mutation was sent again after an answer that said it was received."""


class ResendNotReplayed(BrokenPromise):
    """The resend called the vendor, or did not get the stored event again."""


class SecretLeaked(BrokenPromise):
    """A known secret got into an event, a dead letter, a log line or a span."""


class HeaderInjected(BrokenPromise):
    """A request carried a header smuggled in by a token or an id."""


Problems = list[tuple[type[BrokenPromise], str]]
RESEND_AFTER = frozenset({401, 408, 429})  # answers saying the request was not acted on
USABLE_RESPONSE_ID = re.compile(rb"[A-Za-z0-9._~-]{1,128}")
SAYS_RESPONSE_ID = re.compile(r"(?i)response[-_ ]?id")


def sure_status(run: Run, exchange: Exchange) -> int | None:
    """The final status the worker surely read from this exchange, or None when it may
    have read another, or none: raw or odd heads, a body cut short or followed by bytes
    it did not frame (a client may refuse the answer for them), 1xx, an answer so slow
    that the client may have given up, bytes an earlier answer left on the connection."""
    answer = exchange.answer
    if (exchange.desynced or exchange.leaves_bytes or not exchange.complete
            or not plainly_formed(exchange) or answer.framing == "short"
            or 100 <= answer.status < 200):
        return None
    finished_at = exchange.finished_at or 0.0
    if exchange.duration_s > HTTP_TIMEOUT_S / 2 or finished_at > run.deadline_at:
        return None
    return answer.status


def may_have_ended_in_success(run: Run, exchange: Exchange) -> bool:
    """Whether this exchange can have been a final 2xx answer the worker read in full."""
    if exchange.desynced:
        return True  # what the client read is not what the server meant to send
    status = status_of(exchange)
    if status is None or not 200 <= status < 300:
        return False
    if run.vendor == "eset" and status == 202:
        return False  # ESET's 202 is never an answer, only a promise of one
    in_full = exchange.complete and exchange.answer.framing != "short"
    return in_full or exchange.body_bytes_sent > MAX_BODY  # past the limit: not read on


def plain_body(body: bytes) -> bool:
    """Empty, or JSON a client reads the same way anywhere (shallow, UTF-8, within the
    body limit)."""
    if not body:
        return True
    if len(body) > MAX_BODY:
        return False
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_refuse)
    except (ValueError, RecursionError):
        return False
    return _depth(value) <= 16


def _refuse(constant: str) -> None:
    raise ValueError(constant)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def handled_in_time(run: Run) -> Problems:
    """``handle`` returned by the deadline plus one HTTP timeout (plus the allowance)."""
    late_s = run.first.returned_at - run.deadline_at
    if run.first.timed_out or late_s > HTTP_TIMEOUT_S + ALLOWANCE_S:
        return [(DeadlineMissed, f"handle was still running {late_s:.2f}s after the "
                                 f"command's deadline (HTTP timeout {HTTP_TIMEOUT_S}s + "
                                 f"{ALLOWANCE_S}s allowance)")]
    return []


def nothing_escaped(run: Run) -> Problems:
    """No exception escapes ``handle``: whatever a vendor sends is an outcome."""
    if run.first.error is not None and not run.first.timed_out:
        return [(Crashed, f"an exception escaped handle:\n{run.first.error}")]
    return []


def one_terminal_event(run: Run) -> Problems:
    """One terminal event, the command's own, that the consumer can publish."""
    settlement = run.first.settlement
    if settlement is None:
        return []  # told above
    event = settlement.event
    if event is None or settlement.action not in (Action.ACK, Action.DEAD_LETTER):
        return [(NoTerminalEvent, f"no terminal event: {settlement}")]
    data = event.data
    problems: Problems = []
    if data.command_id != run.command.command_id or data.replayed:
        problems.append((NoTerminalEvent, "the event is not the command's own"))
    if data.outcome not in ("succeeded", "failed"):
        problems.append((NoTerminalEvent, f"outcome {data.outcome!r} for a valid command"))
    try:
        ResultEvent.model_validate_json(event.model_dump_json())
    except Exception as error:  # what the consumer would publish, read back by a playbook
        problems.append((NoTerminalEvent, f"the event can not be published: {error!r}"))
    return problems


def no_internal_error(run: Run) -> Problems:
    """A vendor's answer is a vendor or transport error, never ``internal_error``."""
    event = run.event
    error = event.data.error if event is not None else None
    if error is not None and error.code == "internal_error":
        return [(InternalError, f"internal_error: {error.message[:200]!r}")]
    return []


def honest_outcome(run: Run) -> Problems:
    """``succeeded`` only on a final 2xx sent in full (ESET: not a 202), with its status;
    a failure's ``vendor_status`` is one the vendor sent; a plain final 2xx is a success."""
    event = run.event
    if event is None:
        return []
    data, exchanges = event.data, run.exchanges
    last = exchanges[-1] if exchanges else None
    problems: Problems = []
    if data.outcome == "succeeded":
        if last is None or last.role == "token" or not may_have_ended_in_success(run, last):
            problems.append((DishonestOutcome, "succeeded, but the vendor's last answer was "
                                               "no final 2xx answer sent in full"))
        elif (not last.desynced and data.vendor is not None
              and data.vendor.status != status_of(last)):
            problems.append((DishonestOutcome, f"succeeded with vendor status "
                                               f"{data.vendor.status}, but the vendor's last "
                                               f"answer was {status_of(last)}"))
    error = data.error
    if error is not None and error.vendor_status is not None:
        sent = {status_of(e) for e in exchanges}
        if error.vendor_status not in sent and not any(e.desynced for e in exchanges):
            problems.append((DishonestOutcome, f"failed with vendor_status "
                                               f"{error.vendor_status}, which the vendor never "
                                               f"sent ({sorted(s for s in sent if s)})"))
    if data.outcome == "failed" and last is not None and last.role in ("call", "collect"):
        status = sure_status(run, last)
        if (status is not None and 200 <= status < 300
                and not (run.vendor == "eset" and status == 202)
                and plain_body(last.body)
                and not last.answer.header(b"content-encoding")):
            problems.append((DishonestOutcome, f"failed, but the vendor's last answer was a "
                                               f"plain {status}"))
    return problems


def redirects_refused(run: Run) -> Problems:
    """A 3xx is never followed: it is a refusal (``vendor_rejected``; on a token
    endpoint ``vendor_auth_failed`` too) with its own status; on the collect of a
    mutation ESET accepted, ``result_lost`` (the redirect says nothing of whether the
    action was done, and the contract never sends it again)."""
    event = run.event
    last = run.exchanges[-1] if run.exchanges else None
    if event is None or last is None:
        return []
    status = sure_status(run, last)
    if status is None or not 300 <= status < 400 or last.role == "confirm":
        return []  # a confirming read's 3xx leaves the refusal it was to confirm standing
    codes: tuple[str, ...] = ("vendor_rejected",)
    if last.role == "token":
        codes = ("vendor_rejected", "vendor_auth_failed")
    elif last.role == "collect" and run.command.type != "fetch-patching":
        codes = ("result_lost",)
    error = event.data.error
    if (event.data.outcome != "failed" or error is None or error.vendor_status != status
            or error.code not in codes):
        got = event.data.outcome if error is None else (
            f"{event.data.outcome}, {error.code}, vendor_status={error.vendor_status}")
        return [(RedirectNotRefused, f"the {last.role} answered {status}, the event says {got}")]
    return []


def response_ids(run: Run) -> Problems:
    """A 202 without a usable response-id fails saying so; a usable one is collected."""
    event = run.event
    if event is None or run.vendor != "eset":
        return []
    problems: Problems = []
    accepted = [e for e in run.exchanges if e.role == "call" and sure_status(run, e) == 202]
    for exchange in accepted:
        values = [v for n, v in exchange.headers if n.lower() == b"response-id"]
        later = _until_next_call(run.exchanges[run.exchanges.index(exchange) + 1:])
        if not values or all(_unusable(v) for v in values):
            error = event.data.error
            if exchange is run.exchanges[-1] and not (
                event.data.outcome == "failed" and error is not None
                and error.vendor_status == 202 and SAYS_RESPONSE_ID.search(error.message)
            ):
                problems.append((ResponseIdMishandled, f"a 202 with response-id {values!r} "
                                                       "did not fail saying so"))
            if any(e.role == "collect" for e in later):
                problems.append((ResponseIdMishandled, f"collected with an unusable "
                                                       f"response-id {values!r}"))
        elif len(values) == 1 and USABLE_RESPONSE_ID.fullmatch(values[0]):
            sent = [e.request_header("response-id") for e in later if e.role == "collect"]
            if any(value != values[0].decode() for value in sent):
                problems.append((ResponseIdMishandled, f"collected {sent!r} for a 202 with "
                                                       f"response-id {values[0]!r}"))
    return problems


def _until_next_call(exchanges: list[Exchange]) -> list[Exchange]:
    calls = [i for i, e in enumerate(exchanges) if e.role == "call"]
    return exchanges[: calls[0]] if calls else exchanges


def _unusable(value: bytes) -> bool:
    return not value.strip() or any(byte < 0x20 or byte >= 0x7f for byte in value)


def acted_at_most_once(run: Run) -> Problems:
    """A mutation goes again only after an answer saying it was not acted on (401,
    408, 429), a 5xx or no clear answer; never past the attempt cap."""
    mutations = [e for e in run.exchanges if e.role == "call" and e.method != "GET"]
    problems: Problems = []
    for previous, _ in pairwise(mutations):
        status = sure_status(run, previous)
        if status is not None and status < 500 and status not in RESEND_AFTER:
            problems.append((ActedTwice, f"the mutation was sent again after a {status}"))
    if len(mutations) > 2 * MAX_ATTEMPTS:  # each attempt may renew its token once
        problems.append((ActedTwice, f"the mutation was sent {len(mutations)} times "
                                     f"(attempt cap {MAX_ATTEMPTS})"))
    return problems


def resend_replayed(run: Run) -> Problems:
    """A stored outcome is replayed to the resend, without a vendor call; and where
    there is none (an exception, a cancellation) a mutation that may have reached the
    vendor is not sent again: the claim was not let go."""
    event, resend = run.event, run.resend
    if resend is None:
        return []
    problems: Problems = []
    if event is None:
        sent = any(e.role == "call" and e.method != "GET" for e in run.exchanges)
        again = [e for e in run.resend_exchanges if e.role == "call" and e.method != "GET"]
        if sent and again:
            how = "was stopped" if run.first.timed_out else "raised"
            problems.append((ActedTwice, f"handle {how} after the mutation was sent, and the "
                                         f"resend sent it again: {again[0]!r}"))
        return problems
    if run.resend_exchanges:
        problems.append((ResendNotReplayed, f"the resend called the vendor "
                                            f"{len(run.resend_exchanges)} times: "
                                            f"{run.resend_exchanges!r}"))
    replay = resend.settlement.event if resend.settlement is not None else None
    if replay is None:
        problems.append((ResendNotReplayed, f"the resend got no event: {resend.error}"))
    elif not replay.data.replayed or replay.data.outcome != event.data.outcome or (
        replay.data.error != event.data.error
    ):
        error = replay.data.error
        problems.append((ResendNotReplayed, f"the resend got {replay.data.outcome} "
                                            f"{error.code if error else ''} (replayed="
                                            f"{replay.data.replayed}), not the stored "
                                            f"{event.data.outcome} (the first took "
                                            f"{run.first.elapsed_s:.2f}s of the "
                                            f"{DEADLINE_S}s to the deadline)"))
    return problems


def secrets_kept(run: Run) -> Problems:
    """No known secret in the events, the dead-letter header, the log or the spans."""
    places: dict[str, list[str]] = {"log": [run.logs], "span": _span_texts(run.spans)}
    for name, handled in (("event", run.first), ("replayed event", run.resend)):
        event = handled.settlement.event if handled and handled.settlement else None
        if event is not None:
            places[name] = [event.model_dump_json()]
            if event.data.error is not None and name == "event":
                message = event.data.error.message[:DEAD_LETTER_MESSAGE_CHARS]
                places["dead-letter header"] = [message]
    problems: Problems = []
    for place, texts in places.items():
        leaked = sorted({_which(s) for s in run.secrets for text in texts if s in text})
        if leaked:
            problems.append((SecretLeaked, f"{', '.join(leaked)} in the {place}"))
    return problems


def _which(secret: str) -> str:
    if secret.startswith("acc"):
        return "an issued access token"
    if secret.startswith("ref"):
        return "an issued refresh token"
    return secret.rsplit("-", 1)[0]  # the account secret's kind, not its value


def _span_texts(spans: list[ReadableSpan]) -> list[str]:
    texts = []
    for span in spans:
        texts.append(span.name)
        texts += [str(v) for v in (span.attributes or {}).values()]
        if span.status.description:
            texts.append(span.status.description)
        for span_event in span.events:
            texts.append(span_event.name)
            texts += [str(v) for v in (span_event.attributes or {}).values()]
    return texts


def no_header_injected(run: Run) -> Problems:
    """No request carries a header that a token or an id with CRLF in it smuggled in."""
    injected = [e for e in run.exchanges + run.resend_exchanges
                if any(name == INJECTED_HEADER for name, _ in e.request_headers)]
    if injected:
        return [(HeaderInjected, f"{len(injected)} request(s) carried {INJECTED_HEADER}: "
                                 f"{injected[0].request_headers!r}")]
    return []


PROMISES: tuple[Callable[[Run], Problems], ...] = (
    nothing_escaped, handled_in_time, one_terminal_event, no_internal_error, honest_outcome,
    redirects_refused, response_ids, acted_at_most_once, resend_replayed, secrets_kept,
    no_header_injected,
)


def check(run: Run) -> None:
    """Every promise, on one example; raises the first broken one's class, listing all."""
    problems = [problem for promise in PROMISES for problem in promise(run)]
    if problems:
        first_kind = problems[0][0]
        listed = "\n".join(f"- {kind.__name__}: {message}" for kind, message in problems)
        raise first_kind(f"{listed}\n{run.describe()}")


# --- the server and the hypothesis settings -------------------------------------------


@pytest.fixture(scope="module")
def vendor() -> Iterator[HostileVendor]:
    server = HostileVendor().start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vendor-fuzz-") as path:
        yield Path(path)


def fuzz(vendor: HostileVendor, scenario: Scenario) -> None:
    with scratch_dir() as scratch:
        check(run(vendor, scenario, scratch))


SCALE = float(os.environ.get("RELAY_VENDOR_FUZZ_EXAMPLES", "1"))
# Passing, the module takes about a minute. Failing, hypothesis shrinks what it found,
# and an example that runs into the deadline costs the whole bound each time: minutes,
# which pytest's default timeout must not cut short (its report would be lost).
pytestmark = pytest.mark.timeout(900)


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max(1, round(max_examples * SCALE)),
        # No explain phase: it re-runs the failing example many times over (each may take
        # the command's whole deadline) for notes the exchanges listed already give.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        deadline=None,  # timing is a promise checked inside, against the command's deadline
        database=None,  # nothing written into the repository; failures print a blob
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example,
                               HealthCheck.function_scoped_fixture],
    )


# --- the classes the testers named ---------------------------------------------------

LOCATION = ((b"location", b"http://evil.example/elsewhere"),)
TOKEN_BODIES = (
    b"<html><body>Sign in</body></html>",
    b'["@ACCESS@"]',
    b'{"token_type": "Bearer", "expires_in": 3600}',
    b'{"access_token": "@ACCESS@", "expires_in": "3600"}',
    b'{"access_token": "@ACCESS@", "expires_in": null}',
    b'{"access_token": "@ACCESS@\\r\\nX-Injected: yes", "expires_in": 3600}',
    b'{"access_token": null}', b'{"access_token": 12345}', b'{"access_token": ""}',
    b'{"access_token": "@ACCESS@", "expires_in": "soon"}',
    b'{"access_token": "@ACCESS@", "expires_in": -1}',
    b'{"access_token": "@ACCESS@", "expires_in": 1e400}',
    b'{"access_token": "@ACCESS@", "expires_in": NaN}',
    b'{"access_token": "@ACCESS@", "expires_in": [1]}',
    b'{"access_token": "@ACCESS@\\u00e9"}', b'{"access_token": "@ACCESS@\\u0000"}',
    b'{"access_token": "@ACCESS@ and more"}', b'{"access_token": ["@ACCESS@"]}',
    b'{"access_token": {"value": "@ACCESS@"}}',
    b'{"access_token": "@ACCESS@", "refresh_token": 5}',
    b'{"access_token": "@ACCESS@", "refresh_token": "@REFRESH@\\r\\nX-Injected: yes"}',
    b'{"access_token": "@ACCESS@' + b"a" * 100_000 + b'"}',
    b'{"error": "invalid_grant", "error_description": "@FORM@"}',
)
HTML = ((b"content-type", b"text/html"),)
ECHOED_AUTHORIZATION = b'{"message": "token @AUTH@ is not valid for this route"}'

NAMED: dict[str, Scenario] = {
    "301 to an ESET update-triggers": Scenario(
        "eset-update-triggers", call=(Answer(301, b"Moved Permanently", LOCATION),)),
    "302 to a batch delete": Scenario("batch-delete", call=(Answer(302, b"Found", LOCATION),)),
    "303 to a fylr cancel": Scenario("cancel-task", call=(Answer(303, b"See Other", LOCATION),)),
    "307 to a Spaaza update": Scenario(
        "spaaza-update-triggers", call=(Answer(307, b"Temporary Redirect", LOCATION),)),
    "304 to fetch-patching": Scenario("fetch-patching", call=(Answer(304, b"Not Modified"),)),
    "302 from the ESET token endpoint": Scenario(
        "batch-delete", token=(Answer(302, b"Found", LOCATION),)),
    "302 from the fylr token endpoint": Scenario(
        "cancel-task", token=(Answer(302, b"Found", LOCATION),)),
    "202 without response-id": Scenario("batch-delete", call=(Answer(202, b"Accepted"),)),
    "202 with an empty response-id": Scenario(
        "eset-update-triggers", call=(Answer(202, b"Accepted", ((b"response-id", b""),)),)),
    "202 with a control character in response-id": Scenario(
        "batch-delete", call=(Answer(202, b"Accepted", ((b"response-id", b"ab\x01cd"),)),)),
    "202 with a non-ASCII response-id": Scenario(
        "fetch-patching", call=(Answer(202, b"Accepted", ((b"response-id", b"caf\xc3\xa9"),)),)),
    "a 64 KB header": Scenario("batch-delete", call=(Answer(200, headers=HUGE_HEADER,
                                                            body=b"{}"),)),
    "2000 headers": Scenario("spaaza-update-triggers", call=(Answer(200, headers=MANY_HEADERS,
                                                                    body=b"{}"),)),
    "Retry-After: superscript two": Scenario(
        "batch-delete", call=(Answer(429, b"Too Many Requests",
                                     ((b"retry-after", b"\xc2\xb2"),)),)),
    "a 200 body nested 100k deep": Scenario(
        "fetch-patching", call=(Answer(200, headers=JSON_TYPE, body=nested("[", 100_000)),)),
    "a 200 body 900 arrays deep": Scenario(
        "batch-delete", call=(Answer(200, headers=JSON_TYPE, body=nested("[", 900)),)),
    "token endpoint answering HTML": Scenario(
        "batch-delete", token=(Answer(200, headers=HTML, body=TOKEN_BODIES[0]),)),
    "token endpoint answering a list": Scenario(
        "cancel-task", token=(Answer(200, headers=JSON_TYPE, body=TOKEN_BODIES[1]),)),
    "token without access_token": Scenario(
        "eset-update-triggers", token=(Answer(200, headers=JSON_TYPE, body=TOKEN_BODIES[2]),)),
    "token with expires_in as a string": Scenario(
        "fetch-patching", token=(Answer(200, headers=JSON_TYPE, body=TOKEN_BODIES[3]),)),
    "token with expires_in null": Scenario(
        "cancel-task", token=(Answer(200, headers=JSON_TYPE, body=TOKEN_BODIES[4]),)),
    "access_token with CRLF": Scenario(
        "batch-delete", token=(Answer(200, headers=JSON_TYPE, body=TOKEN_BODIES[5]),)),
    "a body dripped one byte at a time": Scenario(
        "spaaza-update-triggers",
        call=(Answer(200, headers=JSON_TYPE, body=b'{"message": "' + b"x" * 100 + b'"}',
                     timing=Timing(drip_bytes=1, drip_interval_s=0.05)),)),
    "answers slower than the HTTP timeout, then a resend past the deadline": Scenario(
        "spaaza-update-triggers", call=(Answer(200, headers=JSON_TYPE, body=b"{}",
                                               timing=Timing(delay_s=1.5)),), repeat=True),
    "an error body echoing the Authorization header": Scenario(
        "cancel-task", call=(Answer(400, headers=JSON_TYPE, body=ECHOED_AUTHORIZATION),)),
    "a request-id echoing the bearer token": Scenario(
        "batch-delete", call=(Answer(403, headers=((b"request-id", BEARER),), body=b"{}"),)),
}


def named(*names: str) -> Callable[[Any], Any]:
    """The named classes as explicit examples of a hypothesis test."""

    def add(test: Any) -> Any:
        for name in reversed(names):
            test = example(scenario=NAMED[name])(test)
        return test

    return add


# --- the strategies of each test ------------------------------------------------------

token_answers = st.one_of(
    st.builds(Answer, status=st.just(200) | statuses, headers=st.just(JSON_TYPE) | header_lists,
              body=st.sampled_from(TOKEN_BODIES)),
    answers(MAX_BODY),
)
token_scenarios = st.builds(
    Scenario,
    kind=st.sampled_from(OAUTH_KINDS),
    token=st.lists(token_answers, min_size=1, max_size=2).map(tuple),
    # A 401 makes the worker renew its token (with the refresh token it was given).
    call=st.lists(st.just(Answer(401, headers=JSON_TYPE, body=b'{"message": "expired"}')),
                  max_size=2).map(tuple),
    repeat=st.booleans(),
)
call_scenarios = st.builds(
    Scenario,
    kind=st.sampled_from(KINDS),
    call=st.lists(answers(MAX_BODY), min_size=1, max_size=3).map(tuple),
    repeat=st.booleans(),
)
RESPONSE_IDS = (b"", b" ", b"\t", b"ab\x01cd", b"\x00", b"\x7f", b"caf\xc3\xa9", b"\xff\xfe",
                b"id\x1b[31m", b"r" * 5000, b"../../etc/passwd", AUTH, b"id with spaces")
response_id_values = st.one_of(
    st.sampled_from(RESPONSE_IDS),
    st.from_regex(rb"[A-Za-z0-9-]{1,64}", fullmatch=True),
    st.binary(max_size=16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
accepted_answers = st.builds(
    Answer,
    status=st.just(202),
    reason=st.just(b"Accepted"),
    headers=st.lists(st.tuples(st.sampled_from([b"response-id", b"Response-Id"]),
                               response_id_values), max_size=2).map(tuple),
    body=st.sampled_from([b"", b"{}", b'{"message": "request cached"}']),
    framing=st.sampled_from(["length", "chunked", "close"]),
)
accepted_scenarios = st.builds(
    Scenario,
    kind=st.sampled_from(ESET_KINDS),
    call=st.tuples(accepted_answers),
    collect=st.lists(answers(MAX_BODY), max_size=1).map(tuple),
)
CACHED = Answer(202, b"Accepted", ((b"response-id", b"cached-1"),))
collect_scenarios = st.builds(
    Scenario,
    kind=st.sampled_from(ESET_KINDS),
    call=st.just((CACHED,)),
    collect=st.lists(answers(MAX_BODY), min_size=1, max_size=3).map(tuple),
    repeat=st.booleans(),
)
# fylr's answer to the first cancel is lost (it may have acted), the retry is refused.
LOST_ANSWERS = (Answer(502, b"Bad Gateway", body=b"{}"), Answer(503, b"Unavailable"),
                Answer(504, b"Gateway Timeout"), Answer(head=b""))
REFUSED_AGAIN = Answer(400, headers=JSON_TYPE, body=b'{"code": "error.user.task_not_running"}')
TASK_BODIES = (b'{"task": {"status": "canceled"}}', b'{"status": "canceled"}',
               b'{"task": {"run_canceled_at": "2026-01-01T00:00:00Z"}}',
               b'{"task": ["canceled"]}', b'{"task": {"status": ["canceled"]}}',
               b'[{"status": "canceled"}]', b'{"task": {"status": "running"}}')
confirm_scenarios = st.builds(
    Scenario,
    kind=st.just("cancel-task"),
    call=st.sampled_from(LOST_ANSWERS).map(lambda lost: (lost, REFUSED_AGAIN)),
    confirm=st.lists(answers(MAX_BODY, body=st.sampled_from(TASK_BODIES) | bodies(MAX_BODY)),
                     min_size=1, max_size=2).map(tuple),
)


@st.composite
def broken_scenarios(draw: st.DrawFn) -> Scenario:
    """Slow, dripped, cut and raw answers, on one role of any command."""
    kind = draw(st.sampled_from(KINDS))
    roles = ["call"] + (["token"] if kind in OAUTH_KINDS else [])
    roles += ["collect"] if VENDOR[kind] == "eset" else []
    roles += ["confirm"] if kind == "cancel-task" else []
    role = draw(st.sampled_from(roles))
    hostile = st.lists(answers(MAX_BODY, timing=timings_hostile, broken=True,
                               body=st.sampled_from([b"", b"{}", b'{"message": "x"}'])),
                       min_size=1, max_size=2).map(tuple)
    scripted: dict[str, Any] = {role: draw(hostile)}
    if role == "collect":
        scripted["call"] = (CACHED,)
    if role == "confirm":
        scripted["call"] = (LOST_ANSWERS[0], REFUSED_AGAIN)
    return Scenario(kind, **scripted)


# --- the tests -----------------------------------------------------------------------


@named("302 from the ESET token endpoint", "302 from the fylr token endpoint",
       "token endpoint answering HTML", "token endpoint answering a list",
       "token without access_token", "token with expires_in as a string",
       "token with expires_in null", "access_token with CRLF")
@fuzz_settings(20)
@given(scenario=token_scenarios)
def test_token_endpoint_answers_keep_every_promise(
    vendor: HostileVendor, scenario: Scenario
) -> None:
    fuzz(vendor, scenario)


@named("301 to an ESET update-triggers", "302 to a batch delete", "303 to a fylr cancel",
       "307 to a Spaaza update", "304 to fetch-patching", "a 64 KB header", "2000 headers",
       "Retry-After: superscript two", "a 200 body nested 100k deep", "a 200 body 900 arrays deep",
       "an error body echoing the Authorization header",
       "a request-id echoing the bearer token")
@fuzz_settings(30)
@given(scenario=call_scenarios)
def test_api_answers_keep_every_promise(vendor: HostileVendor, scenario: Scenario) -> None:
    fuzz(vendor, scenario)


@named("202 without response-id", "202 with an empty response-id",
       "202 with a control character in response-id", "202 with a non-ASCII response-id")
@fuzz_settings(15)
@given(scenario=accepted_scenarios)
def test_eset_202_response_ids_keep_every_promise(
    vendor: HostileVendor, scenario: Scenario
) -> None:
    fuzz(vendor, scenario)


@fuzz_settings(15)
@given(scenario=collect_scenarios)
def test_eset_collect_answers_keep_every_promise(vendor: HostileVendor, scenario: Scenario) -> None:
    fuzz(vendor, scenario)


@fuzz_settings(12)
@given(scenario=confirm_scenarios)
def test_fylr_confirming_read_answers_keep_every_promise(
    vendor: HostileVendor, scenario: Scenario
) -> None:
    fuzz(vendor, scenario)


@named("a body dripped one byte at a time",
       "answers slower than the HTTP timeout, then a resend past the deadline")
@fuzz_settings(6)
@given(scenario=broken_scenarios())
def test_slow_cut_and_raw_answers_keep_every_promise(
    vendor: HostileVendor, scenario: Scenario
) -> None:
    fuzz(vendor, scenario)


def test_a_well_behaved_vendor_passes_every_check(vendor: HostileVendor) -> None:
    """The checks themselves: each command against good answers succeeds, and its
    resend is replayed, with every promise kept."""
    for kind in KINDS:
        with scratch_dir() as scratch:
            result = run(vendor, Scenario(kind), scratch)
        check(result)
        assert result.event is not None and result.event.data.outcome == "succeeded"
        assert [e.role for e in result.exchanges] == (
            ["token", "call"] if kind in OAUTH_KINDS else ["call"])



# --- the checks can fail: each on a run made up to break its promise -----------------

MADE_UP_TOKEN = "acc" + "0" * 24


def made_up_run(
    kind: str, answers: list[tuple[str, Answer]], outcome: Outcome, status: int,
    resend_calls: int = 0, message: str = "refused",
) -> Run:
    """A run as :func:`run` records it, of a worker that sent ``answers``' requests (by
    role, each answered in full at once), ended as ``outcome`` with ``status`` and
    ``message``, and whose resend made ``resend_calls`` calls."""
    command = command_for(kind)
    started = time.monotonic()
    exchanges = [made_up_exchange(role, answer, started) for role, answer in answers]
    error = None if outcome == "succeeded" else ErrorInfo(
        code=ErrorCode.VENDOR_REJECTED, message=message, vendor_status=status)
    event = result_event(command_id=command.command_id, idempotency_key=command.key,
                         command_type=command.type, tenant=command.tenant, outcome=outcome,
                         started_at=now(), attempts=1,
                         reply=VendorReply(VENDOR[kind], status, {}), error=error)
    first = Handled(Settlement.for_event(event), None, 0.1, started + 0.1)
    replayed = Settlement.for_event(replay_for(command.command_id, event))
    resend = Handled(replayed, None, 0.01, started + 0.2)
    resent = [made_up_exchange("call", GOOD["call"], started) for _ in range(resend_calls)]
    return Run(Scenario(kind), command, started + DEADLINE_S, first, resend, exchanges, resent,
               logs="", spans=[], secrets=(*ACCOUNT_SECRETS, MADE_UP_TOKEN))


def made_up_exchange(role: str, answer: Answer, at: float) -> Exchange:
    return Exchange(role, "POST", "/made-up", [], b"", answer, at, headers=list(answer.headers),
                    body=answer.body, full_bytes=100, total_bytes=100, sent_bytes=100,
                    finished_at=at + 0.01)


MADE_UP_BREACHES: dict[str, tuple[Callable[[], Run], type[BrokenPromise]]] = {
    "success on a 302": (
        lambda: made_up_run("batch-delete", [("token", GOOD_TOKEN),
                                             ("call", Answer(302, b"Found"))], "succeeded", 302),
        DishonestOutcome),
    "a mutation sent again after its 200": (
        lambda: made_up_run("batch-delete", [("call", Answer(200)), ("call", Answer(200))],
                            "succeeded", 200),
        ActedTwice),
    "a resend that calls the vendor": (
        lambda: made_up_run("cancel-task", [("call", Answer(200))], "succeeded", 200,
                            resend_calls=1),
        ResendNotReplayed),
    "an issued token in an error message": (
        lambda: made_up_run("cancel-task", [("call", Answer(400))], "failed", 400,
                            message=f"refused: Bearer {MADE_UP_TOKEN}"),
        SecretLeaked),
}


@pytest.mark.parametrize(("made_up", "breach"), MADE_UP_BREACHES.values(),
                         ids=MADE_UP_BREACHES.keys())
def test_the_checks_find_a_broken_promise(
    made_up: Callable[[], Run], breach: type[BrokenPromise]
) -> None:
    """The checks themselves can fail: each finds the breach a made-up run commits."""
    with pytest.raises(breach):
        check(made_up())
