"""The README's first command: the demo, on a bare machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_prints_five_succeeded_events_and_exits_0(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summaries = [line for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert len(summaries) == 5
    assert all(" succeeded " in line for line in summaries)
    assert sum("response_id=" in line for line in summaries) >= 1
    assert sorted(line.split()[0] for line in summaries) == [
        "batch-delete", "cancel-task", "fetch-patching", "update-triggers", "update-triggers"
    ]
    assert not list(tmp_path.iterdir()), "the demo leaves no files behind"


def test_every_subcommand_has_help():
    for command in ("run", "demo", "send", "sandbox"):
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", command, "--help"],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0 and "Usage" in done.stdout


def test_send_with_wait_prints_the_result_event(sandbox, data_dir: Path):
    """`command-relay send … --wait` against a running worker on the embedded broker."""
    import json
    import os

    from .harness import running_relay

    broker_url = f"sqla+sqlite:///{data_dir / 'broker.sqlite3'}"
    with running_relay(
        sandbox, broker_url=broker_url, idempotency_url=f"sqlite:///{data_dir / 'idem.sqlite3'}"
    ) as relay:
        env = {
            **os.environ,
            "RELAY_BROKER_URL": broker_url,
            "RELAY_COMMAND_EXCHANGE": relay.settings.command_exchange,
            "RELAY_COMMAND_QUEUE": relay.settings.command_queue,
            "RELAY_EVENT_EXCHANGE": relay.settings.event_exchange,
            "RELAY_DEAD_LETTER_QUEUE": relay.settings.dead_letter_queue,
        }
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "send", "cancel-task",
             "--params", '{"task_id": 31}', "--wait", "--timeout", "30"],
            capture_output=True, text=True, timeout=90, env=env,
        )
    assert done.returncode == 0, done.stderr
    event = json.loads(done.stdout)
    assert (event["data"]["type"], event["data"]["outcome"]) == ("cancel-task", "succeeded")
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"31": 1}
