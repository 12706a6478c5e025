"""Child processes of a run, each the leader of a process group of its own (a signal to the
group reaches its children too), each logging to a file of its own, all stopped at the end.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STOP_TIMEOUT_S = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """This process's environment without worker settings or telemetry exporters, so that a
    child runs with the settings its run gives it and nothing the shell happened to hold."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RELAY_", "OTEL_"))
    } | {"PYTHONUNBUFFERED": "1"}


class ProcessDied(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, argv: list[str], env: Mapping[str, str] | None, log_path: Path, *,
        stdout_pipe: bool = False,
    ) -> Proc:
        """``argv`` with stdout and stderr appended to ``log_path`` (appended: a restarted
        replica keeps the log of its predecessors); ``stdout_pipe`` keeps stdout for
        :meth:`read_line` instead."""
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,  # its own process group: killpg reaches all of it
            )
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Signal the group, only while its leader is ours and not yet reaped (a reaped
        pid may already belong to someone else)."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the process."""
        self.signal(signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT_S)

    def read_line(self, timeout_s: float) -> str:
        """The first line the process prints on its stdout pipe (e.g. the URL it serves)."""
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"{self.name} printed nothing within {timeout_s:g}s:\n"
                               f"{self.log_tail()}")
        line = self.popen.stdout.readline().decode().strip()
        if not line:
            raise ProcessDied(f"{self.name} exited before it was ready:\n{self.log_tail()}")
        return line

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def peak_rss_mb(self) -> float | None:
        """VmHWM: the most resident memory the process ever had."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

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


def stop_together(procs: Iterable[Proc], timeout_s: float) -> list[int | None]:
    """SIGTERM to every group at once, then SIGKILL to what is left after ``timeout_s``;
    the exit codes (None: killed after hanging)."""
    procs = list(procs)
    for proc in procs:
        proc.signal(signal.SIGTERM)
    give_up_at = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.popen.wait(max(0.0, give_up_at - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    return codes


class Procs:
    """The processes of one run, each logging to ``<log_dir>/<name>.log``; stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, *,
        stdout_pipe: bool = False,
    ) -> Proc:
        """``env`` None: this process's environment."""
        proc = Proc.start(name, argv, env, self.log_dir / f"{name}.log", stdout_pipe=stdout_pipe)
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

    def stop_all(self, timeout_s: float = 20.0) -> None:
        """Stop every process (see :func:`stop_together`); 0 s kills them at once."""
        stop_together(self._procs, timeout_s)
        for proc in self._procs:
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        self._procs.clear()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
