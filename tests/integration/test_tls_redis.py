"""``rediss://`` for the idempotency and rate-limit stores, against a ``redis-server`` of
the test's own with certificates made by the test.

The server listens on a free loopback port with TLS only, a certificate for
``localhost``, and wants a client certificate (``--tls-auth-clients yes``), so every
connection that works shows the CA, certificate and key settings in use. A
``redis-server`` built without TLS makes the tests skip, and fail under CI.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from bench.rig.procs import free_port
from worker.errors import StoreUnavailable
from worker.idempotency import Claimed, open_store
from worker.ops.outage import Outage
from worker.settings import Settings, TlsFiles
from worker.vendors.ratelimit import RateLimits

from ..command_line import assert_said_in_a_line_or_two, cli_env, run_cli
from ..servers import unavailable

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TlsRedis:
    port: int
    files: TlsFiles  # the CA of the server's certificate, and a client certificate and key

    def url(self, host: str = "localhost") -> str:
        return f"rediss://{host}:{self.port}/0"

    def variables(self) -> dict[str, str]:
        return {
            "RELAY_REDIS_TLS_CA_FILE": str(self.files.ca_file),
            "RELAY_REDIS_TLS_CERT_FILE": str(self.files.cert_file),
            "RELAY_REDIS_TLS_KEY_FILE": str(self.files.key_file),
        }


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
    if binary is None:
        unavailable("redis-server is not installed (bash .ci/services installs it)")
        return
    directory = tmp_path_factory.mktemp("redis-tls")
    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    client = client_ca.issue_cert("relay-worker")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    client_ca.cert_pem.write_to_path(directory / "client-ca.pem")
    server.cert_chain_pems[0].write_to_path(directory / "server.pem")
    server.private_key_pem.write_to_path(directory / "server.key")
    client.cert_chain_pems[0].write_to_path(directory / "client.pem")
    client.private_key_pem.write_to_path(directory / "client.key")
    port = free_port()
    log_path = directory / "redis.log"
    argv = [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(directory / "server.pem"),
        "--tls-key-file", str(directory / "server.key"),
        "--tls-ca-cert-file", str(directory / "client-ca.pem"),
        "--tls-auth-clients", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        _wait_listening(process, port, log_path)
        yield TlsRedis(port, TlsFiles(directory / "ca.pem", directory / "client.pem",
                                      directory / "client.key"))
    finally:
        process.kill()
        process.wait(10)


def _wait_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    give_up_at = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < give_up_at:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            if "tls" in log.lower():  # e.g. "TLS not supported", a build without BUILD_TLS
                unavailable(f"this redis-server has no TLS support: {log.strip()[-300:]}")
            raise RuntimeError(f"redis-server exited at start:\n{log[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen within {START_TIMEOUT_S:g}s")


def _claim(url: str, tls: TlsFiles | None) -> object:
    async def claim() -> object:
        store = open_store(url, lease_s=30, retention_s=60, tls=tls)
        try:
            return await store.claim(f"test-{uuid.uuid4()}", "a" * 64, "this-worker")
        finally:
            await store.close()

    return asyncio.run(claim())


def _refused(url: str, tls: TlsFiles | None) -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as raised:
        _claim(url, tls)
    return raised.value


def test_the_idempotency_store_works_over_tls(tls_redis: TlsRedis) -> None:
    assert isinstance(_claim(tls_redis.url(), tls_redis.files), Claimed)


def test_the_rate_limit_store_works_over_tls(
    tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the settings as the worker reads them (RELAY_REDIS_TLS_*)."""
    monkeypatch.setenv("RELAY_RATE_LIMIT_URL", tls_redis.url())
    for name, value in tls_redis.variables().items():
        monkeypatch.setenv(name, value)

    async def reserve() -> float:
        pacer = RateLimits(Settings().rate_limit, Outage({})).pacer
        await pacer.ping()
        return await pacer.reserve(f"test-{uuid.uuid4()}", 0.1)

    assert asyncio.run(reserve()) == 0.0


def test_an_address_the_certificate_does_not_name_is_refused(tls_redis: TlsRedis) -> None:
    """The name is checked whatever redis-py's default (before redis-py 6: unchecked)."""
    refused = _refused(tls_redis.url("127.0.0.1"), tls_redis.files)
    assert refused.message == (
        "the idempotency store's TLS certificate was refused (IP address mismatch, "
        "certificate is not valid for '127.0.0.1'); name the server in "
        "RELAY_IDEMPOTENCY_URL as its certificate does (the name is always checked), or "
        "give it a certificate for the name used"
    )


def test_a_certificate_from_an_untrusted_ca_is_refused(tls_redis: TlsRedis) -> None:
    files = tls_redis.files
    refused = _refused(tls_redis.url(), TlsFiles(None, files.cert_file, files.key_file))
    assert "(unable to get local issuer certificate)" in refused.message
    assert "set RELAY_REDIS_TLS_CA_FILE to the PEM file of the CA" in refused.message


def test_the_client_certificate_is_presented(tls_redis: TlsRedis) -> None:
    """The server wants one: without it, it hangs up (an outage, not a certificate of
    its own that was refused)."""
    refused = _refused(tls_redis.url(), TlsFiles(tls_redis.files.ca_file, None, None))
    assert "certificate was refused" not in refused.message


def test_the_command_line_uses_the_settings_and_names_the_one_to_fix(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, RELAY_IDEMPOTENCY_URL=tls_redis.url(), **tls_redis.variables())
    done = run_cli("result", str(uuid.uuid4()), env=env)
    assert done.returncode == 4, done.stdout + done.stderr  # asked, and unknown
    env["RELAY_IDEMPOTENCY_URL"] = tls_redis.url("127.0.0.1")
    done = run_cli("result", str(uuid.uuid4()), env=env)
    assert_said_in_a_line_or_two(
        done, f"error: the idempotency store at rediss://127.0.0.1:{tls_redis.port}/0 "
        "presented a TLS certificate that was refused (IP address mismatch",
        "fix: name the server in RELAY_IDEMPOTENCY_URL",
    )


def test_plain_redis_is_not_what_answers(tls_redis: TlsRedis) -> None:
    """The port speaks TLS only: what answered above did so over TLS."""
    with pytest.raises(redis.RedisError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=2).ping()
