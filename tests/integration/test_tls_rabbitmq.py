"""``amqps://`` against a real RabbitMQ TLS listener, with certificates made by the test.

The listeners are started on the running node for this module only, through
``rabbitmqctl eval`` (``rabbit_networking:start_ssl_listener``), on free loopback ports,
with the certificate and key handed over as DER (no file the broker's user must read),
and stopped afterwards. One has a certificate for ``localhost``, one for
``wrong.example`` (from the same CA), one for ``localhost`` that requires a client
certificate. Without ``rabbitmqctl`` for the local node the tests skip, and fail under CI.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.rig.procs import free_port
from worker.broker.connection import BrokerCertificateRefused, connect
from worker.sandbox import SandboxServer
from worker.sandbox.worker_setup import demo_commands
from worker.settings import TlsFiles

from ..chaos.broker import RabbitCtl
from ..command_line import assert_said_in_a_line_or_two, cli_env, run_cli
from ..harness import running_relay
from ..servers import unavailable

pytestmark = pytest.mark.integration

CTL_TIMEOUT_S = 60


@dataclass(frozen=True)
class TlsBroker:
    """The module's TLS listeners and the files of the CA that signed their certificates."""

    user: str
    password: str
    port: int  # certificate for localhost
    wrong_name_port: int  # certificate for wrong.example
    client_cert_port: int  # certificate for localhost; a client certificate is required
    ca: TlsFiles  # the CA file only
    client: TlsFiles  # the CA file, and a client certificate and key the listener trusts

    def url(self, host: str = "localhost", port: int | None = None) -> str:
        return f"amqps://{self.user}:{self.password}@{host}:{port or self.port}//"


def _eval(ctl: RabbitCtl, expression: str) -> str:
    return ctl.run("-q", "eval", expression, timeout_s=CTL_TIMEOUT_S).strip()


def _binary(der: bytes) -> str:
    """An Erlang binary of ``der``."""
    return f'base64:decode(<<"{base64.b64encode(der).decode()}">>)'


def _ssl_options(cert: trustme.LeafCert, ca: trustme.CA | None) -> str:
    """The listener's TLS options: its certificate and key; with ``ca``, client
    certificates signed by it are required."""
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    options = [
        f"{{cert, {_binary(leaf.public_bytes(serialization.Encoding.DER))}}}",
        f"{{key, {{'PrivateKeyInfo', {_binary(key_der)}}}}}",
    ]
    if ca is not None:
        ca_der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(
            serialization.Encoding.DER
        )
        options += [
            "{verify, verify_peer}", "{fail_if_no_peer_cert, true}",
            f"{{cacerts, [{_binary(ca_der)}]}}",
        ]
    return f"[{', '.join(options)}]"


@pytest.fixture(scope="module")
def tls_broker(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if urlsplit(amqp_url).hostname not in ("localhost", "127.0.0.1", "::1"):
        unavailable(f"the TLS listener is started on this machine's node, not {amqp_url}")
    ctl = RabbitCtl.find()
    if ctl is None:
        unavailable("rabbitmqctl is not usable here (bash .ci/services installs RabbitMQ)")
        return
    ca = trustme.CA()
    client_ca = trustme.CA()
    directory = tmp_path_factory.mktemp("broker-tls")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    client = client_ca.issue_cert("relay-worker")
    client.cert_chain_pems[0].write_to_path(directory / "client.pem")
    client.private_key_pem.write_to_path(directory / "client.key")
    ports = [free_port() for _ in range(3)]
    listeners = [
        (ports[0], ca.issue_cert("localhost"), None),
        (ports[1], ca.issue_cert("wrong.example"), None),
        (ports[2], ca.issue_cert("localhost"), client_ca),
    ]
    started: list[int] = []
    try:
        for port, cert, peer_ca in listeners:
            result = _eval(ctl, f'rabbit_networking:start_ssl_listener({{"127.0.0.1", {port}}}, '
                                f"{_ssl_options(cert, peer_ca)}, 1).")
            assert result == "ok", result
            started.append(port)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        for port in started:
            _eval(ctl, f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", {port}}}).')
        unavailable(f"no TLS listener could be started on the local RabbitMQ ({error})")
    parts = urlsplit(amqp_url)
    ca_file = TlsFiles(directory / "ca.pem", None, None)
    try:
        yield TlsBroker(
            user=parts.username or "guest", password=parts.password or "guest",
            port=ports[0], wrong_name_port=ports[1], client_cert_port=ports[2], ca=ca_file,
            client=TlsFiles(directory / "ca.pem", directory / "client.pem",
                            directory / "client.key"),
        )
    finally:
        for port in started:
            _eval(ctl, f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", {port}}}).')


def _connect(url: str, tls: TlsFiles | None) -> dict[str, Any]:
    """Connect and open a channel; the broker's certificate, as the TLS socket saw it."""
    with connect(url, heartbeat_s=0, tls=tls) as connection:
        connection.connect()
        connection.channel().close()
        sock = connection.connection.transport.sock
        assert isinstance(sock, ssl.SSLSocket)
        return dict(sock.getpeercert() or {})


def _refusal(url: str, tls: TlsFiles | None) -> BrokerCertificateRefused:
    with pytest.raises(ssl.SSLCertVerificationError) as raised:
        _connect(url, tls)
    refused = BrokerCertificateRefused.behind(raised.value, url)
    assert refused is not None
    return refused


def test_the_broker_s_own_name_and_ca_connect(tls_broker: TlsBroker) -> None:
    certificate = _connect(tls_broker.url("localhost"), tls_broker.ca)
    assert certificate["subjectAltName"] == (("DNS", "localhost"),)


def test_a_certificate_for_another_name_is_refused(tls_broker: TlsBroker) -> None:
    """The issue's case: a certificate from the trusted CA, but for wrong.example."""
    url = tls_broker.url("localhost", tls_broker.wrong_name_port)
    refused = _refusal(url, tls_broker.ca)
    assert refused.problem == (
        f"the broker at localhost:{tls_broker.wrong_name_port} presented a TLS certificate "
        "that was refused (Hostname mismatch, certificate is not valid for 'localhost')"
    )
    assert "RELAY_BROKER_URL" in refused.fix


def test_an_address_the_certificate_does_not_name_is_refused(tls_broker: TlsBroker) -> None:
    """kombu would check (if at all) 127.0.0.1 for localhost; the URL's own host counts."""
    refused = _refusal(tls_broker.url("127.0.0.1"), tls_broker.ca)
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in refused.problem
    assert "RELAY_BROKER_URL" in refused.fix


@pytest.mark.parametrize("trusted", ["system CAs", "another CA"])
def test_a_certificate_from_an_untrusted_ca_is_refused(
    tls_broker: TlsBroker, tmp_path: Path, trusted: str
) -> None:
    tls = None
    if trusted == "another CA":
        trustme.CA().cert_pem.write_to_path(tmp_path / "other-ca.pem")
        tls = TlsFiles(tmp_path / "other-ca.pem", None, None)
    refused = _refusal(tls_broker.url("localhost"), tls)
    assert "unable to get local issuer certificate" in refused.problem
    assert refused.fix.startswith("set RELAY_BROKER_TLS_CA_FILE to the PEM file of the CA")


def test_a_client_certificate_is_presented(tls_broker: TlsBroker) -> None:
    url = tls_broker.url("localhost", tls_broker.client_cert_port)
    _connect(url, tls_broker.client)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the listener wants one
        _connect(url, tls_broker.ca)


def test_a_worker_over_tls_round_trips_commands(
    tls_broker: TlsBroker, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Consumer, lanes (ESET's rate limit gives it one), publisher and client, all on
    amqps:// with the CA setting."""
    with running_relay(
        sandbox, broker_url=tls_broker.url(), broker_tls_ca_file=tls_broker.ca.ca_file,
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
    ) as relay:
        sent = {relay.send(command) for command in demo_commands()}
        events = relay.events(len(sent))
        topology = relay.service.consumer.topology
    assert {event.data.command_id for event in events} == sent
    assert {event.data.outcome for event in events} == {"succeeded"}
    with connect(tls_broker.url(), tls=tls_broker.ca) as connection:  # leave no queue behind
        channel = connection.channel()
        for queue in topology.queues:
            channel.queue_delete(queue.name)
        for exchange in (relay.settings.command_exchange, relay.settings.event_exchange):
            channel.exchange_delete(exchange)


def _names() -> dict[str, str]:
    """Queue names of the test's own, in case it connected when it should not have."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "RELAY_COMMAND_EXCHANGE": f"test.commands.{suffix}",
        "RELAY_COMMAND_QUEUE": f"test.commands.{suffix}",
        "RELAY_EVENT_EXCHANGE": f"test.events.{suffix}",
        "RELAY_DEAD_LETTER_QUEUE": f"test.commands.dead.{suffix}",
    }


@pytest.mark.parametrize("command", [["run"], ["send", "fetch-patching"]])
def test_a_refused_certificate_is_said_in_two_lines(
    tls_broker: TlsBroker, tmp_path: Path, command: list[str]
) -> None:
    """No reconnect loop: the worker (and the client) stop, saying what to fix."""
    env = cli_env(
        tmp_path,
        RELAY_BROKER_URL=tls_broker.url("127.0.0.1"),
        RELAY_BROKER_TLS_CA_FILE=str(tls_broker.ca.ca_file),
        RELAY_LOG_LEVEL="ERROR",  # only what the command line says, not the start-up lines
        **_names(),
    )
    done = run_cli(*command, env=env, timeout_s=60)
    assert_said_in_a_line_or_two(
        done, f"error: the broker at 127.0.0.1:{tls_broker.port} presented a TLS certificate "
        "that was refused (IP address mismatch", "fix: name the server in RELAY_BROKER_URL",
    )


def test_check_probe_names_the_setting_to_fix(tls_broker: TlsBroker, tmp_path: Path) -> None:
    env = cli_env(tmp_path, RELAY_BROKER_URL=tls_broker.url("localhost"))
    done = run_cli("check", "--probe", env=env, timeout_s=60)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "RELAY_BROKER_URL:" in line]
    assert line.startswith("error: RELAY_BROKER_URL: the broker at localhost:")
    assert "unable to get local issuer certificate" in line
    assert "set RELAY_BROKER_TLS_CA_FILE" in line
    env["RELAY_BROKER_TLS_CA_FILE"] = str(tls_broker.ca.ca_file)
    done = run_cli("check", "--probe", env=env, timeout_s=60)
    assert f"ok: RELAY_BROKER_URL: amqps://localhost:{tls_broker.port}// answers" in done.stdout
