"""A run's worker replicas: the settings each one gets (``RELAY_*`` variables) and the
processes, each restartable by index, with a record of how each one ended."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.rig.names import Names
from bench.rig.procs import STOP_TIMEOUT_S, Proc, Procs, clean_environment, stop_together

# The worker's `run` command, with the benchmark's tracing hook (off unless BENCH_TRACING).
REPLICA_ARGV = [sys.executable, "-m", "bench.relay_worker"]


def worker_env(
    names: Names, sandbox_url: str, *, broker_url: str, store_url: str, rate_limit_url: str,
    rate_limits: Mapping[str, str], tenants: Mapping[str, Any],
) -> dict[str, str]:
    """What every replica of a run has: the run's broker names, its broker and stores, and
    every vendor account pointed at the sandbox (``tenants``, see :mod:`.tenants`)."""
    return {
        **{f"RELAY_{name.upper()}": value for name, value in names.settings().items()},
        "RELAY_BROKER_URL": broker_url,
        "RELAY_IDEMPOTENCY_URL": store_url,
        "RELAY_RATE_LIMIT_URL": rate_limit_url,
        "RELAY_RATE_LIMITS": json.dumps(rate_limits),
        "RELAY_ESET_HOST_TEMPLATE": f"{sandbox_url}/eset/{{region}}/{{service}}",
        "RELAY_TENANTS": json.dumps(tenants),
    }


@dataclass
class ExitRecord:
    """A replica process that ended, and why."""

    name: str
    returncode: int | None
    expected: bool  # killed or stopped by the run, not crashed


class Fleet:
    """Replicas started in ``procs`` with ``env`` (on a clean environment); replica i
    serves ``/metrics`` on ``health_ports[i]`` and has ``replica_env[i]`` on top of
    ``env``, where given."""

    def __init__(
        self, procs: Procs, env: Mapping[str, str], replicas: int,
        health_ports: Sequence[int] = (), replica_env: Sequence[Mapping[str, str]] = (),
    ) -> None:
        self._procs = procs
        self._env = clean_environment() | dict(env)
        self._health_ports = health_ports
        self._replica_env = replica_env
        self.exits: list[ExitRecord] = []
        self.procs = [self._start(index) for index in range(replicas)]

    def _start(self, index: int) -> Proc:
        env = dict(self._env)
        if index < len(self._health_ports):
            env["RELAY_HEALTH_PORT"] = str(self._health_ports[index])
        if index < len(self._replica_env):
            env.update(self._replica_env[index])
        return self._procs.start(f"relay-{index}", REPLICA_ARGV, env)

    def check_alive(self) -> None:
        """Note replicas that died on their own, and start them again."""
        for index, proc in enumerate(self.procs):
            if not proc.alive():
                self.exits.append(ExitRecord(proc.name, proc.popen.returncode, expected=False))
                self.restart(index)

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` (no chance to finish anything)."""
        proc = self.procs[index]
        crashed = not proc.alive()  # it died before the run could kill it
        proc.kill()
        self.exits.append(ExitRecord(proc.name, proc.popen.returncode, expected=not crashed))

    def terminate(self, index: int, timeout_s: float) -> int | None:
        """SIGTERM replica ``index`` and wait for it; its exit code (None: it hung)."""
        proc = self.procs[index]
        (returncode,) = stop_together([proc], timeout_s)
        self.exits.append(ExitRecord(proc.name, returncode, expected=True))
        return returncode

    def restart(self, index: int) -> None:
        self.procs[index] = self._start(index)

    @property
    def crashes(self) -> list[ExitRecord]:
        return [record for record in self.exits if not record.expected]

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(lines)}" for p in self.procs)

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> list[int | None]:
        """Stop every replica at once; their exit codes (None: killed after hanging)."""
        return stop_together(self.procs, timeout_s)
