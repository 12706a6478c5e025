"""Driving the real command line (``python -m worker``) from tests, with the settings of a
test's broker and store and nothing else from this process's RELAY_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from worker.settings import Settings


def cli_env(data_dir: Path, settings: Settings | None = None, **variables: str) -> dict[str, str]:
    """An environment without this process's RELAY_* variables, whose user data directory
    is ``data_dir`` (the embedded defaults go there), naming the broker, queues and store
    of ``settings`` when given, plus ``variables``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    env["XDG_DATA_HOME"] = str(data_dir)
    if settings is not None:
        env.update({
            "RELAY_BROKER_URL": settings.broker_url,
            "RELAY_IDEMPOTENCY_URL": settings.idempotency_url,
            "RELAY_COMMAND_EXCHANGE": settings.command_exchange,
            "RELAY_COMMAND_QUEUE": settings.command_queue,
            "RELAY_EVENT_EXCHANGE": settings.event_exchange,
            "RELAY_DEAD_LETTER_QUEUE": settings.dead_letter_queue,
            "RELAY_LANE_QUEUE_PREFIX": settings.lane_queue_prefix,
        })
    env.update(variables)
    return env


def run_cli(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout_s: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command-relay ARGS…`` as a user runs it; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env, input=stdin if stdin is not None else "", capture_output=True, text=True,
        timeout=timeout_s, cwd=cwd,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_said_in_a_line_or_two(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit code 2, one or two lines on standard error naming the problem, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def sandbox_variables(base_url: str, **tenant_names: str) -> dict[str, str]:
    """RELAY_* variables pointing tenant ``default`` (and any of ``tenant_names``, each
    with the sandbox ESET user it names) at the sandbox, its secrets written out."""
    from worker.sandbox import SandboxConfig
    from worker.sandbox.worker_setup import sandbox_tenant

    config = SandboxConfig()
    tenant = sandbox_tenant(base_url, config).model_dump(mode="json")
    tenant["eset"]["password"] = config.eset_password  # model_dump masks secrets
    tenant["fylr"]["client_secret"] = config.fylr_client_secret
    tenant["fylr"]["password"] = config.fylr_password
    tenant["spaaza"]["token_secret"] = config.spaaza_token_secret
    tenants = {"default": tenant}
    for name, username in tenant_names.items():
        tenants[name] = {**tenant, "eset": {**tenant["eset"], "username": username}}
    return {
        "RELAY_TENANTS": json.dumps(tenants),
        "RELAY_ESET_HOST_TEMPLATE": f"{base_url}/eset/{{region}}/{{service}}",
    }
