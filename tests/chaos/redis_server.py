"""A Redis of the scenario's own, which it can kill and start again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from bench.rig.procs import HOST, Proc, clean_environment, free_port

START_TIMEOUT_S = 20.0


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
        self.proc = Proc.start("redis", argv, clean_environment(), self.log_path)
        self.starts += 1
        give_up_at = time.monotonic() + START_TIMEOUT_S
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
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S:g}s")

    def kill(self) -> None:
        """SIGKILL: clients see refused connections until :meth:`start`."""
        if self.proc is not None:
            self.proc.kill()

    def close(self) -> None:
        self.kill()
