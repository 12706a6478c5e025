"""Secrets from files, and secrets never shown.

Any setting can be given as a file: ``RELAY_X_FILE`` (Docker secrets) or a file named
``RELAY_X`` in ``RELAY_SECRETS_DIR`` (a Kubernetes Secret mounted as a volume, nested
names included). No configuration error shows a secret, however it was given (a tenant
missing its username beside its password, a URL that does not parse with a password in
it, a file whose value does not validate), a URL's credentials are kept out of span
attributes and log lines, and `run` with its secrets in files logs none of them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.commands import Command, parse_command
from worker.ops.logs import handler_for, redact
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry
from worker.sandbox import SandboxServer
from worker.secret_files import file_variable_target
from worker.settings import Settings, SpaazaAccount, Tenant
from worker.vendors import Vendors
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import CallBudget

from .command_line import cli_env, run_cli, sandbox_variables
from .test_cli_run import wait_for

SECRET = "S3cret-Never-Shown"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RELAY_* variable of this process reaches the settings the test makes."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("RELAY_"):
            monkeypatch.delenv(name)
    return monkeypatch


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_any_setting_can_come_from_a_file_variable(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
):
    env = clean_environment
    env.setenv("RELAY_TENANTS__ACME__ESET__USERNAME", "api@acme.example")
    env.setenv("RELAY_TENANTS__ACME__ESET__PASSWORD_FILE", write(tmp_path / "eset", f"{SECRET}\n"))
    env.setenv("RELAY_BROKER_URL_FILE",
               write(tmp_path / "broker", f"amqp://relay:{SECRET}@rabbit:5672/prod\n"))
    env.setenv("RELAY_IDEMPOTENCY_URL_FILE",
               write(tmp_path / "store", f"redis://:{SECRET}@redis:6379/0"))
    env.setenv("RELAY_RATE_LIMIT_URL_FILE",
               write(tmp_path / "pace", f"redis://:{SECRET}@redis:6379/1"))
    env.setenv("RELAY_TENANTS__ACME__PUBLISHERS_FILE",
               write(tmp_path / "publishers", '["playbooks-acme"]'))
    settings = Settings()
    eset = settings.tenants["acme"].eset
    assert eset is not None and eset.password.get_secret_value() == SECRET
    assert settings.broker_url == f"amqp://relay:{SECRET}@rabbit:5672/prod"
    assert settings.idempotency_url == f"redis://:{SECRET}@redis:6379/0"
    assert settings.rate_limit_url == f"redis://:{SECRET}@redis:6379/1"
    assert settings.tenants["acme"].publishers == ("playbooks-acme",)
    assert SECRET not in repr(settings)


def kubernetes_secret_volume(directory: Path, items: dict[str, str]) -> Path:
    """What the kubelet mounts: the files in a timestamped directory, ``..data`` linking
    to it, and a link per key."""
    revision = directory / "..2026_01_01_00_00_00.000000000"
    revision.mkdir(parents=True)
    for key, value in items.items():
        (revision / key).write_text(value)
    (directory / "..data").symlink_to(revision.name)
    for key in items:
        (directory / key).symlink_to(f"..data/{key}")
    return directory


def test_a_kubernetes_secret_volume_as_the_secrets_directory(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
):
    volume = kubernetes_secret_volume(tmp_path / "secrets", {
        "RELAY_BROKER_URL": f"amqp://relay:{SECRET}@rabbit:5672/prod\n",
        "RELAY_TENANTS__ACME__ESET__USERNAME": "api@acme.example",
        "RELAY_TENANTS__ACME__ESET__PASSWORD": SECRET,
        "RELAY_TENANTS__ACME__FYLR__BASE_URL": "https://fylr.acme.example",
        "RELAY_TENANTS__ACME__FYLR__CLIENT_ID": "relay",
        "RELAY_TENANTS__ACME__FYLR__CLIENT_SECRET": "from-the-volume",
        "RELAY_IDEMPOTENCY_URL": "redis://:from-the-volume@redis:6379/0",
    })
    env = clean_environment
    env.setenv("RELAY_SECRETS_DIR", str(volume))
    # The environment wins over the directory, a *_FILE variable too.
    env.setenv("RELAY_TENANTS__ACME__FYLR__CLIENT_SECRET", "from-the-environment")
    env.setenv("RELAY_IDEMPOTENCY_URL_FILE",
               write(tmp_path / "store", "redis://:from-a-file@redis:6379/0"))
    settings = Settings()
    acme = settings.tenants["acme"]
    assert acme.eset is not None and acme.eset.password.get_secret_value() == SECRET
    assert acme.fylr is not None
    assert acme.fylr.client_secret.get_secret_value() == "from-the-environment"
    assert settings.broker_url == f"amqp://relay:{SECRET}@rabbit:5672/prod"
    assert settings.idempotency_url == "redis://:from-a-file@redis:6379/0"
    assert settings.secrets_dir == volume


def test_a_setting_whose_name_ends_in_file_is_not_a_file_variable():
    class Example(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="X_", env_nested_delimiter="__")
        ca_file: str | None = None
        password: SecretStr | None = None
        tenants: dict[str, Tenant] = {}

    assert file_variable_target("X_CA_FILE", Example) is None  # a setting of its own
    assert file_variable_target("X_PASSWORD_FILE", Example) == "X_PASSWORD"
    assert file_variable_target("x_password_file", Example) == "X_PASSWORD"
    assert file_variable_target("X_TENANTS__A__ESET__PASSWORD_FILE", Example) == (
        "X_TENANTS__A__ESET__PASSWORD"
    )
    assert file_variable_target("X_TENANTS__A__ESET__PASWORD_FILE", Example) is None
    assert file_variable_target("X_NOTHING_FILE", Example) is None
    assert file_variable_target("Y_PASSWORD_FILE", Example) is None


def test_a_file_that_can_not_be_used_is_named_with_its_fix(tmp_path: Path):
    secret_file = write(tmp_path / "secret", SECRET)
    cases = {
        "error: RELAY_BROKER_URL_FILE: /nowhere/broker can not be read (No such file or "
        "directory); mount the file there or point RELAY_BROKER_URL_FILE at it":
            {"RELAY_BROKER_URL_FILE": "/nowhere/broker"},
        "error: RELAY_TENANTS__ACME__ESET__PASSWORD_FILE: RELAY_TENANTS__ACME__ESET__PASSWORD "
        "is set too; set either RELAY_TENANTS__ACME__ESET__PASSWORD or "
        "RELAY_TENANTS__ACME__ESET__PASSWORD_FILE, not both": {
            "RELAY_TENANTS__ACME__ESET__PASSWORD_FILE": secret_file,
            "RELAY_TENANTS__ACME__ESET__PASSWORD": SECRET,
        },
        'error: RELAY_SECRETS_DIR: directory "/nowhere/secrets" does not exist; point it at '
        "the directory the secrets are mounted in": {"RELAY_SECRETS_DIR": "/nowhere/secrets"},
    }
    for line, variables in cases.items():
        env = cli_env(tmp_path, **variables)
        checked = run_cli("check", env=env)
        assert checked.returncode == 1
        assert line in checked.stdout.splitlines(), checked.stdout
        refused = run_cli("run", env=env)
        assert refused.returncode == 2 and refused.stderr.strip() == line, refused.stderr
        assert SECRET not in checked.stdout + checked.stderr + refused.stdout + refused.stderr


def broken_configurations(tmp_path: Path) -> dict[str, dict[str, str]]:
    """Configurations with an error, each holding SECRET, by the line ``check`` says."""
    volume = kubernetes_secret_volume(
        tmp_path / "volume", {"RELAY_TENANTS__DIR__ESET__PASSWORD": SECRET}
    )
    tenants = {"json": {"eset": {"password": SECRET}}}
    return {
        # A tenant missing its username, its password set (pydantic's own message quotes
        # the input: the password with it), by file and from the secrets directory.
        "error: RELAY_TENANTS__FILE__ESET__USERNAME: is missing; set "
        "RELAY_TENANTS__FILE__ESET__USERNAME": {
            "RELAY_TENANTS__FILE__ESET__PASSWORD_FILE": write(tmp_path / "password", SECRET),
        },
        "error: RELAY_TENANTS__DIR__ESET__USERNAME: is missing; set "
        "RELAY_TENANTS__DIR__ESET__USERNAME": {"RELAY_SECRETS_DIR": str(volume)},
        "error: RELAY_TENANTS__JSON__ESET__USERNAME: is missing; set "
        "RELAY_TENANTS__JSON__ESET__USERNAME": {
            "RELAY_TENANTS_FILE": write(tmp_path / "tenants.json", json.dumps(tenants)),
        },
        # URLs that do not parse, a password in them, as a variable and by file.
        "error: RELAY_BROKER_URL: is not a valid URL; write it like "
        "amqp://USER:PASSWORD@HOST:5672/VHOST": {
            "RELAY_BROKER_URL": f"amqp://relay:{SECRET}@rabbit.example:56a2/prod",
        },
        "error: RELAY_IDEMPOTENCY_URL: is not a valid URL; write it like "
        "redis://:PASSWORD@HOST:6379/0": {
            "RELAY_IDEMPOTENCY_URL_FILE": write(
                tmp_path / "store", f"redis://:{SECRET}@redis.example:63x9/0"
            ),
        },
        # A file whose value does not validate.
        "error: RELAY_CONCURRENCY: should be a valid integer, unable to parse string as an "
        "integer; write a value of that type; see the configuration table in README.md": {
            "RELAY_CONCURRENCY_FILE": write(tmp_path / "concurrency", SECRET),
        },
    }


def test_no_configuration_error_shows_a_secret(tmp_path: Path):
    for line, variables in broken_configurations(tmp_path).items():
        env = cli_env(tmp_path, **variables)
        checked = run_cli("check", env=env)
        assert checked.returncode == 1
        assert line in checked.stdout.splitlines(), (line, checked.stdout)
        refused = run_cli("run", env=env)
        assert refused.returncode == 2 and line in refused.stderr.splitlines(), refused.stderr
        debug = run_cli("--debug", "run", env=env)
        assert debug.returncode != 0
        for done in (checked, refused, debug):
            assert SECRET not in done.stdout + done.stderr, (line, done.stdout, done.stderr)


def test_url_credentials_are_redacted_from_log_lines():
    for url in (f"amqp://relay:{SECRET}@rabbit:5672/prod", f"redis://:{SECRET}@redis:6379/0",
                f"https://user:{SECRET}@fylr.example/api", f"https://user:p@{SECRET}@host/"):
        line = redact(f"could not reach {url} (refused)")
        assert SECRET not in line and "[redacted]@" in line
    assert redact("https://host/path?a=b@c mail user@example.com") == (
        "https://host/path?a=b@c mail user@example.com"
    )


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = handler_for("json", stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def spaaza_command() -> Command:
    parsed: Command = parse_command({
        "type": "update-triggers",
        "params": {"provider": "spaaza", "task_id": 7,
                   "trigger": {"once": "2030-01-01T00:00:00Z"}},
    }).with_defaults("spaaza-1")
    return parsed


def test_url_credentials_are_kept_out_of_spans_and_logs(all_logs: io.StringIO):
    """A tenant's base_url with a user and password (``command-relay check`` refuses it,
    as calls can not send it): the call's span and the log lines hold neither."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = Settings(
        tenants={"default": Tenant(spaaza=SpaazaAccount(
            base_url=f"https://urluser:{SECRET}@api.spaaza.example/v1",
            token_id="relay", token_secret=SecretStr("token-secret"),
        ))},
        rate_limits={},
    )
    answers = iter([503, 200])

    def spaaza(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), json={"id": 7})

    async def call() -> None:
        policy = RetryPolicy(max_attempts=2, initial_wait_s=0, max_wait_s=0)
        vendors = Vendors(settings, RateLimits(settings.rate_limit, Outage({})), policy,
                          Telemetry.using(provider), httpx.MockTransport(spaaza))
        try:
            reply = await vendors.run(vendors.call_for(spaaza_command()),
                                      CallBudget(deadline=policy.clock() + 10))
            assert reply.status == 200
        finally:
            await vendors.aclose()

    asyncio.run(call())
    finished = spans.get_finished_spans()
    assert len(finished) == 2  # the 503 and the retry
    for span in finished:
        attributes: dict[str, Any] = dict(span.attributes or {})
        assert attributes["url.full"] == (
            "https://REDACTED:REDACTED@api.spaaza.example/v1/tasks/7"
        )
        assert attributes["server.address"] == "api.spaaza.example"
        shown = json.dumps([attributes, [dict(e.attributes or {}) for e in span.events]])
        assert SECRET not in shown and "urluser" not in shown
    assert SECRET not in all_logs.getvalue()


def test_run_with_its_secrets_in_files_logs_none_of_them(sandbox: SandboxServer, tmp_path: Path):
    """`command-relay run` as the Kubernetes manifests start it: the tenant's secrets in a
    mounted Secret volume (one by a *_FILE variable), the rest in the environment; every
    vendor is called with them, and no log line (DEBUG) holds one."""
    variables = sandbox_variables(sandbox.base_url)
    tenant = json.loads(variables["RELAY_TENANTS"])["default"]
    prefix = "RELAY_TENANTS__DEFAULT__"
    files = {
        f"{prefix}ESET__PASSWORD": tenant["eset"].pop("password"),
        f"{prefix}FYLR__CLIENT_SECRET": tenant["fylr"].pop("client_secret"),
        f"{prefix}SPAAZA__TOKEN_SECRET": tenant["spaaza"].pop("token_secret"),
    }
    fylr_password = tenant["fylr"].pop("password")
    volume = kubernetes_secret_volume(tmp_path / "secrets", files)
    env = cli_env(
        tmp_path / "data",
        RELAY_TENANTS=json.dumps({"default": tenant}),
        RELAY_ESET_HOST_TEMPLATE=variables["RELAY_ESET_HOST_TEMPLATE"],
        RELAY_SECRETS_DIR=str(volume),
        RELAY_TENANTS__DEFAULT__FYLR__PASSWORD_FILE=write(tmp_path / "fylr", fylr_password),
        RELAY_LOG_LEVEL="DEBUG",
        RELAY_RETRY_INITIAL_WAIT_S="0.01",
    )
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env,
                                  stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        wait_for(log, r"consuming")
        for kind, params in (
            ("cancel-task", {"task_id": 31}),  # fylr: client secret and password
            ("fetch-patching", {}),  # ESET: password
            ("update-triggers", {"provider": "spaaza", "task_id": 5,  # Spaaza: token secret
                                 "trigger": {"once": "2030-01-01T00:00:00Z"}}),
        ):
            done = run_cli("send", kind, "--params", json.dumps(params), "--wait", env=env)
            assert done.returncode == 0, (kind, done.stdout, done.stderr)
            assert not any(secret in done.stdout + done.stderr
                           for secret in (*files.values(), fylr_password))
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    assert code == 0
    text = log.read_text()
    assert "command succeeded" in text and "Traceback" not in text
    assert not any(secret in text for secret in (*files.values(), fylr_password))
