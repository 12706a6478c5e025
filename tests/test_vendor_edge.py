"""What the worker makes of the answers a broken or hostile vendor (or whatever sits in
between) can give: redirects, 202s that can not be collected, odd ``Retry-After``s, bodies
too deep to keep, bodies that are not the answer, tokens that are no tokens, an answer
the worker itself fails on, echoed credentials and answers dripped a byte at a time.

Each test runs a command through the handler (claim, vendor call, stored event) against a
vendor scripted with ``httpx.MockTransport``, and then, where it matters, sends the same
command again: what the vendor saw and what the events say are the observations.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.events import ResultEvent
from worker.ops.logs import handler_for
from worker.redaction import Redactor
from worker.settlement import Action, Settlement

from .scripted_vendor import (
    ESET_PASSWORD,
    FYLR_PASSWORD,
    FYLR_SECRET,
    GOOD_TOKEN,
    PATCHING,
    REFRESH,
    SPAAZA_SECRET,
    TOKEN,
    Answer,
    Rig,
    ScriptedVendor,
    command,
    run,
    settings,
    status,
)


def error_code(event: ResultEvent) -> str | None:
    return None if event.data.error is None else str(event.data.error.code)


# --- status classes ---


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308, 304])
def test_a_redirect_is_a_failure_with_its_status_never_followed(code: int, tmp_path: Path):
    vendor = ScriptedVendor([status(code, headers={"location": "https://elsewhere.example/x"})])
    (event,) = run(vendor, tmp_path, command("batch-delete"))
    assert (event.data.outcome, error_code(event)) == ("failed", "vendor_rejected")
    assert event.data.error is not None and event.data.error.vendor_status == code
    (call,) = vendor.calls  # the location was never asked for
    assert call.url.host == "eu.quarantine-management.eset.systems"


@pytest.mark.parametrize("code", [101, 199, 600, 999])
def test_a_status_that_is_neither_success_nor_error_is_a_failure(code: int, tmp_path: Path):
    (event,) = run(ScriptedVendor([status(code)]), tmp_path, command("cancel-task"))
    assert (event.data.outcome, error_code(event)) == ("failed", "vendor_rejected")


RESPONSE_IDS = {
    "missing": [],
    "empty": [(b"response-id", b"")],
    "control characters": [(b"response-id", b"abc\x01def")],
    "a space": [(b"response-id", b"abc def")],
    "latin-1": [(b"response-id", b"\xe9t\xe9")],
    "too long": [(b"response-id", b"r" * 201)],
}


@pytest.mark.parametrize("headers", RESPONSE_IDS.values(), ids=RESPONSE_IDS.keys())
def test_a_mutations_202_without_a_usable_response_id_is_lost_and_never_resent(
    headers: list[tuple[bytes, bytes]], tmp_path: Path
):
    vendor = ScriptedVendor([status(202, headers=headers)])
    delete = command("batch-delete")
    first, again = run(vendor, tmp_path, delete, delete)
    assert (first.data.outcome, error_code(first)) == ("failed", "result_lost")
    assert "no usable response-id" in (first.data.error.message if first.data.error else "")
    assert again.data.replayed and error_code(again) == "result_lost"
    assert len(vendor.calls) == 1


def test_a_reads_202_without_a_usable_response_id_is_asked_again(tmp_path: Path):
    vendor = ScriptedVendor([status(202, headers=[(b"response-id", b"\x7f")])])
    (event,) = run(vendor, tmp_path, command("fetch-patching"))
    assert event.data.outcome == "succeeded"
    assert event.data.vendor is not None and event.data.vendor.body == PATCHING["patchingDetails"]
    assert len(vendor.calls) == 2


@pytest.mark.parametrize("answer", [404, 400, 403, 302, 504])
def test_a_mutations_collect_answered_with_anything_but_success_is_lost(
    answer: int, tmp_path: Path
):
    """ESET accepted the mutation (202): whatever the collect says next (gone, refused,
    redirected), it says nothing of whether the action was done."""
    vendor = ScriptedVendor([status(202, headers={"response-id": "cached-1"}), status(answer)])
    (event,) = run(vendor, tmp_path, command("batch-delete"))
    assert (event.data.outcome, error_code(event)) == ("failed", "result_lost")
    assert [r.headers.get("response-id") for r in vendor.calls] == [None, "cached-1"]


@pytest.mark.parametrize(
    "value", ["²", "-5", "1e309", "99999999999", "Wed, 21 Oct 2015 07:28:00 GMT", "soon", ""]
)
def test_an_odd_retry_after_is_read_safely(value: str, tmp_path: Path):
    """A throttled call is retried whatever ``Retry-After`` says; one past the command's
    budget ends the retries (the command fails as throttled, never as a crash)."""
    vendor = ScriptedVendor([status(429, headers={"retry-after": value})])
    (event,) = run(vendor, tmp_path, command("cancel-task"))
    if value == "99999999999":
        assert (event.data.outcome, error_code(event)) == ("failed", "vendor_unavailable")
    else:
        assert event.data.outcome == "succeeded"


# --- bodies ---


DEEP = {
    "100,000 nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "900 nested arrays": b"[" * 900 + b"]" * 900,
    "100 nested arrays": b"[" * 100 + b"]" * 100,
}


@pytest.mark.parametrize("body", DEEP.values(), ids=DEEP.keys())
def test_a_body_too_deep_to_keep_is_noted_and_the_outcome_stands(body: bytes, tmp_path: Path):
    vendor = ScriptedVendor([status(200, content=body,
                                    headers={"content-type": "application/json"})])
    (event,) = run(vendor, tmp_path, command("batch-delete"))
    assert event.data.outcome == "succeeded"
    assert event.data.vendor is not None and isinstance(event.data.vendor.body, str)
    assert len(event.model_dump_json()) < 10_000  # stored and published as it is


@pytest.mark.parametrize("body", [b"[[[]]]", b'"patching"', b'{"patchingDetails": {"a": 1}}',
                                  b"<html>maintenance</html>", b"[" * 900 + b"]" * 900])
def test_a_success_that_is_not_the_answer_of_a_read_is_asked_again(
    body: bytes, tmp_path: Path
):
    vendor = ScriptedVendor([status(200, content=body)] * 3)
    (event,) = run(vendor, tmp_path, command("fetch-patching"))
    assert (event.data.outcome, error_code(event)) == ("failed", "vendor_unavailable")
    assert event.data.error is not None and event.data.error.retryable
    assert len(vendor.calls) == 3


# --- tokens ---


BAD_TOKENS = {
    "html": status(200, content=b"<html>login</html>"),
    "a list": status(200, json=[GOOD_TOKEN]),
    "no access_token": status(200, json={"token_type": "Bearer", "expires_in": 3600}),
    "CRLF in the token": status(200, json={**GOOD_TOKEN, "access_token": "abc\r\nX-Evil: 1"}),
    "a space in the token": status(200, json={**GOOD_TOKEN, "access_token": "abc def"}),
    "non-ASCII token": status(200, json={**GOOD_TOKEN, "access_token": "t\u00f6ken"}),
    "expires_in as words": status(200, json={**GOOD_TOKEN, "expires_in": "an hour"}),
    "expires_in negative": status(200, json={**GOOD_TOKEN, "expires_in": -1}),
}


@pytest.mark.parametrize("answer", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
@pytest.mark.parametrize("kind", ["batch-delete", "cancel-task"])
def test_a_token_answer_that_is_no_token_is_retried_never_kept(
    kind: str, answer: Answer, tmp_path: Path
):
    """Refused before it is cached: the token request is tried again, and once the
    endpoint answers properly the command goes out with a good token."""
    vendor = ScriptedVendor(tokens=[answer])
    (event,) = run(vendor, tmp_path, command(kind))
    assert event.data.outcome == "succeeded", event.data.error
    assert len(vendor.token_calls) == 2
    assert [r.headers["authorization"] for r in vendor.calls] == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize("expires_in", ["3600", None])
def test_expires_in_as_a_string_of_digits_or_null_is_an_hour(
    expires_in: str | None, tmp_path: Path
):
    vendor = ScriptedVendor(tokens=[status(200, json={**GOOD_TOKEN, "expires_in": expires_in})])
    events = run(vendor, tmp_path, command("cancel-task"), command("cancel-task"))
    assert [e.data.outcome for e in events] == ["succeeded", "succeeded"]
    assert len(vendor.token_calls) == 1  # kept for the second command


def test_a_token_that_expires_at_once_serves_its_call_and_is_renewed_for_the_next(
    tmp_path: Path,
):
    expiring = status(200, json={**GOOD_TOKEN, "expires_in": 0})
    vendor = ScriptedVendor(tokens=[expiring, expiring])
    events = run(vendor, tmp_path, command("cancel-task"), command("cancel-task"))
    assert [e.data.outcome for e in events] == ["succeeded", "succeeded"]
    assert len(vendor.token_calls) == 2


def test_a_token_endpoint_that_never_answers_properly_fails_the_command_for_a_while(
    tmp_path: Path,
):
    vendor = ScriptedVendor(tokens=[BAD_TOKENS["CRLF in the token"]] * 10)
    (event,) = run(vendor, tmp_path, command("batch-delete"))
    assert (event.data.outcome, error_code(event)) == ("failed", "vendor_unavailable")
    assert event.data.error is not None and "usable token" in event.data.error.message
    assert vendor.calls == []  # nothing was sent with a token that can not be sent


# --- the worker failing on an answer ---


class BrokenStream(httpx.AsyncByteStream):
    """A body whose reading fails in a way no transport error covers (a bug's stand-in)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise RuntimeError("the worker tripped over this answer")
        yield b""  # pragma: no cover - makes this a generator


def test_a_failure_after_the_vendor_answered_stores_the_result_as_lost(tmp_path: Path):
    vendor = ScriptedVendor([lambda request: httpx.Response(200, stream=BrokenStream())])
    delete = command("batch-delete")
    first, again = run(vendor, tmp_path, delete, delete)
    assert (first.data.outcome, error_code(first)) == ("failed", "result_lost")
    assert "RuntimeError" in (first.data.error.message if first.data.error else "")
    assert again.data.replayed and again.data.error == first.data.error
    assert len(vendor.calls) == 1  # never sent a second time


def test_a_failure_before_anything_was_sent_lets_the_command_be_tried_again(tmp_path: Path):
    """A read is not marked sent: a failure of the worker's leaves the key free."""
    vendor = ScriptedVendor([lambda request: httpx.Response(200, stream=BrokenStream())])
    with pytest.raises(RuntimeError):
        asyncio.run(Rig(vendor, tmp_path).run(command("fetch-patching")))
    (event,) = run(vendor, tmp_path, command("fetch-patching"))
    assert event.data.outcome == "succeeded"


def test_a_cancelled_holder_after_sending_keeps_the_claim(tmp_path: Path):
    """The process stopping mid-call (a cancellation) leaves the sent claim held: a
    second delivery while the lease runs finds it in progress, not free to send again."""
    started = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(30)
        return httpx.Response(200, json={})

    delete = command("batch-delete")
    calls: list[httpx.Request] = []

    async def scenario() -> Settlement:
        def vendor(request: httpx.Request) -> Any:
            if request.url.path.endswith("/token"):
                return httpx.Response(200, json=GOOD_TOKEN)
            calls.append(request)
            return slow(request)

        rig = Rig(ScriptedVendor(), tmp_path)
        rig.vendor = vendor  # type: ignore[assignment]
        holder = asyncio.ensure_future(rig.run(delete))
        await started.wait()
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        # With delay queues a duplicate of work in progress is deferred at once.
        (settlement,) = await Rig(ScriptedVendor(), tmp_path, retry_delays_s=(5.0,)).run(delete)
        return settlement

    settlement = asyncio.run(scenario())
    assert (settlement.event, settlement.action) == (None, Action.DELAY)  # not sent again
    assert len(calls) == 1


# --- secrets ---


def echo(request: httpx.Request) -> httpx.Response:
    """A debugging proxy's answer: the request, headers and body, sent back."""
    echoed = {name: value for name, value in request.headers.items()}
    return httpx.Response(400, json={"message": f"echo {echoed}", "headers": echoed,
                                     "body": request.content.decode()})


def echo_text(request: httpx.Request) -> httpx.Response:
    authorization = request.headers.get("authorization", "")
    return httpx.Response(500, text=f"you sent {authorization[7:]} and {request.content!r}")


SECRETS = (ESET_PASSWORD, FYLR_SECRET, FYLR_PASSWORD, SPAAZA_SECRET, TOKEN, REFRESH)




@contextmanager
def worker_log() -> Iterator[io.StringIO]:
    """What the worker's log handler writes while the block runs, at DEBUG."""
    stream = io.StringIO()
    handler = handler_for("text", stream, Redactor(settings().secret_values()))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("answer", [echo, echo_text], ids=["json", "text"])
@pytest.mark.parametrize("kind", ["batch-delete", "cancel-task", "update-triggers"])
def test_an_echoed_request_leaves_no_secret_in_the_event_or_the_log(
    kind: str, answer: Answer, tmp_path: Path
):
    vendor = ScriptedVendor([answer] * 5)
    with worker_log() as log:
        (event,) = run(vendor, tmp_path, command(kind))
    assert event.data.outcome == "failed"
    published = event.model_dump_json()
    assert "[redacted]" in published
    for secret in SECRETS:
        assert secret not in published
        assert secret not in log.getvalue()


def test_a_token_endpoint_echoing_the_form_leaves_no_password_behind(tmp_path: Path):
    def echo_form(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"access_token": request.content.decode()[:80]})

    vendor = ScriptedVendor(tokens=[echo_form] * 10, answers=[echo] * 5)
    with worker_log() as log:
        (event,) = run(vendor, tmp_path, command("batch-delete"))
    for secret in SECRETS:
        assert secret not in event.model_dump_json()
        assert secret not in log.getvalue()


# --- time ---


class Drip(httpx.AsyncByteStream):
    """A body sent one byte every ``interval_s``."""

    def __init__(self, size: int, interval_s: float) -> None:
        self.size, self.interval_s = size, interval_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.size):
            await asyncio.sleep(self.interval_s)
            yield b" "


@pytest.mark.parametrize("kind", ["batch-delete", "fetch-patching"])
def test_a_dripped_answer_ends_within_the_deadline_and_one_http_timeout(
    kind: str, tmp_path: Path
):
    deadline_s, http_timeout_s = 1.0, 0.5
    vendor = ScriptedVendor([lambda request: httpx.Response(200, stream=Drip(3600, 0.05))] * 9)
    deadline = (datetime.now(UTC) + timedelta(seconds=deadline_s)).isoformat()
    rig = Rig(vendor, tmp_path, http_timeout_s=http_timeout_s)
    started = time.monotonic()
    asyncio.run(rig.run(command(kind, deadline=deadline)))
    took_s = time.monotonic() - started
    (event,) = rig.events
    assert event.data.outcome == "failed"
    assert error_code(event) in ("vendor_unavailable", "deadline_exceeded")
    # The bound is deadline + one HTTP timeout; the allowance is for a loaded machine.
    assert took_s < deadline_s + http_timeout_s + 1.0, took_s
