"""Chaos scenarios: worker replicas as separate processes against real RabbitMQ and Redis,
with the sandbox vendors, each scenario bounded in time.

What every scenario checks, from the outside: each command id gets a terminal event, no
key's effect is applied twice at the vendor, and each duplicate (a key sent again) is
answered by a ``replayed`` event. The figures are reported per scenario (see conftest).

    pytest -q -m chaos tests/chaos -p no:cacheprovider        # CHAOS_SCALE=0.5 for less
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from .checks import assert_clean, assert_single_effects, missing
from .conftest import Report
from .figures import EFFECT_ROUTE, batch_deletes
from .rig import ChaosRig

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SCALE = float(os.environ.get("CHAOS_SCALE", "1"))
DUPLICATE_SHARE = 0.1
DEADLINE_S = 180.0  # each command's own deadline, far beyond any scenario's length
# Where replicas are killed, a dead holder's claims must be taken over within the run;
# elsewhere no holder dies, and a lease no live holder outlives keeps that question out.
DEAD_LEASE_S = 3.0
LIVE_LEASE_S = 30.0


def keys(count: int) -> int:
    return max(50, int(count * SCALE))


class RateTargetMissed(AssertionError):
    """Raised when the shared rate limit is not used to >= 95% or draws > 1% of 429s."""


class RateLimitExceeded(AssertionError):
    """Raised when more calls than the limit arrived at the vendor within one second."""


@pytest.mark.timeout(240)
def test_sigkill_replicas_repeatedly(rig: ChaosRig, report: Report):
    """3 replicas; every ~1.5 s a random one is SIGKILLed and started again."""
    replicas, kill_every_s = 3, 1.5
    rig.start(replicas=replicas, claim_lease_s=DEAD_LEASE_S)
    workload = batch_deletes(keys(2000), duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    rng = random.Random()
    kills: list[float] = []

    def kill_one(elapsed_s: float) -> None:
        if elapsed_s < (kills[-1] if kills else 0.0) + kill_every_s:
            return
        assert rig.fleet is not None
        index = rng.randrange(replicas)
        rig.fleet.kill(index)
        rig.fleet.restart(index)
        kills.append(elapsed_s)

    rig.publish(workload, background=True)
    answered = rig.run_until_answered(workload, timeout_s=150, chaos=kill_one)
    figures = rig.finish(workload)
    figures.extra["sigkills"] = len(kills)
    report(figures)

    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert len(kills) >= 3, "the run ended before the replicas were killed a few times"
    assert_clean(figures, rig)
    assert_single_effects(figures)


@pytest.mark.timeout(240)
def test_rabbitmq_stopped_and_started_mid_run(rig: ChaosRig, report: Report):
    """3 replicas; RabbitMQ's app is stopped for ~5 s once a share of the work is done."""
    if rig.ctl is None:
        missing("rabbitmqctl is not usable here (set CHAOS_RABBITMQCTL to reach the node)")
    rig.start(replicas=3, claim_lease_s=LIVE_LEASE_S)
    workload = batch_deletes(keys(1500), duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    total = len(workload.commands)
    outage: dict[str, float] = {}

    def stop_and_start(elapsed_s: float) -> None:
        if outage or rig.answered(workload) < 0.2 * total:
            return
        outage["answered_before"] = rig.answered(workload) / total
        outage["at_s"] = elapsed_s
        rig.stop_rabbitmq()
        time.sleep(5)
        stopped_s = rig.elapsed_s - elapsed_s
        rig.start_rabbitmq()
        outage["down_s"] = rig.elapsed_s - elapsed_s
        outage["stopped_s"] = stopped_s

    # A publisher must survive the outage too: everything goes out before it.
    rig.sandbox_faults(latency_ms=20)  # keeps work in flight when the broker goes away
    rig.publish(workload)
    answered = rig.run_until_answered(workload, timeout_s=180, chaos=stop_and_start)
    figures = rig.finish(workload)
    if outage and rig.answered_at is not None:  # from the broker's return to the last event
        outage["recovered_s"] = rig.answered_at - rig.started_at - outage["at_s"] - outage["down_s"]
    figures.extra.update({f"outage_{k}": round(v, 2) for k, v in outage.items()})
    report(figures)

    assert outage, "the outage never happened"
    assert outage["answered_before"] < 0.9, "the outage came too late to matter"
    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_clean(figures, rig)
    assert_single_effects(figures)


@pytest.mark.timeout(180)
def test_vendor_faults_all_commands_succeed(rig: ChaosRig, report: Report):
    """5xx, 429, 202-first (each ~10% of calls) and 20 ms latency: all succeed in time.

    While a 202'd mutation can be sent again (test_a_202_mutation_whose_collects_fail_…),
    a run now and then finds a key applied twice: when every collect of one round failed.
    """
    rig.start(replicas=3, claim_lease_s=LIVE_LEASE_S)
    rig.sandbox_faults(latency_ms=20, error_rate=0.1, throttle_rate=0.1, accepted_first_rate=0.1)
    workload = batch_deletes(keys(500), duplicate_share=DUPLICATE_SHARE, deadline_s=120)
    rig.publish(workload)
    answered = rig.run_until_answered(workload, timeout_s=120)
    figures = rig.finish(workload)
    assert rig.sandbox is not None
    stats = rig.sandbox.stats()
    figures.extra["statuses"] = stats["statuses"].get(EFFECT_ROUTE, {})
    figures.extra["collects"] = stats["collects"]
    report(figures)

    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_clean(figures, rig, all_succeed=True)
    assert_single_effects(figures)


@pytest.mark.timeout(180)
def test_four_replicas_share_the_vendor_rate_limit(rig: ChaosRig, report: Report):
    """4 replicas, one ESET account limited to 10 calls/s: the budget is used, not exceeded.

    Measured over a steady window (from 2 s after the first call, 12 s long) of a backlog
    larger than the window can drain: successful calls per second and the share of 429s.
    Over the whole run, the sandbox's busiest second (calls that arrived, 429s included,
    in any sliding second) must stay within the limit.
    """
    limit_per_s, warmup_s, window_s = 10, 2.0, 12.0
    rig.start(replicas=4, rate_limited=True, claim_lease_s=LIVE_LEASE_S)
    backlog = int(limit_per_s * (warmup_s + window_s) * 1.5)  # ~21 s of work
    workload = batch_deletes(backlog, duplicate_share=0, deadline_s=DEADLINE_S)
    samples: list[tuple[float, int, int]] = []  # (time, 2xx calls, 429s)

    def sample(elapsed_s: float) -> None:
        if samples and elapsed_s - samples[-1][0] < 0.5:
            return
        assert rig.sandbox is not None
        statuses = rig.sandbox.stats()["statuses"].get(EFFECT_ROUTE, {})
        ok = sum(n for status, n in statuses.items() if status.startswith("2"))
        samples.append((elapsed_s, ok, statuses.get("429", 0)))

    rig.publish(workload)
    answered = rig.run_until_answered(workload, timeout_s=90, chaos=sample)
    figures = rig.finish(workload)
    calls_per_s, share_429, measured_s = steady_rate(samples, warmup_s, window_s)
    assert rig.sandbox is not None
    stats = rig.sandbox.stats()
    busiest = busiest_second(stats, "eset")
    figures.extra.update(
        {
            "calls_per_s": round(calls_per_s, 2),
            "share_429": round(share_429, 4),
            "window_s": round(measured_s, 1),
            "throttled_total": stats["throttled"],
            "max_calls_in_window": busiest,
        }
    )
    report(figures)

    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_clean(figures, rig)
    assert_single_effects(figures)
    assert measured_s >= window_s - 1, f"the backlog ran out before the window ended: {samples}"
    if calls_per_s < 0.95 * limit_per_s or share_429 > 0.01:
        raise RateTargetMissed(figures.summary())
    assert busiest, f"the sandbox saw no ESET calls: {stats}"
    over = {account: calls for account, calls in busiest.items() if calls > limit_per_s}
    if over:
        raise RateLimitExceeded(
            f"calls arrived in one second, per ESET account: {over} (limit {limit_per_s})\n"
            + figures.summary()
        )


def busiest_second(stats: dict[str, Any], vendor: str) -> dict[str, int]:
    """Per account of ``vendor``: the most calls that arrived (admitted or 429) within
    any sliding second, as the sandbox counted them."""
    return dict(stats.get("max_calls_in_window", {}).get(vendor, {}))


def steady_rate(
    samples: list[tuple[float, int, int]], warmup_s: float, window_s: float
) -> tuple[float, float, float]:
    """(2xx calls per second, share of 429s, seconds measured) over the window that
    starts ``warmup_s`` after the first call was seen."""
    first = next((t for t, ok, throttled in samples if ok + throttled), None)
    if first is None:
        return 0.0, 0.0, 0.0
    window = [s for s in samples if first + warmup_s <= s[0] <= first + warmup_s + window_s]
    if len(window) < 2:
        return 0.0, 0.0, 0.0
    (t0, ok0, throttled0), (t1, ok1, throttled1) = window[0], window[-1]
    calls = (ok1 - ok0) + (throttled1 - throttled0)
    return (ok1 - ok0) / (t1 - t0), (throttled1 - throttled0) / max(calls, 1), t1 - t0


@pytest.mark.timeout(180)
def test_sigterm_with_commands_in_flight(rig: ChaosRig, report: Report):
    """A replica SIGTERMed while its commands wait on a slow vendor finishes them, exits
    0, and is started again: nothing lost, nothing done twice, no command redelivered."""
    rig.start(replicas=2, claim_lease_s=LIVE_LEASE_S)
    rig.sandbox_faults(latency_ms=300)
    workload = batch_deletes(keys(400), duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    rig.publish(workload)
    give_up_at = time.monotonic() + 30
    while rig.answered(workload) < 40 and time.monotonic() < give_up_at:
        time.sleep(0.05)
    backlog = rig.admin.queue_state(rig.names.command_queue)
    assert rig.fleet is not None
    terminated_at = time.monotonic()
    exit_code = rig.fleet.terminate(0, timeout_s=40)
    exit_s = time.monotonic() - terminated_at
    rig.fleet.restart(0)
    answered = rig.run_until_answered(workload, timeout_s=120)
    figures = rig.finish(workload)
    figures.extra.update(
        {
            "backlog_at_sigterm": backlog[0] if backlog else None,
            "sigterm_exit_code": exit_code,
            "sigterm_exit_s": round(exit_s, 2),
        }
    )
    report(figures)

    assert backlog is not None and backlog[0] > 0, "no backlog: the replica had nothing in flight"
    assert exit_code == 0, f"SIGTERM exit code {exit_code}\n{rig.diagnostics()}"
    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_clean(figures, rig, all_succeed=True)
    assert_single_effects(figures)
    assert figures.commands_with_repeated_events == 0, "in-flight commands were redelivered"


@pytest.mark.timeout(90)
def test_a_202_mutation_whose_collects_fail_is_not_sent_again(rig: ChaosRig, report: Report):
    """ESET answers 202, then every collect of one retry round fails: whatever the
    command's outcome, the vendor applies the deletion once."""
    attempts = 3
    rig.start(replicas=1, claim_lease_s=LIVE_LEASE_S, RELAY_RETRY_MAX_ATTEMPTS=str(attempts))
    collect_errors = [{"status": 503, "path_contains": "quarantined-objects"}] * attempts
    rig.sandbox_faults(script=[{"status": 202}, *collect_errors])
    workload = batch_deletes(1, duplicate_share=0, deadline_s=DEADLINE_S)
    rig.publish(workload)
    answered = rig.run_until_answered(workload, timeout_s=60)
    figures = rig.finish(workload)
    report(figures)

    assert answered, f"no terminal event\n{figures.summary()}\n{rig.diagnostics()}"
    assert_single_effects(figures)


@pytest.mark.timeout(90)
def test_a_holder_slower_than_its_lease_keeps_its_key(rig: ChaosRig, report: Report):
    """A vendor call outlasting the claim lease, and a duplicate of it waiting: the
    duplicate is answered from the holder's result, not sent to the vendor again."""
    # The duplicate, deferred while the key is held, comes back after the 2 s lease has
    # run out and long before the 6 s call ends.
    rig.start(replicas=2, claim_lease_s=2.0)
    rig.sandbox_faults(latency_ms=6000)
    workload = batch_deletes(1, duplicate_share=1.0, deadline_s=DEADLINE_S)
    rig.publish(workload)
    answered = rig.run_until_answered(workload, timeout_s=60)
    figures = rig.finish(workload)
    report(figures)

    assert answered, f"not all commands answered\n{figures.summary()}\n{rig.diagnostics()}"
    assert_single_effects(figures)
    assert_clean(figures, rig, all_succeed=True)
