"""What a scenario's rig adds to the shared world (``bench/rig/world.py``) on either broker
(RabbitMQ in ``rig.py``, the embedded one in ``embedded.py``): the replicas' chaos
settings, the scenario's clock, waiting for answers, the closing figures, the diagnostics
of a failure and the teardown."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.rig.names import Names
from bench.rig.sandbox import ESET_RATE_LIMITS
from bench.rig.tenants import ALL_VENDORS, sandbox_tenants
from bench.rig.world import World

from .figures import Figures, Workload, compute

SETTLE_S = 1.0  # after the last command is answered, for late replays to arrive
POLL_S = 0.1

Chaos = Callable[[float], None]  # called with the seconds since publishing started


class ScenarioRig(World):
    def __init__(
        self, scenario: str, log_dir: Path, broker_url: str, *, store_url: str,
        rate_limit_url: str,
    ) -> None:
        super().__init__(Names.unique("chaos", scenario), broker_url, log_dir)
        self.scenario = scenario
        self.log_dir = log_dir
        self.store_url = store_url  # idempotency
        self.rate_limit_url = rate_limit_url
        self.started_at = 0.0
        self.answered_at: float | None = None
        self.extra: dict[str, Any] = {}

    def _start_replicas(
        self,
        replicas: int,
        *,
        rate_limited: bool,
        tenants: Iterable[str],
        claim_lease_s: float,
        settings: dict[str, str],
        replica_env: Sequence[Mapping[str, str]] = (),
    ) -> None:
        """The sandbox, then ``replicas`` workers against it and the stores. ``tenants``:
        besides ``default``, each with accounts of its own (an ESET user of its own: a
        rate limit of its own). ``replica_env[i]``: replica i's own settings on top."""
        sandbox = self.start_sandbox(rate_limited=rate_limited)
        self.start_replicas(
            replicas,
            store_url=self.store_url,
            rate_limit_url=self.rate_limit_url,
            rate_limits=ESET_RATE_LIMITS if rate_limited else {},
            tenants=sandbox_tenants(
                sandbox.base_url, {name: ALL_VENDORS for name in ["default", *tenants]}
            ),
            env={
                "RELAY_RETRY_INITIAL_WAIT_S": "0.05",
                "RELAY_COLLECT_INTERVAL_S": "0.1",
                "RELAY_CLAIM_LEASE_S": str(claim_lease_s),
                # Per-command lines cost CPU the replicas need; CHAOS_LOG_LEVEL=INFO to
                # see them.
                "RELAY_LOG_LEVEL": os.environ.get("CHAOS_LOG_LEVEL", "WARNING"),
                "RELAY_LOG_FORMAT": "json",  # with command ids and keys, to trace one key
                **settings,
            },
            replica_env=replica_env,
        )

    # --- running ---

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def answered(self, workload: Workload) -> int:
        assert self.collector is not None
        return self.collector.answered(workload.command_ids)

    def run_until(
        self, done: Callable[[], bool], timeout_s: float, chaos: Chaos | None = None
    ) -> bool:
        """Until ``done()`` (True) or ``timeout_s`` after publishing started, calling
        ``chaos`` on the way; replicas that die on their own are started again (and
        counted as crashes)."""
        assert self.fleet is not None
        give_up_at = self.started_at + timeout_s
        while time.monotonic() < give_up_at:
            self._check_publishing()
            self.fleet.check_alive()
            if done():
                self.answered_at = time.monotonic()
                return True
            if chaos is not None:
                chaos(self.elapsed_s)
            time.sleep(POLL_S)
        return False

    def _check_publishing(self) -> None:
        """Raise when publishing in the background failed; nothing does, unless a rig
        publishes in the background."""

    # --- results ---

    def finish(self, workload: Workload) -> Figures:
        """Let late events arrive, stop the replicas (SIGTERM; a replica found dead counts
        as a crash), and compute the figures, with what the collector noticed."""
        assert self.fleet is not None and self.sandbox is not None and self.collector is not None
        duration_s = (self.answered_at or time.monotonic()) - self.started_at
        time.sleep(SETTLE_S)
        self._note_leftovers()
        self.fleet.check_alive()
        self.extra["exit_codes_at_end"] = self.fleet.close()
        self.extra["crashes"] = len(self.fleet.crashes)
        events, stats = self.collector.by_command(), self.sandbox.stats()
        figures = compute(self.scenario, workload, events, stats, duration_s)
        figures.extra.update(self.extra)
        if self.collector.reconnects:
            figures.extra["observer_reconnects"] = self.collector.reconnects
        if self.collector.undecodable:
            figures.extra["undecodable_events"] = self.collector.undecodable
        return figures

    def _note_leftovers(self) -> None:
        """Note in :attr:`extra` where commands without their event may still be."""

    def diagnostics(self) -> str:
        """Log tails of the replicas and the sandbox, and where the whole logs are, for a
        failure message."""
        parts = []
        if self.fleet is not None:
            parts.append(self.fleet.log_tails())
            parts.extend(f"crashed: {record}" for record in self.fleet.crashes)
        if self.sandbox is not None:
            parts.append(f"--- sandbox\n{self.sandbox.proc.log_tail(10)}")
        parts.append(f"logs in {self.log_dir}")
        return "\n".join(parts)

    # --- tearing down ---

    def close(self) -> None:
        """Every step is tried even when an earlier one failed; the first error is raised."""
        errors: list[BaseException] = []
        for step in self._closing_steps():
            try:
                step()
            except Exception as error:  # each step gets its chance
                errors.append(error)
        if errors:
            raise errors[0]

    def _closing_steps(self) -> list[Callable[[], None]]:
        # No grace for the processes: a finished scenario has stopped its replicas
        # already, and a failed one's are not worth waiting for.
        return [self.stop_collectors, lambda: self.procs.stop_all(timeout_s=0)]
