"""``command-relay check``: one line per configuration problem with its fix, never a
secret; ``--probe`` reaches the broker, the stores and each account's token endpoint; and
``run`` refuses what ``check`` finds an error in."""

from __future__ import annotations

import json
from pathlib import Path

from worker.sandbox import SandboxConfig, SandboxServer
from worker.settings import Settings

from .command_line import cli_env, run_cli, sandbox_variables
from .harness import embedded

SECRETS = (SandboxConfig().eset_password, SandboxConfig().fylr_client_secret,
           SandboxConfig().fylr_password, SandboxConfig().spaaza_token_secret)


def test_a_sound_configuration_probed(sandbox: SandboxServer, tmp_path: Path):
    env = cli_env(tmp_path, Settings(**embedded(tmp_path)), **sandbox_variables(sandbox.base_url))
    done = run_cli("check", "--probe", env=env)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith("command-relay ")
    assert "tenants default (eset+fylr+spaaza)" in lines[0]
    assert "ok: RELAY_BROKER_URL: " in done.stdout
    assert "ok: RELAY_IDEMPOTENCY_URL: " in done.stdout
    assert "ok: RELAY_TENANTS__DEFAULT__ESET: a token was issued" in lines
    assert "ok: RELAY_TENANTS__DEFAULT__FYLR: a token was issued" in lines
    assert lines[-1] == "0 error(s), 0 warning(s)"
    assert not any(secret in done.stdout + done.stderr for secret in SECRETS)


def test_a_refused_account_is_named_and_its_password_is_not(sandbox: SandboxServer,
                                                            tmp_path: Path):
    wrong = "Wr0ng-but-still-secret"
    env = cli_env(
        tmp_path, Settings(**embedded(tmp_path)), **sandbox_variables(sandbox.base_url),
    )
    tenants = json.loads(env["RELAY_TENANTS"])
    tenants["default"]["eset"]["password"] = wrong
    env["RELAY_TENANTS"] = json.dumps(tenants)
    done = run_cli("check", "--probe", env=env)
    assert done.returncode == 1
    refused = [line for line in done.stdout.splitlines()
               if line.startswith("error: RELAY_TENANTS__DEFAULT__ESET: ")]
    assert len(refused) == 1 and "refused the configured credentials" in refused[0]
    assert "ok: RELAY_TENANTS__DEFAULT__FYLR: a token was issued" in done.stdout
    assert wrong not in done.stdout + done.stderr


def test_each_problem_on_a_line_with_its_fix(tmp_path: Path):
    env = cli_env(
        tmp_path, Settings(**embedded(tmp_path)),
        RELAY_CONCURENCY="4",
        RELAY_ESET_HOST_TEMPLATE="https://{regoin}.{service}.eset.systems",
        RELAY_RATE_LIMIT_URL="bogus://x",
        RELAY_RATE_LIMITS='{"eset": "ten a second"}',
    )
    done = run_cli("check", env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    problems = [line for line in lines if line.startswith(("error: ", "warning: "))]
    assert problems == [line for line in lines[1:-1]], "one line each, between summary and count"
    assert (
        "error: RELAY_ESET_HOST_TEMPLATE: the placeholder {regoin} is unknown; "
        "did you mean {region}?"
    ) in problems
    assert any(line.startswith("error: RELAY_RATE_LIMIT_URL: the scheme 'bogus' is not "
                               "supported; use memory://") for line in problems)
    assert any(line.startswith("error: RELAY_RATE_LIMITS__ESET: is not a rate limit")
               for line in problems)
    assert (
        "warning: RELAY_CONCURENCY: is not a setting and is ignored; did you mean "
        "RELAY_CONCURRENCY?"
    ) in problems
    assert any(line.startswith("warning: RELAY_TENANTS: no tenant is configured")
               for line in problems)
    assert lines[-1] == "3 error(s), 2 warning(s)"

    refused = run_cli("run", env=env, timeout_s=30)
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    errors = refused.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: RELAY_") for line in errors)


def test_validation_errors_name_the_setting_never_its_value(tmp_path: Path):
    secret = "Very-Secret-Client-Secret"
    env = cli_env(
        tmp_path,
        RELAY_TENANTS=(
            '{"acme": {"eset": {"password": "' + secret + '"},'
            ' "fylr": {"base_url": "https://fylr.example", "client_id": "c",'
            ' "client_secret": "' + secret + '", "usrname": "u"}}}'
        ),
        RELAY_CONCURRENCY="lots",
    )
    done = run_cli("check", env=env)
    assert done.returncode == 1
    assert secret not in done.stdout + done.stderr
    assert "error: RELAY_TENANTS__ACME__ESET__USERNAME: is missing" in done.stdout
    assert (
        "error: RELAY_TENANTS__ACME__FYLR__USRNAME: is not a setting; did you mean "
        "RELAY_TENANTS__ACME__FYLR__USERNAME?"
    ) in done.stdout
    assert "error: RELAY_CONCURRENCY: should be a valid integer" in done.stdout
    assert "lots" not in done.stdout


def test_a_broker_url_with_a_password_is_shown_without_it(tmp_path: Path):
    env = cli_env(
        tmp_path, Settings(**embedded(tmp_path)),
        RELAY_BROKER_URL="amqp://relay:Hunter2-Secret@rabbit.example:5672/prod",
        RELAY_IDEMPOTENCY_URL="redis://:Hunter2-Secret@redis.example:6379/0",
    )
    done = run_cli("check", env=env)
    assert "broker RabbitMQ amqp://rabbit.example:5672/prod" in done.stdout
    assert "idempotency redis://redis.example:6379/0" in done.stdout
    assert "Hunter2-Secret" not in done.stdout + done.stderr
