"""Hostile faults, seen from the far end: the bytes a raw socket receives, how the
connection ends, how slowly a drip arrives, and what the sandbox counted."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.rig.procs import free_port
from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault, create_app
from worker.sandbox.hostile import (
    RETRY_AFTER_VALUES,
    ROUTES,
    BadRetryAfter,
    BadToken,
    Drip,
    Echo,
    HugeHeaders,
    OddBody,
    PendingId,
    Redirect,
    Reset,
)
from worker.sandbox.profiles import PROFILES

from ..command_line import assert_said_in_a_line_or_two
from .conftest import ESET_TOKEN, FYLR_TOKEN

PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"
BATCH_DELETE = "/eset/eu/quarantine-management/v1/quarantined-objects:batchDelete"
FYLR_TASK = "/fylr/api/v1/task/17"
SPAAZA_TASK = "/spaaza/tasks/5"


# --- the far end: a raw socket ---


@dataclass(frozen=True)
class Received:
    """Everything a client read on one connection, and how the connection ended."""

    data: bytes
    reads: int
    reset: bool  # ended by a TCP reset (else by a close, or nothing was sent)
    elapsed_s: float

    @property
    def head(self) -> bytes:
        head, separator, _ = self.data.partition(b"\r\n\r\n")
        return head + separator

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        """The value of the first header line named `name`, else None."""
        for line in self.head.split(b"\r\n")[1:]:
            key, colon, value = line.partition(b":")
            if colon and key.lower() == name:
                return value.strip()
        return None

    def header_names(self) -> list[bytes]:
        return [line.partition(b":")[0].lower() for line in self.head.split(b"\r\n")[1:] if line]


class Listening(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class Address:
    host: str
    port: int


def exchange(server: Listening, request: bytes, timeout_s: float = 60) -> Received:
    """Send `request` on a fresh connection and read until the server ends it."""
    with socket.create_connection((server.host, server.port), timeout=timeout_s) as sock:
        started = time.monotonic()
        sock.sendall(request)
        chunks: list[bytes] = []
        reset = False
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return Received(b"".join(chunks), len(chunks), reset, time.monotonic() - started)


def request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    # Connection: close, so that a normal answer ends the exchange too (no keep-alive wait).
    lines = [f"{method} {path} HTTP/1.1", "host: sandbox.test", "connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_request(method: str, path: str, headers: dict[str, str], payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return request(method, path, {**headers, "content-type": "application/json"}, body)


def form_request(path: str, form: dict[str, str], headers: dict[str, str] | None = None) -> bytes:
    content = {"content-type": "application/x-www-form-urlencoded", **(headers or {})}
    return request("POST", path, content, urlencode(form).encode())


def eset_token_request() -> bytes:
    config = SandboxConfig()
    form = {
        "grant_type": "password",
        "username": config.eset_username,
        "password": config.eset_password,
    }
    return form_request(ESET_TOKEN, form)


def fylr_token_request() -> bytes:
    config = SandboxConfig()
    form = {
        "grant_type": "client_credentials",
        "client_id": config.fylr_client_id,
        "client_secret": config.fylr_client_secret,
    }
    return form_request(FYLR_TOKEN, form)


def script(sandbox: SandboxServer, *entries: Any) -> None:
    """Put these faults (status or hostile) in the sandbox's script."""
    sandbox.state.faults = Faults(script=list(entries))


@pytest.fixture
def patching(eset_headers: dict[str, str]) -> bytes:
    """An authenticated ESET fetch-patching request (a 200 with a 918-byte body)."""
    return request("GET", PATCHING, eset_headers)


# --- redirects ---


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", ["https://elsewhere.example/x", "/_sandbox/reset"])
def test_redirect_answers_its_status_and_location(
    sandbox: SandboxServer, patching: bytes, status: int, location: str
) -> None:
    script(sandbox, Redirect(status=status, location=location))

    received = exchange(sandbox, patching)

    assert received.status == status
    assert received.header(b"location") == location.encode()
    assert received.body == b""


def test_not_modified_comes_without_location_or_body(
    sandbox: SandboxServer, patching: bytes
) -> None:
    script(sandbox, Redirect(status=304, location=None))

    received = exchange(sandbox, patching)

    assert received.status == 304
    assert received.header(b"location") is None
    assert received.body == b""


def test_redirect_answers_instead_of_the_call(sandbox: SandboxServer) -> None:
    """The call is not carried out: no effect, even unauthenticated."""
    script(sandbox, Redirect())

    received = exchange(sandbox, json_request("POST", BATCH_DELETE, {}, {"objectUuids": ["a"]}))

    assert received.status == 302
    assert sandbox.state.stats()["effects"] == {}


# --- ESET 202 with a response-id that cannot be collected ---


@pytest.mark.parametrize(
    ("form", "header_line"),
    [
        ("empty", b"\r\nresponse-id: \r\n"),
        ("control", b"\r\nresponse-id: resp-\x1b[31m-\x07-\x7f\r\n"),
        ("nul", b"\r\nresponse-id: resp-\x00-id\r\n"),
        ("cr", b"\r\nresponse-id: resp-\r-id\r\n"),
        ("lf", b"\r\nresponse-id: resp-\n-id\r\n"),
        ("crlf", b"\r\nresponse-id: resp-id\r\nx-injected: 1\r\n"),
        ("utf-8", "\r\nresponse-id: réponse-идентификатор\r\n".encode()),
        ("latin-1", "\r\nresponse-id: réponse-façade\r\n".encode("latin-1")),
    ],
)
def test_pending_id_sends_its_response_id_as_these_bytes(
    sandbox: SandboxServer, patching: bytes, form: str, header_line: bytes
) -> None:
    script(sandbox, PendingId(response_id=form))

    received = exchange(sandbox, patching)

    assert received.status == 202
    assert header_line in received.head
    assert received.header(b"request-id")
    assert received.body == b""


def test_pending_id_missing_sends_no_response_id(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, PendingId(response_id="missing"))

    received = exchange(sandbox, patching)

    assert received.status == 202
    assert b"response-id" not in received.header_names()


def test_pending_id_long_is_as_long_as_asked(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, PendingId(response_id="long", length=100_000))

    received = exchange(sandbox, patching)

    assert received.header(b"response-id") == b"r" * 100_000


def test_pending_id_waits_for_an_eset_call(
    sandbox: SandboxServer, spaaza_headers: dict[str, str], patching: bytes
) -> None:
    script(sandbox, PendingId())

    spaaza = exchange(sandbox, json_request("PUT", SPAAZA_TASK, spaaza_headers, {"desc": "x"}))
    eset = exchange(sandbox, patching)

    assert (spaaza.status, eset.status) == (200, 202)


@pytest.mark.parametrize("route", ["api", "token", "fylr", "eset.token"])
def test_pending_id_off_eset_api_routes_is_refused(client: httpx.Client, route: str) -> None:
    fault = {"kind": "pending-id", "route": route}

    assert client.put("/_sandbox/faults", json={"script": [fault]}).status_code == 422


# --- drips ---


def spaaza_update(headers: dict[str, str]) -> bytes:
    return json_request("PUT", SPAAZA_TASK, headers, {"desc": "drip"})


# Each dripped answer: the route selector that reaches it, and its request.
DRIPPED_CALLS: dict[str, tuple[str, Callable[[dict[str, dict[str, str]]], bytes]]] = {
    "eset 200": ("api", lambda auth: request("GET", PATCHING, auth["eset"])),
    "fylr": ("api", lambda auth: request("GET", FYLR_TASK, auth["fylr"])),
    "spaaza": ("api", lambda auth: spaaza_update(auth["spaaza"])),
    "eset token": ("token", lambda auth: eset_token_request()),
    "fylr token": ("token", lambda auth: fylr_token_request()),
}


@pytest.fixture
def auth(
    eset_headers: dict[str, str], fylr_headers: dict[str, str], spaaza_headers: dict[str, str]
) -> dict[str, dict[str, str]]:
    return {"eset": eset_headers, "fylr": fylr_headers, "spaaza": spaaza_headers}


@pytest.mark.parametrize("call", list(DRIPPED_CALLS))
def test_drip_head_sends_status_line_and_headers_a_byte_per_interval(
    sandbox: SandboxServer, auth: dict[str, dict[str, str]], call: str
) -> None:
    interval_s = 0.005
    route, make_request = DRIPPED_CALLS[call]
    script(sandbox, Drip(route=route, part="head", interval_s=interval_s))

    received = exchange(sandbox, make_request(auth))

    assert received.status == 200
    assert json.loads(received.body)  # the real answer, whole
    assert received.reads > 1
    # A lower bound only: a loaded machine sleeps longer, never shorter.
    assert received.elapsed_s >= 0.8 * len(received.head) * interval_s


@pytest.mark.parametrize("call", list(DRIPPED_CALLS))
def test_drip_body_sends_the_body_a_byte_per_interval(
    sandbox: SandboxServer, auth: dict[str, dict[str, str]], call: str
) -> None:
    interval_s = 0.002
    route, make_request = DRIPPED_CALLS[call]
    script(sandbox, Drip(route=route, part="body", interval_s=interval_s))

    received = exchange(sandbox, make_request(auth))

    assert received.status == 200
    assert len(received.body) == int(received.header(b"content-length") or 0) > 1
    assert json.loads(received.body)
    assert received.reads > 1
    assert received.elapsed_s >= 0.8 * len(received.body) * interval_s


def test_drip_carries_the_call_out(sandbox: SandboxServer, spaaza_headers: dict[str, str]) -> None:
    script(sandbox, Drip(interval_s=0.001))

    received = exchange(sandbox, spaaza_update(spaaza_headers))

    assert received.status == 200
    assert sandbox.state.stats()["effects"] == {"spaaza.update_task": {"5": 1}}


# --- resets ---


@pytest.mark.parametrize("abortive", [True, False], ids=["rst", "fin"])
def test_reset_before_answer_sends_nothing(
    sandbox: SandboxServer, patching: bytes, abortive: bool
) -> None:
    script(sandbox, Reset(at="before-answer", abortive=abortive))

    received = exchange(sandbox, patching)

    assert received.data == b""
    assert received.reset is abortive


@pytest.mark.parametrize("abortive", [True, False], ids=["rst", "fin"])
def test_reset_after_head_sends_the_head_and_no_body(
    sandbox: SandboxServer, patching: bytes, abortive: bool
) -> None:
    script(sandbox, Reset(at="after-head", abortive=abortive))

    received = exchange(sandbox, patching)

    assert received.status == 200
    assert received.data == received.head
    assert int(received.header(b"content-length") or 0) > 0
    assert received.reset is abortive


@pytest.mark.parametrize("abortive", [True, False], ids=["rst", "fin"])
def test_reset_mid_body_sends_half_the_announced_body(
    sandbox: SandboxServer, patching: bytes, abortive: bool
) -> None:
    script(sandbox, Reset(at="mid-body", abortive=abortive))

    received = exchange(sandbox, patching)

    announced = int(received.header(b"content-length") or 0)
    assert announced > 0
    assert len(received.body) == announced // 2
    assert received.reset is abortive


def test_reset_carries_the_call_out(sandbox: SandboxServer, spaaza_headers: dict[str, str]) -> None:
    script(sandbox, Reset())

    received = exchange(sandbox, spaaza_update(spaaza_headers))

    assert received.data == b""
    assert sandbox.state.stats()["effects"] == {"spaaza.update_task": {"5": 1}}


# --- odd bodies ---


@pytest.mark.parametrize(
    ("fault", "body"),
    [
        (OddBody(shape="deep-objects"), b'{"a":' * 100_000 + b"0" + b"}" * 100_000),
        (OddBody(shape="deep-arrays"), b"[" * 900 + b"]" * 900),
        (OddBody(shape="deep-arrays", depth=3), b"[[[]]]"),
        (OddBody(shape="deep-objects", depth=2), b'{"a":{"a":0}}'),
    ],
    ids=["objects-100000", "arrays-900", "arrays-3", "objects-2"],
)
def test_deep_json_is_nested_as_deep_as_asked(
    sandbox: SandboxServer, patching: bytes, fault: OddBody, body: bytes
) -> None:
    script(sandbox, fault)

    received = exchange(sandbox, patching)

    assert received.status == 200
    assert received.header(b"content-type") == b"application/json"
    assert received.body == body


def test_invalid_json_comes_as_json(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, OddBody(shape="invalid-json"))

    received = exchange(sandbox, patching)

    assert received.header(b"content-type") == b"application/json"
    with pytest.raises(ValueError):
        json.loads(received.body)


def test_huge_body_is_as_large_as_asked_and_valid_json(
    sandbox: SandboxServer, patching: bytes
) -> None:
    size = 5 * 1024 * 1024 + 3
    script(sandbox, OddBody(shape="huge", size_bytes=size))

    received = exchange(sandbox, patching)

    assert received.header(b"content-length") == str(size).encode()
    assert len(received.body) == size
    assert set(json.loads(received.body)) == {"padding"}


def test_other_type_body_is_an_html_page(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, OddBody(shape="other-type"))

    received = exchange(sandbox, patching)

    assert received.header(b"content-type") == b"text/html; charset=utf-8"
    assert received.body.startswith(b"<!DOCTYPE html>")


def test_odd_body_takes_its_status_and_content_type(
    sandbox: SandboxServer, patching: bytes
) -> None:
    script(sandbox, OddBody(shape="deep-arrays", depth=1, status=500, content_type="text/x-odd"))

    received = exchange(sandbox, patching)

    assert (received.status, received.header(b"content-type")) == (500, b"text/x-odd")


# --- echoes ---


@pytest.mark.parametrize("format_", ["vendor", "json", "text"])
def test_echo_repeats_the_authorization_header(
    sandbox: SandboxServer, eset_headers: dict[str, str], format_: str
) -> None:
    script(sandbox, Echo(format=format_))

    received = exchange(sandbox, request("GET", PATCHING, eset_headers))

    assert received.status == 400
    token = eset_headers["Authorization"].encode()
    if format_ == "text":
        assert b"authorization: " + token in received.body
    elif format_ == "vendor":
        assert f"authorization: {eset_headers['Authorization']}" in json.loads(received.body)[
            "message"
        ]
    else:
        headers = json.loads(received.body)["request"]["headers"]
        assert ["authorization", eset_headers["Authorization"]] in headers


def test_echo_on_a_token_route_repeats_the_password(sandbox: SandboxServer) -> None:
    script(sandbox, Echo(route="eset.token", format="json"))

    received = exchange(sandbox, eset_token_request())

    echoed = json.loads(received.body)["request"]
    assert f"password={SandboxConfig().eset_password}" in echoed["body"]
    assert echoed["method"] == "POST"


def test_echo_in_a_success_body(sandbox: SandboxServer, eset_headers: dict[str, str]) -> None:
    script(sandbox, Echo(status=200, format="json"))

    received = exchange(sandbox, request("GET", PATCHING, eset_headers))

    assert received.status == 200
    assert json.loads(received.body)["request"]["target"] == PATCHING


# --- bad tokens ---


def _grant(received: Received) -> object:
    return json.loads(received.body)


@pytest.mark.parametrize(
    ("shape", "check"),
    [
        ("list", lambda grant: isinstance(grant, list) and "access_token" in grant[0]),
        ("no-access-token", lambda grant: "access_token" not in grant and "expires_in" in grant),
        ("crlf-token", lambda grant: grant["access_token"].endswith("\r\nX-Injected: 1")),
        ("control-token", lambda grant: grant["access_token"].endswith("\x00\x07\x1b")),
        ("non-ascii-token", lambda grant: grant["access_token"].endswith("é中")),
        ("expires-string", lambda grant: grant["expires_in"] == "3600"),
        ("expires-null", lambda grant: grant["expires_in"] is None),
        ("expires-negative", lambda grant: grant["expires_in"] == -3600),
        ("expires-huge", lambda grant: grant["expires_in"] == 10**30),
        ("expires-zero", lambda grant: grant["expires_in"] == 0),
    ],
)
@pytest.mark.parametrize("token_request", [eset_token_request, fylr_token_request])
def test_bad_token_mangles_the_grant(
    sandbox: SandboxServer,
    shape: str,
    check: Callable[[object], bool],
    token_request: Callable[[], bytes],
) -> None:
    script(sandbox, BadToken(shape=shape))

    received = exchange(sandbox, token_request())

    assert received.status == 200
    assert received.header(b"content-type") == b"application/json"
    assert check(_grant(received))


def test_bad_token_html_is_a_login_page(sandbox: SandboxServer) -> None:
    script(sandbox, BadToken(shape="html"))

    received = exchange(sandbox, eset_token_request())

    assert received.header(b"content-type") == b"text/html; charset=utf-8"
    assert received.body.startswith(b"<html>")


def test_bad_token_takes_its_status(sandbox: SandboxServer) -> None:
    script(sandbox, BadToken(shape="html", status=503))

    assert exchange(sandbox, fylr_token_request()).status == 503


def test_bad_token_is_built_on_a_real_grant(sandbox: SandboxServer, client: httpx.Client) -> None:
    """The token before the appended characters is live: the grant was issued."""
    script(sandbox, BadToken(shape="crlf-token"))

    grant = json.loads(exchange(sandbox, eset_token_request()).body)
    token = grant["access_token"].split("\r\n")[0]

    assert client.get(PATCHING, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_bad_token_leaves_api_calls_alone(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, BadToken(shape="html"))

    assert exchange(sandbox, patching).status == 200
    assert len(sandbox.state.faults.script) == 1


@pytest.mark.parametrize("route", ["api", "eset", "fylr.cancel"])
def test_bad_token_off_token_routes_is_refused(client: httpx.Client, route: str) -> None:
    fault = {"kind": "bad-token", "route": route}

    assert client.put("/_sandbox/faults", json={"script": [fault]}).status_code == 422


# --- bad Retry-After ---


@pytest.mark.parametrize("value", list(RETRY_AFTER_VALUES.values()), ids=list(RETRY_AFTER_VALUES))
@pytest.mark.parametrize("status", [429, 503])
def test_bad_retry_after_is_sent_as_given(
    sandbox: SandboxServer, patching: bytes, value: str, status: int
) -> None:
    script(sandbox, BadRetryAfter(status=status, value=value))

    received = exchange(sandbox, patching)

    assert received.status == status
    assert received.header(b"retry-after") == value.encode()
    assert json.loads(received.body)["code"] in (8, 14)  # ESET's error body


def test_bad_retry_after_has_the_vendors_error_body(
    sandbox: SandboxServer, fylr_headers: dict[str, str]
) -> None:
    script(sandbox, BadRetryAfter(status=503))

    received = exchange(sandbox, request("GET", FYLR_TASK, fylr_headers))

    assert json.loads(received.body)["statuscode"] == 503


# The sandbox fixture is reset once per test, not per example: each example sets its faults.
ON_THE_SHARED_SANDBOX = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@ON_THE_SHARED_SANDBOX
@given(value=st.text(max_size=200))
def test_any_retry_after_text_goes_out_as_its_utf8_bytes(
    sandbox: SandboxServer, value: str
) -> None:
    script(sandbox, BadRetryAfter(value=value))

    received = exchange(sandbox, request("GET", PATCHING))

    assert b"\r\nretry-after: " + value.encode() + b"\r\n" in received.data


@ON_THE_SHARED_SANDBOX
@given(location=st.text(max_size=300))
def test_any_location_goes_out_as_its_utf8_bytes(sandbox: SandboxServer, location: str) -> None:
    script(sandbox, Redirect(status=307, location=location))

    received = exchange(sandbox, request("GET", PATCHING))

    assert b"\r\nlocation: " + location.encode() + b"\r\n" in received.data


# --- huge headers ---


def test_one_large_header_is_as_large_as_asked(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, HugeHeaders(shape="one-large"))

    received = exchange(sandbox, patching)

    assert received.header(b"x-sandbox-padding") == b"a" * 65536
    assert json.loads(received.body)["patchingDetails"]  # the real answer follows


def test_many_headers_are_as_many_as_asked(sandbox: SandboxServer, patching: bytes) -> None:
    script(sandbox, HugeHeaders(shape="many"))

    received = exchange(sandbox, patching)

    padding = [name for name in received.header_names() if name.startswith(b"x-sandbox-padding-")]
    assert len(padding) == len(set(padding)) == 2000


def test_huge_headers_carry_the_call_out(
    sandbox: SandboxServer, spaaza_headers: dict[str, str]
) -> None:
    script(sandbox, HugeHeaders(shape="many", count=10))

    exchange(sandbox, spaaza_update(spaaza_headers))

    assert sandbox.state.stats()["effects"] == {"spaaza.update_task": {"5": 1}}


# --- which calls, how many, counted ---


def test_a_fault_answers_only_the_route_it_names(
    sandbox: SandboxServer, patching: bytes, fylr_headers: dict[str, str]
) -> None:
    script(sandbox, Redirect(route="fylr.get_task"))

    eset = exchange(sandbox, patching)
    fylr = exchange(sandbox, request("GET", FYLR_TASK, fylr_headers))

    assert (eset.status, fylr.status) == (200, 302)


def test_a_fault_answers_only_paths_containing_its_text(
    sandbox: SandboxServer, fylr_headers: dict[str, str]
) -> None:
    script(sandbox, Redirect(route="fylr", path_contains="/task/18"))

    other = exchange(sandbox, request("GET", FYLR_TASK, fylr_headers))
    matching = exchange(sandbox, request("GET", "/fylr/api/v1/task/18", fylr_headers))

    assert (other.status, matching.status) == (200, 302)


def test_api_faults_leave_token_calls_alone(sandbox: SandboxServer) -> None:
    script(sandbox, Redirect())

    assert exchange(sandbox, eset_token_request()).status == 200
    assert len(sandbox.state.faults.script) == 1


def test_a_fault_answers_as_many_calls_as_its_times(
    sandbox: SandboxServer, patching: bytes
) -> None:
    script(sandbox, Redirect(times=2))

    statuses = [exchange(sandbox, patching).status for _ in range(3)]

    assert statuses == [302, 302, 200]
    assert sandbox.state.faults.script == []


def test_a_fault_without_times_answers_every_call(
    sandbox: SandboxServer, patching: bytes
) -> None:
    script(sandbox, Redirect(times=None))

    statuses = {exchange(sandbox, patching).status for _ in range(5)}

    assert statuses == {302}


def test_status_and_hostile_faults_share_the_script(
    sandbox: SandboxServer, patching: bytes
) -> None:
    """Hostile faults are matched first (at the endpoint), status faults after the gate."""
    script(sandbox, ScriptedFault(503), Redirect())

    statuses = [exchange(sandbox, patching).status for _ in range(3)]

    assert statuses == [302, 503, 200]


def test_served_faults_are_counted_by_route_and_kind(
    sandbox: SandboxServer, patching: bytes
) -> None:
    script(sandbox, Redirect(), Reset(), BadToken(shape="list"))

    exchange(sandbox, patching)
    exchange(sandbox, patching)
    exchange(sandbox, eset_token_request())

    stats = sandbox.state.stats()
    assert stats["hostile"] == {
        "eset.fetch_patching": {"redirect": 1, "reset": 1},
        "eset.token": {"bad-token": 1},
    }
    assert stats["calls"]["eset.fetch_patching"] == 2


def test_nothing_follows_a_hostile_answer_on_its_connection(
    sandbox: SandboxServer, patching: bytes
) -> None:
    """The ASGI response the endpoint returns after writing is dropped, not sent."""
    script(sandbox, PendingId(response_id="empty"))

    received = exchange(sandbox, patching + patching)

    assert received.data.count(b"HTTP/1.1") == 1
    assert received.data.endswith(b"connection: close\r\n\r\n")


def test_every_route_is_named_in_the_route_selector(
    sandbox: SandboxServer, client: httpx.Client
) -> None:
    calls = [
        ("POST", ESET_TOKEN),
        ("POST", "/eset/eu/automation/v1/device_tasks/t:updateTaskTriggers"),
        ("POST", BATCH_DELETE),
        ("GET", PATCHING),
        ("POST", FYLR_TOKEN),
        ("POST", "/fylr/api/v1/task/17/cancel"),
        ("GET", FYLR_TASK),
        ("PUT", SPAAZA_TASK),
    ]
    for method, path in calls:
        client.request(method, path)

    assert set(sandbox.state.stats()["calls"]) == set(ROUTES)


def test_an_app_without_the_sandbox_server_refuses_hostile_faults() -> None:
    app = create_app(SandboxConfig())
    app.state.sandbox.faults = Faults(script=[Redirect()])

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as http:
            return await http.get(PATCHING)

    assert asyncio.run(call()).status_code == 501


# --- from another process: PUT /_sandbox/faults ---

ONE_OF_EACH = [
    ({"kind": "redirect", "status": 308}, lambda r: r.status == 308),
    ({"kind": "pending-id", "response_id": "crlf"}, lambda r: b"\r\nx-injected: 1\r\n" in r.head),
    ({"kind": "drip", "part": "head", "interval_s": 0.001}, lambda r: r.reads > 1),
    ({"kind": "reset", "at": "after-head"}, lambda r: r.reset and r.body == b""),
    ({"kind": "odd-body", "shape": "deep-arrays"}, lambda r: r.body == b"[" * 900 + b"]" * 900),
    ({"kind": "echo", "format": "text"}, lambda r: b"authorization: Bearer" in r.body),
    ({"kind": "bad-retry-after", "value": "1e309"}, lambda r: r.header(b"retry-after") == b"1e309"),
    ({"kind": "huge-headers", "size_bytes": 70000}, lambda r: len(r.head) > 70000),
]

PUT_FAULTS = """
import sys, httpx
response = httpx.put(sys.argv[1] + "/_sandbox/faults", content=sys.argv[2])
sys.exit(0 if response.status_code == 200 else response.status_code)
"""


@pytest.mark.parametrize(("fault", "check"), ONE_OF_EACH, ids=[f["kind"] for f, _ in ONE_OF_EACH])
def test_a_fault_put_from_another_process_is_served(
    sandbox: SandboxServer,
    patching: bytes,
    fault: dict[str, object],
    check: Callable[[Received], bool],
) -> None:
    put = subprocess.run(
        [sys.executable, "-c", PUT_FAULTS, sandbox.base_url, json.dumps({"script": [fault]})],
        capture_output=True, text=True, timeout=60,
    )
    assert put.returncode == 0, put.stderr

    received = exchange(sandbox, patching)

    assert check(received)
    assert sandbox.state.stats()["hostile"]["eset.fetch_patching"] == {fault["kind"]: 1}


def test_a_bad_token_put_from_another_process_is_served(sandbox: SandboxServer) -> None:
    fault = {"kind": "bad-token", "route": "fylr.token", "shape": "expires-string"}
    put = subprocess.run(
        [sys.executable, "-c", PUT_FAULTS, sandbox.base_url, json.dumps({"script": [fault]})],
        capture_output=True, text=True, timeout=60,
    )
    assert put.returncode == 0, put.stderr

    received = exchange(sandbox, fylr_token_request())

    assert isinstance(json.loads(received.body)["expires_in"], str)


def test_hostile_faults_read_back_as_they_were_put(client: httpx.Client) -> None:
    script = [{"kind": "drip", "part": "head", "interval_s": 0.5, "times": None}, {"status": 503}]

    client.put("/_sandbox/faults", json={"script": script})
    read = client.get("/_sandbox/faults").json()["script"]

    assert read[0] == {"kind": "drip", "route": "api", "path_contains": None, "times": None,
                       "part": "head", "interval_s": 0.5}
    assert read[1]["status"] == 503


FAULT_FIELDS = ["kind", "route", "times", "status", "location", "response_id", "length", "part",
                "interval_s", "at", "abortive", "shape", "depth", "size_bytes", "content_type",
                "format", "value", "count", "path_contains", "surprise"]
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.sampled_from(["redirect", "pending-id", "drip", "reset", "odd-body", "echo", "bad-token",
                     "bad-retry-after", "huge-headers", "api", "token", "head", "mid-body"]),
)


@settings(max_examples=150, deadline=None)
@given(fault=st.dictionaries(st.sampled_from(FAULT_FIELDS), JSON_SCALARS, max_size=6))
def test_any_fault_json_is_taken_or_refused_with_422(
    client: httpx.Client, fault: dict[str, object]
) -> None:
    response = client.put("/_sandbox/faults", json={"script": [fault]})

    assert response.status_code in (200, 422)


# --- the command line ---


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[Callable[..., Address]]:
    """Start `command-relay sandbox ARGS…` on a free port; stopped after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Address:
        address = Address("127.0.0.1", free_port())
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "sandbox", "--port", str(address.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        started.append(process)
        _wait_answering(address, process)
        return address

    yield start
    for process in started:
        process.terminate()
        process.communicate(timeout=30)


def _wait_answering(address: Address, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sandbox exited: {process.communicate()}")
        try:
            httpx.get(f"http://{address.host}:{address.port}/_sandbox/stats", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the sandbox did not answer within 60 s")


def test_cli_serves_a_hostile_profile_on_every_call(
    sandbox_process: Callable[..., Address],
) -> None:
    address = sandbox_process("--hostile", "redirect-control")

    first = exchange(address, request("GET", PATCHING))
    second = exchange(address, request("GET", PATCHING))

    assert (first.status, second.status) == (307, 307)
    assert first.header(b"location") == b"/_sandbox/reset"


def test_cli_serves_a_fault_given_as_json(sandbox_process: Callable[..., Address]) -> None:
    fault = {"kind": "pending-id", "response_id": "lf"}
    address = sandbox_process("--hostile", json.dumps(fault))

    received = exchange(address, request("GET", PATCHING))

    assert b"\r\nresponse-id: resp-\n-id\r\n" in received.head
    stats = httpx.get(f"http://{address.host}:{address.port}/_sandbox/stats").json()
    assert stats["hostile"] == {
        "eset.fetch_patching": {"pending-id": 1}
    }


def test_cli_serves_faults_from_a_file(
    sandbox_process: Callable[..., Address], tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"kind": "bad-retry-after", "value": "-5", "times": None}]))
    address = sandbox_process("--hostile", str(faults))

    received = exchange(address, request("GET", FYLR_TASK))

    assert (received.status, received.header(b"retry-after")) == (429, b"-5")


def test_cli_refuses_an_unknown_profile_in_a_line_or_two() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "sandbox", "--hostile", "no-such-profile"],
        capture_output=True, text=True, timeout=60,
    )

    assert_said_in_a_line_or_two(done, "no-such-profile", "--list-hostile")


def test_cli_lists_every_profile_with_its_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "sandbox", "--list-hostile"],
        capture_output=True, text=True, timeout=60,
    )

    names = [line.split(":")[0] for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert done.returncode == 0
    assert names == list(PROFILES)
    assert all(json.loads(line)["kind"] for line in done.stdout.splitlines() if line[:2] == "  ")
