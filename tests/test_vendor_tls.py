"""Vendor calls over TLS: the sandbox served over HTTPS with a certificate made by the
test (for ``localhost``, from a CA no trust store knows), reached directly and through a
local CONNECT proxy; and ``https://`` as the only scheme of a tenant not marked sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvicorn

from schemas.events import ErrorCode
from worker.errors import PermanentFailure
from worker.ops.http_server import uvicorn_config
from worker.sandbox import SandboxConfig, SandboxState, create_app
from worker.sandbox.worker_setup import sandbox_tenant
from worker.settings import Settings, Tenant

from .command_line import cli_env, run_cli
from .test_tls_settings import problems
from .test_vendor_calls import MAKERS, execute, failed, succeeded

START_TIMEOUT_S = 10.0
VARIANTS = ["spaaza-update-triggers", "cancel-task", "batch-delete"]


class HttpsSandbox:
    """The sandbox on a free loopback port, over HTTPS only, with ``cert``."""

    def __init__(self, cert: trustme.LeafCert, directory: Path) -> None:
        cert.private_key_and_cert_chain_pem.write_to_path(directory / "server.pem")
        self.state = SandboxState(SandboxConfig(pending_s=0.1))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        app = create_app(self.state.config, self.state)
        self._server = uvicorn.Server(
            uvicorn_config(app, ssl_certfile=str(directory / "server.pem"))
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> HttpsSandbox:
        self._thread.start()
        give_up_at = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < give_up_at, "no sandbox"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"


class ConnectProxy:
    """A forward proxy that only tunnels (``CONNECT``), and only to this machine,
    recording each request line and its ``Proxy-Authorization``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._tunnels: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._serve(),), daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        assert self._started.wait(START_TIMEOUT_S), "no proxy"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._tunnel, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._started.set()
        async with server:
            await self._stop.wait()
        # Kept-alive tunnels outlive the server: end them here, not at interpreter exit.
        for task in self._tunnels:
            task.cancel()
        await asyncio.gather(*self._tunnels, return_exceptions=True)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        fields = (line.partition(":") for line in head[1:] if line)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        self.requests.append((f"{method} {target}", headers.get("proxy-authorization")))
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or host not in ("localhost", "127.0.0.1"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vendor-ca") / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


@pytest.fixture(scope="module")
def https_sandbox(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpsSandbox]:
    with HttpsSandbox(ca.issue_cert("localhost"), tmp_path_factory.mktemp("vendor")) as server:
        yield server


@pytest.fixture
def sandbox(https_sandbox: HttpsSandbox) -> HttpsSandbox:
    https_sandbox.state.reset()
    return https_sandbox


def https_settings(sandbox: HttpsSandbox, host: str = "localhost", **overrides: Any) -> Settings:
    """Every account of tenant ``default`` at the HTTPS sandbox, the tenant not a sandbox."""
    base = sandbox.url(host)
    tenant = sandbox_tenant(base, sandbox.state.config).model_dump()
    return Settings(
        eset_host_template=f"{base}/eset/{{region}}/{{service}}",
        tenants={"default": Tenant.model_validate({**tenant, "sandbox": False})},
        retry_initial_wait_s=0.01,
        collect_interval_s=0.05,
        **overrides,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_certificate_from_an_unknown_ca_fails_for_good_without_a_retry(
    sandbox: HttpsSandbox, variant: str
) -> None:
    """Spaaza's refusal comes with the call itself, fylr's and ESET's with the token
    request: either way once, not as a transient error retried up to the cap."""
    outcome = execute(https_settings(sandbox), MAKERS[variant]())[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_UNAVAILABLE)
    assert not error.retryable and not error.info().retryable
    assert outcome.budget.attempts == 1
    where = {"spaaza-update-triggers": "spaaza", "cancel-task": "fylr token endpoint",
             "batch-delete": "eset token endpoint"}[variant]
    assert error.message == (
        f"{where} presented a TLS certificate that was refused (unable to get local issuer "
        "certificate); if a private CA (or a TLS-inspecting proxy) signs it, set "
        "RELAY_VENDOR_TLS_CA_FILE to that CA's PEM file, else check the tenant's host"
    )
    assert sandbox.state.stats()["calls"] == {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_with_the_ca_setting_every_vendor_is_called_over_https(
    sandbox: HttpsSandbox, ca_file: Path, variant: str
) -> None:
    outcome = execute(https_settings(sandbox, vendor_tls_ca_file=ca_file), MAKERS[variant]())[0]
    assert succeeded(outcome).status == 200
    assert outcome.budget.attempts == 1


def test_a_certificate_for_another_name_fails_for_good(
    sandbox: HttpsSandbox, ca_file: Path
) -> None:
    settings = https_settings(sandbox, host="127.0.0.1", vendor_tls_ca_file=ca_file)
    outcome = execute(settings, MAKERS["spaaza-update-triggers"]())[0]
    error = failed(outcome, PermanentFailure, ErrorCode.VENDOR_UNAVAILABLE)
    assert "(IP address mismatch, certificate is not valid for '127.0.0.1')" in error.message
    assert outcome.budget.attempts == 1


def test_vendor_calls_go_through_the_proxy_with_its_credentials(
    sandbox: HttpsSandbox, ca_file: Path
) -> None:
    with ConnectProxy() as proxy:
        settings = https_settings(
            sandbox, vendor_tls_ca_file=ca_file,
            vendor_proxy_url=f"http://relay:pr%40xy@127.0.0.1:{proxy.port}",
        )
        outcomes = execute(settings, MAKERS["cancel-task"](), MAKERS["spaaza-update-triggers"]())
    for outcome in outcomes:
        succeeded(outcome)
    credentials = "Basic " + base64.b64encode(b"relay:pr@xy").decode()
    assert proxy.requests  # one tunnel per connection (fylr's token and call may share one)
    assert set(proxy.requests) == {(f"CONNECT localhost:{sandbox.port}", credentials)}


def test_the_proxy_url_is_a_secret(sandbox: HttpsSandbox) -> None:
    settings = https_settings(sandbox, vendor_proxy_url="http://relay:s3cret@proxy:3128")
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(settings.tls)


# --- https:// only, unless the tenant is a sandbox ---

FYLR = {"client_id": "client", "client_secret": "secret"}
ESET = {"username": "api@example.com", "password": "secret"}



@pytest.mark.parametrize("vendor", ["fylr", "spaaza"])
def test_a_plain_http_base_url_is_refused(vendor: str) -> None:
    account = {"base_url": "http://vendor.example", **(FYLR if vendor == "fylr" else {
        "token_id": "id", "token_secret": "secret"})}
    assert problems(tenants={"acme": {vendor: account}}) == [
        f"error: RELAY_TENANTS__ACME__{vendor.upper()}: its base_url is not an https:// URL: "
        "vendor calls go over TLS only; use https://, or mark the tenant as a sandbox or "
        "test endpoint (SANDBOX=true); see the configuration table in README.md"
    ]
    assert problems(tenants={"acme": {vendor: account, "sandbox": True}}) == []


def test_a_plain_http_eset_template_is_refused_for_tenants_with_eset() -> None:
    template = "http://{region}.{service}.eset.example"
    assert problems(eset_host_template=template, tenants={"acme": {"eset": ESET}}) == [
        "error: RELAY_TENANTS: RELAY_ESET_HOST_TEMPLATE is not an https:// URL, and acme has "
        "an ESET account: vendor calls go over TLS only; use https://, or mark the tenant as a "
        "sandbox or test endpoint (SANDBOX=true); see the configuration table in README.md"
    ]
    sandboxed = {"acme": {"eset": ESET, "sandbox": True}, "other": {"fylr": {
        "base_url": "https://fylr.example", **FYLR}}}
    assert problems(eset_host_template=template, tenants=sandboxed) == []


def test_the_sandbox_mark_comes_from_the_environment_and_check_reports_the_rest(
    tmp_path: Path,
) -> None:
    env = cli_env(
        tmp_path,
        RELAY_TENANTS__LAB__SANDBOX="true",
        RELAY_TENANTS__LAB__FYLR__BASE_URL="http://127.0.0.1:9",
        RELAY_TENANTS__LAB__FYLR__CLIENT_ID="client",
        RELAY_TENANTS__LAB__FYLR__CLIENT_SECRET="secret",
        RELAY_TENANTS__ACME__SPAAZA__BASE_URL="http://spaaza.example",
        RELAY_TENANTS__ACME__SPAAZA__TOKEN_ID="id",
        RELAY_TENANTS__ACME__SPAAZA__TOKEN_SECRET="secret",
    )
    done = run_cli("check", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: RELAY_TENANTS__ACME__SPAAZA: its base_url is not an https:// URL: vendor "
        "calls go over TLS only; use https://, or mark the tenant as a sandbox or test "
        "endpoint (SANDBOX=true); see the configuration table in README.md"
    ]
