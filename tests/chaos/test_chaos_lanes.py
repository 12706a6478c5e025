"""Chaos: one account flooded, replicas SIGKILLed and RabbitMQ restarted meanwhile.

Tenant ``flood`` sends ~400 batch deletes at once to its ESET account (10 calls/s: ~40 s
of work); tenant ``quiet`` sends a steady 2 commands/s beside it, fylr cancels and ESET
patching reads on an ESET account of its own. While the flood is worked off, replicas
are SIGKILLed and started again, and RabbitMQ is stopped and started once.

What must hold whatever the worker does: every command id gets exactly one terminal
event, no key's effect is applied twice at the vendor (batch deletes and fylr cancels),
duplicates are replayed, no replica crashes. What lanes add: the quiet tenant's commands
do not wait behind the flood. That is asserted loosely, by order rather than by time:
most quiet commands published while the flood still had a large backlog are answered
before the flood has worked off half of that backlog (behind it in the command queue,
they would wait for all of it but what the replicas hold prefetched). The latencies of
the quiet commands that met no outage are reported (p50/p99), not asserted.

The replicas run 8 handlers each (a prefetch of 16): a production flood outnumbers the
replicas' prefetch many times over, and so must this one, though it is only ~40 s long.

    pytest -q -s -m chaos tests/chaos/test_chaos_lanes.py
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .checks import assert_clean, assert_single_effects, missing
from .conftest import Report
from .figures import EFFECT_ROUTE, Workload, batch_deletes
from .rig import ChaosRig

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

FLOOD, QUIET = "flood", "quiet"  # tenants, each with an ESET account of its own
FLOOD_KEYS = 360  # with 10% sent twice ~400 commands: ~40 s of the account's 10 calls/s
DUPLICATE_SHARE = 0.1
QUIET_RATE_PER_S = 2.0
QUIET_COMMANDS = 90  # ~45 s of stream, about as long as the flood
REPLICAS = 3
CONCURRENCY = 8  # per replica (prefetch 16): the flood is many times what they hold
LEASE_S = 3.0  # replicas are killed: a dead holder's claims are taken over within the run
DEADLINE_S = 240.0  # each command's own, far beyond the run
ANSWER_TIMEOUT_S = 150.0
# The chaos, in order, each step this long after the previous one ended.
PLAN: list[tuple[str, float]] = [("kill", 5.0), ("outage", 6.0), ("kill", 8.0), ("kill", 8.0)]
OUTAGE_S = 5.0  # RabbitMQ's app stopped this long
# Quiet commands waiting across these windows are left out of the calm latencies: from a
# SIGKILL until its claims' leases ran out and a deferral came back; from RabbitMQ's stop
# until the replicas had consumed again for a while.
KILL_WINDOW_S = LEASE_S + 5.0
OUTAGE_RECOVERY_S = 5.0
# The lanes check counts quiet commands published while the flood had this many commands
# without an event (so that waiting behind it shows), and needs at least MIN_SAMPLES.
FLOOD_BACKLOG = 150
MIN_SAMPLES = 10
BEHIND_FLOOD_MAX = 0.5


class QuietWaitedBehindFlood(AssertionError):
    """Raised when the quiet tenant's commands waited for the flooded account's backlog."""


def quiet_commands(count: int, *, deadline_s: float) -> Workload:
    """``count`` commands of tenant ``quiet``, alternately a fylr cancel of a task of its
    own and an ESET patching read (no effect), each under a key of its own."""
    run = uuid.uuid4().hex[:8]
    deadline = (datetime.now(UTC) + timedelta(seconds=deadline_s)).isoformat()
    first_task = random.randrange(1, 800_000)  # sandbox tasks below 900000 exist
    commands: list[dict[str, Any]] = []
    object_by_key: dict[str, str] = {}
    route_by_key: dict[str, str | None] = {}
    for index in range(count):
        key = f"quiet-{run}-{index}"
        command: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "idempotency_key": key,
            "tenant": QUIET,
            "deadline": deadline,
        }
        if index % 2 == 0:
            task_id = first_task + index
            command |= {"type": "cancel-task", "params": {"task_id": task_id}}
            object_by_key[key], route_by_key[key] = str(task_id), "fylr.cancel"
        else:
            command |= {"type": "fetch-patching", "params": {}}
            object_by_key[key], route_by_key[key] = "", None
        commands.append(command)
    return Workload(commands, object_by_key, route_by_key)


@dataclass
class Chaos:
    """Runs :data:`PLAN` from the scenario's clock; records when each step happened."""

    rig: ChaosRig
    flood: Workload
    pause_publishing: Callable[[], AbstractContextManager[None]]  # held while RabbitMQ is down

    def __post_init__(self) -> None:
        self.steps = list(PLAN)
        self.next_at_s = self.steps[0][1]
        self.rng = random.Random()
        self.kills: list[float] = []  # monotonic
        self.outages: list[tuple[float, float]] = []  # (stopped at, started again at)
        self.outage: dict[str, float] = {}

    def __call__(self, elapsed_s: float) -> None:
        if not self.steps or elapsed_s < self.next_at_s:
            return
        step, _ = self.steps.pop(0)
        if step == "kill":
            self._kill()
        else:
            self._stop_and_start(elapsed_s)
        if self.steps:
            self.next_at_s = self.rig.elapsed_s + self.steps[0][1]

    def _kill(self) -> None:
        assert self.rig.fleet is not None
        index = self.rng.randrange(REPLICAS)
        self.rig.fleet.kill(index)
        self.kills.append(time.monotonic())
        self.rig.fleet.restart(index)

    def _stop_and_start(self, elapsed_s: float) -> None:
        flood = len(self.flood.commands)
        self.outage["flood_answered_before"] = self.rig.answered(self.flood) / flood
        self.outage["at_s"] = elapsed_s
        with self.pause_publishing():
            stopped_at = time.monotonic()
            self.rig.stop_rabbitmq()
            time.sleep(OUTAGE_S)
            self.outage["stopped_s"] = self.rig.elapsed_s - elapsed_s
            self.rig.start_rabbitmq()
            self.outages.append((stopped_at, time.monotonic()))
        self.outage["down_s"] = self.rig.elapsed_s - elapsed_s

    def windows(self) -> list[tuple[float, float]]:
        """Spans (monotonic) in which the chaos held commands up."""
        return [(at, at + KILL_WINDOW_S) for at in self.kills] + [
            (stopped, started + OUTAGE_RECOVERY_S) for stopped, started in self.outages
        ]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def quiet_figures(
    rig: ChaosRig, flood: Workload, quiet: Workload, windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """Latencies of the quiet commands (all, and those that met no chaos window) and how
    much of the flood's backlog each waited for."""
    assert rig.collector is not None
    first_seen = rig.collector.first_seen()
    flood_answers = sorted(first_seen[i] for i in flood.command_ids if i in first_seen)
    flood_total = len(flood.commands)

    def flood_answered_by(at: float) -> int:
        return bisect.bisect_right(flood_answers, at)

    latencies: list[float] = []
    calm: list[float] = []
    behind: list[float] = []  # share of the flood backlog at publishing answered before it
    answered_before_flood_end = published_before_flood_end = 0
    flood_end = flood_answers[-1] if len(flood_answers) == flood_total else math.inf
    for command_id in quiet.command_ids:
        published, answered = rig.published_at.get(command_id), first_seen.get(command_id)
        if published is None or answered is None:
            continue
        latency = answered - published
        latencies.append(latency)
        if not any(start <= answered and published <= end for start, end in windows):
            calm.append(latency)
        backlog = flood_total - flood_answered_by(published)
        if backlog >= FLOOD_BACKLOG:
            behind.append((flood_answered_by(answered) - flood_answered_by(published)) / backlog)
        if published < flood_end:
            published_before_flood_end += 1
            answered_before_flood_end += int(answered <= flood_end)

    def seconds(values: list[float], share: float) -> float | None:
        return round(percentile(values, share), 3) if values else None

    return {
        "flood_s": round(flood_end - rig.started_at, 1) if flood_end < math.inf else None,
        "quiet_p50_s": seconds(calm, 0.5),
        "quiet_p99_s": seconds(calm, 0.99),
        "quiet_calm": len(calm),
        "quiet_p50_all_s": seconds(latencies, 0.5),
        "quiet_p99_all_s": seconds(latencies, 0.99),
        "quiet_answered_in_flood": f"{answered_before_flood_end}/{published_before_flood_end}",
        "quiet_behind_flood_p50": round(statistics.median(behind), 3) if behind else None,
        "quiet_behind_flood_samples": len(behind),
    }


@pytest.mark.timeout(240)
def test_flooded_account_through_kills_and_a_rabbitmq_restart(rig: ChaosRig, report: Report):
    """3 replicas share Redis and ESET's 10 calls/s per account; one account is flooded
    while another tenant streams; replicas are SIGKILLed, RabbitMQ stopped and started."""
    if rig.ctl is None:
        missing("rabbitmqctl is not usable here (set CHAOS_RABBITMQCTL to reach the node)")
    rig.start(
        replicas=REPLICAS,
        rate_limited=True,
        concurrency=CONCURRENCY,
        claim_lease_s=LEASE_S,
        tenants=(FLOOD, QUIET),
    )
    flood = batch_deletes(
        FLOOD_KEYS, duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S, tenant=FLOOD
    )
    quiet = quiet_commands(QUIET_COMMANDS, deadline_s=DEADLINE_S)
    workload = flood + quiet

    rig.publish(flood)  # all at once, before the stream: the clock starts here
    stream = rig.publish_stream(quiet, QUIET_RATE_PER_S)
    chaos = Chaos(rig, flood, stream.paused)
    answered = rig.run_until_answered(workload, timeout_s=ANSWER_TIMEOUT_S, chaos=chaos)
    figures = rig.finish(workload)

    assert rig.sandbox is not None and rig.collector is not None
    stats = rig.sandbox.stats()
    quiet_ids = set(quiet.command_ids)
    quiet_outcomes = Counter(
        seen[0].outcome + (f":{seen[0].error_code}" if seen[0].error_code else "")
        for command_id, seen in rig.collector.by_command().items()
        if command_id in quiet_ids and seen
    )
    figures.extra.update(quiet_figures(rig, flood, quiet, chaos.windows()))
    figures.extra.update(
        {
            "sigkills": len(chaos.kills),
            **{f"outage_{k}": round(v, 2) for k, v in chaos.outage.items()},
            "quiet_outcomes": dict(sorted(quiet_outcomes.items())),
            "fylr_cancels": stats["calls"].get("fylr.cancel", 0),
            "patching_reads": stats["calls"].get("eset.fetch_patching", 0),
            "throttled": stats["throttled"],
            "max_calls_in_window": stats.get("max_calls_in_window", {}).get("eset", {}),
            "flood_calls": stats["calls"].get(EFFECT_ROUTE, 0),
        }
    )
    report(figures)

    assert chaos.outage, "the outage never happened"
    assert chaos.outage["flood_answered_before"] < 0.9, "the outage came too late to matter"
    assert len(chaos.kills) >= 2, "the run ended before the replicas were killed a few times"
    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_clean(figures, rig)
    assert_single_effects(figures)
    samples = figures.extra["quiet_behind_flood_samples"]
    assert samples >= MIN_SAMPLES, f"too few quiet commands met the flood\n{figures.summary()}"
    if figures.extra["quiet_behind_flood_p50"] >= BEHIND_FLOOD_MAX:
        raise QuietWaitedBehindFlood(
            "the quiet tenant's commands waited for the flooded account's backlog\n"
            + figures.summary()
        )
