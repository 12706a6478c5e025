"""``command-relay run`` as an operator starts it: on the embedded defaults (found by
``send`` from another directory), logging its configuration in one line, each command's
id, type, tenant, outcome and error code, and a line of counts every interval."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault

from .command_line import cli_env, run_cli, sandbox_variables

STATS = re.compile(
    r"stats: last 0\.5s: (\d+) succeeded, (\d+) failed, (\d+) rejected.*; (\d+) in flight; "
    r"(\d+) dead-lettered"
)


def wait_for(log: Path, pattern: str, timeout_s: float = 30) -> str:
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        text = log.read_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not logged within {timeout_s}s:\n{log.read_text()}")


def test_run_on_the_embedded_defaults_logs_what_it_does(sandbox: SandboxServer, tmp_path: Path):
    data = tmp_path / "data"
    worker_dir, sender_dir = tmp_path / "worker", tmp_path / "sender"
    worker_dir.mkdir()
    sender_dir.mkdir()
    env = cli_env(data, **sandbox_variables(sandbox.base_url),
                  RELAY_STATS_INTERVAL_S="0.5", RELAY_RETRY_INITIAL_WAIT_S="0.01")
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env,
                                  cwd=worker_dir, stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        summary = wait_for(log, r"broker embedded").splitlines()[0]
        assert re.search(r"INFO +worker\.cli: command-relay \S+: broker embedded sqla\+sqlite:///"
                         + re.escape(str(data / "command-relay" / "broker.sqlite3")), summary)
        assert "tenants default (eset+fylr+spaaza); concurrency 32 (prefetch 64)" in summary
        wait_for(log, r"consuming")

        succeeded = run_cli("send", "cancel-task", "--params", '{"task_id": 901}', "--wait",
                            env=env, cwd=sender_dir)
        assert succeeded.returncode == 0, succeeded.stderr
        sandbox.state.faults = Faults(script=[ScriptedFault(status=400, path_contains="cancel")])
        failed = run_cli("send", "cancel-task", "--params", '{"task_id": 902}', "--wait",
                         env=env, cwd=sender_dir)
        assert failed.returncode == 1, failed.stderr
        failed_id = failed.stderr.splitlines()[0].split()[-1]

        text = wait_for(log, rf"command failed command_id={failed_id}")
        assert re.search(
            rf"command failed command_id={failed_id} command_type=cancel-task tenant=default "
            r"outcome=failed error_code=vendor_rejected attempts=1", text
        )
        assert re.search(r"command succeeded command_id=\S+ command_type=cancel-task "
                         r"tenant=default outcome=succeeded", text)
        time.sleep(1.2)  # a stats line after both
        counts = [tuple(map(int, m.groups())) for m in STATS.finditer(log.read_text())]
        assert counts, log.read_text()
        assert sum(c[0] for c in counts) == 1 and sum(c[1] for c in counts) == 1
        assert sum(c[4] for c in counts) == 1  # the failed command, kept
        assert counts[-1][3] == 0  # nothing in flight now
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    assert code == 0
    text = log.read_text()
    assert "Traceback" not in text
    config = SandboxConfig()
    for secret in (config.eset_password, config.fylr_client_secret, config.spaaza_token_secret):
        assert secret not in text
    assert not list(worker_dir.iterdir()) and not list(sender_dir.iterdir())
