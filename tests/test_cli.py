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
