"""The TLS settings as the worker reads them, and the options they become for py-amqp
and redis-py (the servers themselves: ``tests/integration/test_tls_*.py``)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.admin.config import validation_problems
from worker.broker.connection import connect, tls_options
from worker.idempotency.redis import tls_options as redis_tls_options
from worker.settings import Settings, TlsFiles

README_TABLE = "see the configuration table in README.md"


def problems(**values: Any) -> list[str]:
    """What ``check`` (and ``run``) says of these settings."""
    try:
        Settings(**values)
    except ValidationError as error:
        return [str(problem) for problem in validation_problems(error)]
    return []


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(
    ("name", "url", "server"),
    [
        ("broker_url", "amqps://relay:pw@broker.example//?ssl_ca_certs=/ca.pem", "BROKER"),
        ("broker_url", "amqp://broker.example:5671//?ssl=1", "BROKER"),
        ("idempotency_url", "rediss://redis.example/0?ssl_cert_reqs=none", "REDIS"),
        ("rate_limit_url", "rediss://redis.example/1?ssl_check_hostname=false", "REDIS"),
    ],
)
def test_tls_options_in_a_url_are_refused(name: str, url: str, server: str) -> None:
    """kombu passed them on to py-amqp, which failed with a TypeError; redis-py let them
    turn the checks off."""
    assert problems(**{name: url}) == [
        f"error: RELAY_{name.upper()}: TLS options in the URL (?ssl…) are not read: remove "
        f"them, and set RELAY_{server}_TLS_CA_FILE, _CERT_FILE or _KEY_FILE instead; "
        f"{README_TABLE}"
    ]


def test_tls_files_without_a_tls_url_are_refused(pem: Path) -> None:
    assert problems(broker_url="amqp://broker.example//", broker_tls_ca_file=pem) == [
        "error: RELAY_BROKER_TLS_CA_FILE: is set, but RELAY_BROKER_URL does not use amqps://: "
        f"use amqps://; {README_TABLE}"
    ]
    assert problems(idempotency_url="redis://redis.example/0", redis_tls_ca_file=pem) == [
        "error: RELAY_REDIS_TLS_CA_FILE: is set, but RELAY_IDEMPOTENCY_URL or "
        f"RELAY_RATE_LIMIT_URL does not use rediss://: use rediss://; {README_TABLE}"
    ]
    # One rediss:// store is enough: the files are used for it.
    assert problems(idempotency_url="redis://redis.example/0",
                    rate_limit_url="rediss://redis.example/1", redis_tls_ca_file=pem) == []


def test_a_key_without_its_certificate_and_a_missing_file_are_refused(
    pem: Path, tmp_path: Path
) -> None:
    assert problems(broker_url="amqps://broker.example//", broker_tls_key_file=pem) == [
        "error: RELAY_BROKER_TLS_KEY_FILE: a key without its certificate: set "
        f"RELAY_BROKER_TLS_CERT_FILE too; {README_TABLE}"
    ]
    missing = tmp_path / "nowhere.pem"
    assert problems(broker_url="amqps://broker.example//", broker_tls_ca_file=missing) == [
        f"error: RELAY_BROKER_TLS_CA_FILE: Path does not point to a file; {README_TABLE}"
    ]


def test_the_settings_reach_every_group(pem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "RELAY_BROKER_URL": "amqps://broker.example//",
        "RELAY_BROKER_TLS_CA_FILE": str(pem),
        "RELAY_BROKER_TLS_CERT_FILE": str(pem),
        "RELAY_RATE_LIMIT_URL": "rediss://redis.example/1",
        "RELAY_REDIS_TLS_CA_FILE": str(pem),
        "RELAY_VENDOR_TLS_CA_FILE": str(pem),
        "RELAY_VENDOR_PROXY_URL": "http://relay:s3cret@proxy.example:3128",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.consumer.broker_tls == TlsFiles(pem, pem, None) == settings.tls.broker
    assert settings.rate_limit.storage_tls == TlsFiles(pem, None, None) == settings.tls.redis
    assert settings.tls.vendor_ca_file == pem
    proxy = settings.tls.vendor_proxy_url
    assert proxy is not None and proxy.get_secret_value().endswith("@proxy.example:3128")
    assert "s3cret" not in repr(settings.tls)


def test_amqps_asks_for_the_certificate_and_the_url_s_host_name(pem: Path) -> None:
    """py-amqp checks the name only when given server_hostname; kombu would give it
    127.0.0.1 for localhost (and passes none of its own)."""
    assert tls_options("amqps://relay:pw@localhost:5671//", None) == {
        "server_hostname": "localhost", "cert_reqs": ssl.CERT_REQUIRED,
    }
    key = pem.with_name("client.key")
    assert tls_options("amqps://broker.example//", TlsFiles(pem, pem, key)) == {
        "server_hostname": "broker.example", "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": str(pem), "certfile": str(pem), "keyfile": str(key),
    }
    assert tls_options("amqp://broker.example//", TlsFiles(pem, None, None)) is None
    connection = connect("amqps://relay:pw@localhost:5671//", heartbeat_s=0)
    assert connection.ssl == {"server_hostname": "localhost", "cert_reqs": ssl.CERT_REQUIRED}
    assert connect("amqp://localhost//", heartbeat_s=0).ssl is False


def test_rediss_checks_the_name_whatever_redis_py_s_default(pem: Path) -> None:
    """redis-py before 6 checked no name by default."""
    assert redis_tls_options("rediss://redis.example/0", None) == {
        "ssl_cert_reqs": "required", "ssl_check_hostname": True,
    }
    assert redis_tls_options("rediss://redis.example/0", TlsFiles(pem, None, None)) == {
        "ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": str(pem),
    }
    assert redis_tls_options("redis://redis.example/0", TlsFiles(pem, None, None)) == {}
