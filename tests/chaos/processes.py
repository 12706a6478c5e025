"""The sandbox vendors and the worker replicas, each a process in its own process group.

Every process logs to a file of its own (its tail is shown when a scenario fails) and is
killed, group and all, when the scenario ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from worker.sandbox import SandboxConfig
from worker.sandbox.worker_setup import sandbox_tenant

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SANDBOX_START_TIMEOUT_S = 20.0
REDIS_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

# `serve` runs uvicorn in the foreground; SIGTERM stops it.
SANDBOX_SCRIPT = """
import sys
from worker.sandbox import SandboxConfig, serve
config = SandboxConfig() if sys.argv[3] == "limited" else SandboxConfig(rate_limit_per_s={})
serve(sys.argv[1], int(sys.argv[2]), config)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _clean_environment() -> dict[str, str]:
    """This process's environment without worker settings or telemetry exporters."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RELAY_", "OTEL_"))
    } | {"PYTHONUNBUFFERED": "1"}


@dataclass
class Proc:
    """One child process, the leader of its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> Proc:
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
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

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code of a clean exit."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.popen.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class SandboxProcess:
    """The vendor sandbox served by ``worker.sandbox.serve`` in a process of its own."""

    def __init__(self, log_dir: Path, *, rate_limited: bool) -> None:
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        mode = "limited" if rate_limited else "unlimited"
        argv = [sys.executable, "-c", SANDBOX_SCRIPT, HOST, str(self.port), mode]
        self.proc = Proc.start("sandbox", argv, _clean_environment(), log_dir / "sandbox.log")
        self._http = httpx.Client(base_url=self.base_url, timeout=10)
        self._wait_started()

    def _wait_started(self) -> None:
        give_up_at = time.monotonic() + SANDBOX_START_TIMEOUT_S
        while time.monotonic() < give_up_at:
            if not self.proc.alive():
                raise RuntimeError(f"sandbox exited at start:\n{self.proc.log_tail()}")
            try:
                if self._http.get("/_sandbox/stats").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sandbox did not answer within {SANDBOX_START_TIMEOUT_S:g}s")

    def stats(self) -> dict[str, Any]:
        """calls, statuses and effects per route, collects, throttled, and
        max_calls_in_window (vendor -> account -> calls in the busiest second)."""
        response = self._http.get("/_sandbox/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def set_faults(self, **faults: Any) -> None:
        """Replace the fault switches (``Faults`` fields: latency_ms, throttle_rate, …)."""
        self._http.put("/_sandbox/faults", content=json.dumps(faults)).raise_for_status()

    def close(self) -> None:
        self._http.close()
        self.proc.stop()


def tenants_json(base_url: str, eset_users: Mapping[str, str] | None = None) -> str:
    """``RELAY_TENANTS``: the demo's sandbox tenant, with its secrets written out, as
    ``default``; with ``eset_users`` (tenant -> ESET user, see :func:`eset_sub_account`),
    more tenants like it, each with that ESET user instead."""
    config = SandboxConfig()
    tenant = sandbox_tenant(base_url, config).model_dump(mode="json")
    # model_dump masks SecretStr values; the sandbox accepts its own defaults.
    tenant["eset"]["password"] = config.eset_password
    tenant["fylr"]["client_secret"] = config.fylr_client_secret
    tenant["fylr"]["password"] = config.fylr_password
    tenant["spaaza"]["token_secret"] = config.spaaza_token_secret
    tenants = {"default": tenant}
    for name, username in (eset_users or {}).items():
        tenants[name] = {**tenant, "eset": {**tenant["eset"], "username": username}}
    return json.dumps(tenants)


def eset_sub_account(name: str) -> str:
    """The sandbox's ESET user sub-addressed with ``name`` (``api+name@…``): an account of
    its own there, with its own rate limit, and the same password."""
    local, _, domain = SandboxConfig().eset_username.partition("@")
    return f"{local}+{name}@{domain}"


@dataclass
class ExitRecord:
    """A replica process that ended, and why."""

    name: str
    returncode: int | None
    expected: bool  # killed or stopped by the scenario, not crashed


class Fleet:
    """Worker replicas (``python -m worker.cli run``), each restartable by index."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, replicas: int) -> None:
        self.env = _clean_environment() | dict(env)
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.exits: list[ExitRecord] = []
        self.starts = 0
        for index in range(replicas):
            self.procs.append(self._start(index))

    def _start(self, index: int) -> Proc:
        self.starts += 1
        name = f"replica-{index}"
        argv = [sys.executable, "-m", "worker.cli", "run"]
        return Proc.start(name, argv, self.env, self.log_dir / f"{name}.log")

    def check_alive(self) -> None:
        """Note replicas that died on their own, and start them again."""
        for index, proc in enumerate(self.procs):
            if not proc.alive():
                self.exits.append(ExitRecord(proc.name, proc.popen.returncode, expected=False))
                self.procs[index] = self._start(index)

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` (no chance to finish anything)."""
        proc = self.procs[index]
        crashed = not proc.alive()  # it died before the scenario could kill it
        proc.kill()
        self.exits.append(ExitRecord(proc.name, proc.popen.returncode, expected=not crashed))

    def terminate(self, index: int, timeout_s: float) -> int | None:
        """SIGTERM replica ``index`` and wait for it; its exit code (None: it hung)."""
        proc = self.procs[index]
        returncode = proc.stop(timeout_s)
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
        """Stop every replica at once (SIGTERM, SIGKILL after ``timeout_s``); their exit
        codes (None: killed after hanging)."""
        for proc in self.procs:
            if proc.alive():
                proc.signal(signal.SIGTERM)
        give_up_at = time.monotonic() + timeout_s
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.popen.wait(max(0.0, give_up_at - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        return codes


class RedisServer:
    """A ``redis-server`` of the scenario's own, on a free port, that it can kill and start
    again without touching the Redis the rest of the suite (and anyone else) uses.

    Like a production Redis, and unlike the throwaway one of ``.ci/services``, it keeps
    its data across a restart: every write goes to its append-only file before it is
    answered (``appendfsync always``), so a kill loses nothing it acknowledged.
    """

    def __init__(self, log_dir: Path, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = log_dir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "redis.log"
        self.proc: Proc | None = None
        self.starts = 0

    @classmethod
    def binary_path(cls) -> str | None:
        return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self) -> None:
        """Start it (on the same port, with the same data) and wait until it answers."""
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        self.proc = Proc.start("redis", argv, _clean_environment(), self.log_path)
        self.starts += 1
        give_up_at = time.monotonic() + REDIS_START_TIMEOUT_S
        with redis.Redis(host=HOST, port=self.port, socket_timeout=1) as client:
            while time.monotonic() < give_up_at:
                if not self.proc.alive():
                    raise RuntimeError(f"redis-server exited at start:\n{self.proc.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within {REDIS_START_TIMEOUT_S:g}s")

    def kill(self) -> None:
        """SIGKILL: clients see refused connections until :meth:`start`."""
        if self.proc is not None:
            self.proc.kill()

    def close(self) -> None:
        self.kill()


def diagnostics(fleet: Fleet | None, sandbox: SandboxProcess | None, log_dir: Path) -> str:
    """Log tails of the replicas and the sandbox, and where the whole logs are, for a
    failure message."""
    parts = []
    if fleet is not None:
        parts.append(fleet.log_tails())
        parts.extend(f"crashed: {record}" for record in fleet.crashes)
    if sandbox is not None:
        parts.append(f"--- sandbox\n{sandbox.proc.log_tail(10)}")
    parts.append(f"logs in {log_dir}")
    return "\n".join(parts)
