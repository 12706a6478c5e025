"""One run's world, whatever measures it: its broker names, the vendor sandbox and the
worker replicas as processes, and the collectors of its result events. A benchmark run
(``bench/run.py``) and a chaos scenario (``tests/chaos/scenario.py``) each build on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.rig.events import Consume, EventCollector
from bench.rig.names import Names
from bench.rig.procs import Procs
from bench.rig.replicas import Fleet, worker_env
from bench.rig.sandbox import SandboxProcess


class World:
    def __init__(self, names: Names, broker_url: str, log_dir: Path) -> None:
        self.names = names
        self.broker_url = broker_url
        self.procs = Procs(log_dir)
        self.topology = names.topology(broker_url)
        self.sandbox: SandboxProcess | None = None
        self.fleet: Fleet | None = None
        self.collector: EventCollector | None = None  # the run's events, once collected
        self._collectors: list[EventCollector] = []

    def start_sandbox(self, *, rate_limited: bool, latency_ms: float = 0.0) -> SandboxProcess:
        self.sandbox = SandboxProcess(self.procs, rate_limited=rate_limited,
                                      latency_ms=latency_ms)
        return self.sandbox

    def start_replicas(
        self, replicas: int, *, store_url: str, rate_limit_url: str,
        rate_limits: Mapping[str, str], tenants: Mapping[str, Any], env: Mapping[str, str],
        health_ports: Sequence[int] = (), replica_env: Sequence[Mapping[str, str]] = (),
    ) -> Fleet:
        """``replicas`` workers against the sandbox, with the stores, ``rate_limits`` and
        ``tenants`` given; ``env`` adds to and overrides their settings, and
        ``replica_env[i]`` those of replica i."""
        assert self.sandbox is not None, "the sandbox first"
        # With the tenants, the topology knows the lanes the replicas declare.
        self.topology = self.names.topology(
            self.broker_url, tenants=tenants, rate_limits=rate_limits
        )
        settings = worker_env(
            self.names, self.sandbox.base_url, broker_url=self.broker_url, store_url=store_url,
            rate_limit_url=rate_limit_url, rate_limits=rate_limits, tenants=tenants,
        )
        self.fleet = Fleet(self.procs, {**settings, **env}, replicas, health_ports, replica_env)
        return self.fleet

    def collect(
        self, consume: Consume, reconnect_on: tuple[type[BaseException], ...] = ()
    ) -> EventCollector:
        """A collector (see :class:`EventCollector`) from now on, stopped with the others."""
        collector = EventCollector(consume, reconnect_on).start()
        self._collectors.append(collector)
        return collector

    def stop_collectors(self) -> None:
        for collector in self._collectors:
            collector.stop()
