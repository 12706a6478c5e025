"""The vendor sandbox in a process of its own (``bench/sandbox_proc.py``), and what a run
asks of it: what it saw, and the faults it injects from now on."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from bench.rig.procs import Procs, clean_environment

START_TIMEOUT_S = 20.0
# ESET's documented limit per account: the sandbox enforces it when rate-limited (its
# SandboxConfig default), and replicas given ESET_RATE_LIMITS pace their calls to it.
ESET_LIMIT_PER_S = 10
ESET_RATE_LIMITS = {"eset": f"{ESET_LIMIT_PER_S}/second"}


class SandboxProcess:
    """Started in ``procs`` (and stopped with them); ready once it printed its base URL."""

    def __init__(self, procs: Procs, *, rate_limited: bool, latency_ms: float = 0.0) -> None:
        argv = [sys.executable, "-m", "bench.sandbox_proc", "--latency-ms", str(latency_ms)]
        if not rate_limited:
            argv.append("--no-rate-limit")
        self.proc = procs.start("sandbox", argv, clean_environment(), stdout_pipe=True)
        self.base_url = self.proc.read_line(START_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        """calls, statuses and effects per route, collects, throttled, and
        max_calls_in_window (vendor -> account -> calls in the busiest second)."""
        response = httpx.get(f"{self.base_url}/_sandbox/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def set_faults(self, **faults: Any) -> None:
        """Replace the fault switches (``Faults`` fields: latency_ms, throttle_rate, …)."""
        response = httpx.put(
            f"{self.base_url}/_sandbox/faults", content=json.dumps(faults), timeout=10
        )
        response.raise_for_status()
