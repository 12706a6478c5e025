"""``command-relay send --wait``'s progress, on the embedded broker: a line each time
the command reaches another stage (claimed by which replica, sent, collecting a 202),
read from the idempotency store; shown on a terminal or with ``--progress``, never with
``--no-progress``; a store that does not answer ends the progress, not the waiting."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.rig.procs import free_port
from worker.sandbox import Faults, SandboxServer, ScriptedFault

from .command_line import cli_env, run_cli
from .harness import RunningRelay, embedded, running_relay

SLOW_MS = 5000  # each vendor call: long next to the progress's 2 s between lookups
WAIT = ("--wait", "--timeout", "60")
BATCH_DELETE = ("send", "batch-delete", "--params",
                json.dumps({"object_uuids": [str(uuid.uuid4())]}))
CANCEL = ("send", "cancel-task", "--params", '{"task_id": 4242}')
TERMINAL_PATIENCE_S = 90.0  # the longest a command on a terminal is read for


def progress_lines(stderr: str) -> list[str]:
    """The progress lines (``[+4s] …``), without their time."""
    return [line.split("] ", 1)[1] for line in stderr.replace("\r", "").splitlines()
            if line.startswith("[+")]


def cli_env_of(tmp_path: Path, relay: RunningRelay) -> dict[str, str]:
    return cli_env(tmp_path, relay.settings)


def run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """``command-relay ARGS…`` whose standard error is a terminal (a pseudo-terminal read
    here): its exit code, standard output and what the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", *args], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=terminal, text=True,
    )
    os.close(terminal)
    shown = b""
    give_up_at = time.monotonic() + TERMINAL_PATIENCE_S
    try:
        while time.monotonic() < give_up_at:
            readable, _, _ = select.select([controller], [], [], 1.0)
            if readable and not (chunk := os.read(controller, 4096)):
                break
            if readable:
                shown += chunk
    except OSError:  # EIO: the terminal's last writer is gone
        pass
    finally:
        os.close(controller)
        if process.poll() is None and time.monotonic() >= give_up_at:
            process.kill()
    out, _ = process.communicate(timeout=TERMINAL_PATIENCE_S)
    return process.returncode, out, shown.decode(errors="replace")


def test_progress_says_who_claimed_the_command_and_that_its_202_is_collected(
    sandbox: SandboxServer, tmp_path: Path
):
    """ESET answers 202; the worker waits 5 s before collecting the answer, which the
    progress (looking every 2 s) sees, with the response id the event then carries."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=202)])
    with running_relay(sandbox, **embedded(tmp_path, collect_interval_s=5)) as relay:
        done = run_cli(*BATCH_DELETE, *WAIT, "--progress", env=cli_env(tmp_path, relay.settings))
    assert done.returncode == 0, done.stderr
    response_id = json.loads(done.stdout)["data"]["vendor"]["response_id"]
    collecting = (f"claimed by {relay.service.owner}; collecting the vendor's answer "
                  f"{response_id} (it answered 202)")
    assert collecting in progress_lines(done.stderr), done.stderr


def test_progress_shows_on_a_terminal_by_default(sandbox: SandboxServer, tmp_path: Path):
    sandbox.state.faults = Faults(latency_ms=SLOW_MS)
    with running_relay(sandbox, **embedded(tmp_path)) as relay:
        code, out, shown = run_on_a_terminal(*CANCEL, *WAIT, env=cli_env_of(tmp_path, relay))
    assert code == 0, shown
    assert json.loads(out)["data"]["outcome"] == "succeeded"
    sent = f"claimed by {relay.service.owner}; sent to the vendor"
    assert sent in progress_lines(shown), shown


def test_no_progress_shows_none_on_a_terminal(sandbox: SandboxServer, tmp_path: Path):
    sandbox.state.faults = Faults(latency_ms=SLOW_MS)
    with running_relay(sandbox, **embedded(tmp_path)) as relay:
        code, out, shown = run_on_a_terminal(
            *CANCEL, *WAIT, "--no-progress", env=cli_env_of(tmp_path, relay)
        )
    assert code == 0, shown
    assert json.loads(out)["data"]["outcome"] == "succeeded"
    assert progress_lines(shown) == [], shown


def test_a_store_that_does_not_answer_ends_the_progress_not_the_waiting(
    sandbox: SandboxServer, tmp_path: Path
):
    sandbox.state.faults = Faults(latency_ms=SLOW_MS)
    with running_relay(sandbox, **embedded(tmp_path)) as relay:
        env = cli_env(tmp_path, relay.settings,
                      RELAY_IDEMPOTENCY_URL=f"redis://127.0.0.1:{free_port()}/0")
        done = run_cli(*CANCEL, *WAIT, "--progress", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["outcome"] == "succeeded"
    (said,) = progress_lines(done.stderr)
    assert said.startswith("no progress: the idempotency store does not answer"), said
    assert "still waiting for the result" in said
