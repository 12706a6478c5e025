"""Child processes of one benchmark run: started in their own session, always stopped."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 20.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    output: Path | None = None  # a file the process writes, if any

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def peak_rss_mb(self) -> float | None:
        """VmHWM: the most resident memory the process ever had."""
        return _status_kb(self.pid, "VmHWM")

    def cpu_s(self) -> float | None:
        """User + system CPU seconds used so far by the process and the live processes of
        its group (a Celery prefork pool's children)."""
        total, found = 0.0, False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(fields[2]) == self.pid:  # the process group: ours is the session leader
                total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
                found = True
        return total if found else None


class ProcessDied(RuntimeError):
    pass


class Procs:
    """Starts processes (stderr and stdout to a log file each) and stops them all on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
        stdout_pipe: bool = False,
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            start_new_session=True,  # its own process group: stopping it stops its children
        )
        log.close()
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def check_alive(self) -> None:
        """Raise if any process ended before it was asked to."""
        for proc in self._procs:
            if not proc.alive():
                raise ProcessDied(
                    f"{proc.name} (pid {proc.pid}) exited with {proc.popen.returncode}:\n"
                    f"{proc.log_tail()}"
                )

    def stop_all(self) -> None:
        """SIGTERM to each process group, then SIGKILL to what is left after the grace."""
        for proc in self._procs:
            _signal_group(proc, signal.SIGTERM)
        give_up_at = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            try:
                proc.popen.wait(max(0.1, give_up_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)  # the whole group, children included
                proc.popen.wait()
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        self._procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def read_line(proc: Proc, timeout_s: float) -> str:
    """The first line a process prints on its stdout pipe (e.g. the URL it serves)."""
    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"{proc.name} printed nothing within {timeout_s:g}s:\n{proc.log_tail()}")
    line = proc.popen.stdout.readline().decode().strip()
    if not line:
        raise ProcessDied(f"{proc.name} exited before it was ready:\n{proc.log_tail()}")
    return line


def _signal_group(proc: Proc, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


def _status_kb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
