"""Chaos: the idempotency and rate-limit store (Redis) goes away mid-stream.

While the store does not answer, a command can be neither claimed nor paced, so it must
be held (it waits, or goes back to the queue) rather than failed, and a replica takes no
new work until the store answers again. Once it is back, every command is done exactly
once: nothing ``failed`` (least of all ``internal_error``), nothing lost, no key applied
twice, no replica dead.

The scenario runs a Redis of its own (``redis-server`` on a free port, data kept across
the restart) and kills that one, so the Redis the rest of the suite uses, and whoever
else is using it, never sees the outage.

    pytest -q -s -rA -m chaos tests/chaos/test_chaos_redis_outage.py
"""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from .conftest import Report
from .figures import EFFECT_ROUTE, Figures, Workload, batch_deletes
from .redis_server import RedisServer
from .rig import ChaosRig

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

RATE_PER_S = 10.0  # the stream: about ESET's limit, so the backlog of the outage shows
KEYS = 270  # with 10% sent twice: ~300 commands, ~30 s of stream
DUPLICATE_SHARE = 0.1
OUTAGE_AT_S = 10.0  # after publishing started
OUTAGE_S = 10.0
DEADLINE_S = 180.0
LEASE_S = 30.0  # no holder dies here: a lease no live holder outlives (outage included)
ANSWER_TIMEOUT_S = 120.0


@pytest.mark.timeout(180)
def test_redis_stopped_and_started_mid_stream(
    redis_server: RedisServer, rig: ChaosRig, report: Report
):
    """3 replicas share Redis for idempotency and the ESET rate limit (10/s); ~10
    commands/s for ~30 s, 10% of the keys sent twice; Redis is killed 10 s in and
    started again 10 s later."""
    rig.start(
        replicas=3,
        rate_limited=True,
        claim_lease_s=LEASE_S,
        RELAY_IDEMPOTENCY_URL=redis_server.url,
        RELAY_RATE_LIMIT_URL=redis_server.url,
    )
    workload = batch_deletes(KEYS, duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    outage: dict[str, float] = {}

    def vendor_calls() -> int:
        assert rig.sandbox is not None
        return int(rig.sandbox.stats()["calls"].get(EFFECT_ROUTE, 0))

    def kill_and_restart(elapsed_s: float) -> None:
        if "at_s" not in outage and elapsed_s >= OUTAGE_AT_S:
            outage["answered_before"] = rig.answered(workload)
            redis_server.kill()
            outage["at_s"] = elapsed_s
            outage["vendor_calls"] = -vendor_calls()
        elif "at_s" in outage and "back_s" not in outage:
            if elapsed_s < outage["at_s"] + OUTAGE_S:
                return
            # Calls made while the store was away (a call already paced may go out).
            outage["vendor_calls"] += vendor_calls()
            redis_server.start()
            outage["back_s"] = rig.elapsed_s  # the start takes a moment

    try:
        rig.publish(workload, background=True, rate_per_s=RATE_PER_S)
        answered = rig.run_until_answered(
            workload, timeout_s=ANSWER_TIMEOUT_S, chaos=kill_and_restart
        )
    finally:
        if not redis_server.running():  # whatever failed, the replicas get their store back
            if "back_s" not in outage:
                outage["vendor_calls"] = outage.get("vendor_calls", 0) + vendor_calls()
            redis_server.start()
            outage.setdefault("back_s", rig.elapsed_s)
    figures = rig.finish(workload)
    failed = add_outage_figures(figures, rig, workload, redis_server, outage)
    report(figures)

    assert "at_s" in outage and "back_s" in outage, f"the outage never happened: {outage}"
    problems = []
    if failed:
        problems.append(f"{sum(failed.values())} commands failed: {failed}")
    if figures.commands_with_repeated_events:
        problems.append(f"{figures.commands_with_repeated_events} commands with several events")
    if figures.keys_with_multiple_effects:
        problems.append(f"{figures.keys_with_multiple_effects} keys with two vendor effects")
    if figures.extra["crashes"]:
        problems.append(f"{figures.extra['crashes']} replica crashes")
    if set(figures.extra["exit_codes_at_end"]) != {0}:
        problems.append(f"replicas did not stop cleanly: {figures.extra['exit_codes_at_end']}")
    problems.extend(figures.problems(all_succeed=True))  # lost, replays, executed twice
    assert not problems, (
        f"{'; '.join(dict.fromkeys(problems))}\n{figures.summary()}\n{rig.diagnostics()}"
    )
    assert answered


def add_outage_figures(
    figures: Figures,
    rig: ChaosRig,
    workload: Workload,
    server: RedisServer,
    outage: dict[str, float],
) -> dict[str, int]:
    """Put the outage, failures and waits into ``figures.extra``; returns the failed
    commands by error code (any event of a command counts, not only its first)."""
    assert rig.collector is not None and rig.sandbox is not None
    events = rig.collector.by_command()
    failed: Counter[str] = Counter()
    for command_id in workload.command_ids:
        failed.update(
            {
                seen.error_code or "-"
                for seen in events.get(command_id, [])
                if seen.outcome == "failed"
            }
        )
    # From a command's confirmed publish to its first event.
    first_seen = rig.collector.first_seen()
    waits = sorted(
        first_seen[command_id] - published_at
        for command_id, published_at in rig.published_at.items()
        if command_id in first_seen
    )
    stats = rig.sandbox.stats()
    figures.extra.update(
        {
            "failed": sum(failed.values()),
            "internal_errors": failed["internal_error"],
            "lost": figures.without_terminal,
            "double_effects": figures.keys_with_multiple_effects,
            "max_wait_s": round(waits[-1], 2) if waits else None,
            "p50_wait_s": round(statistics.median(waits), 2) if waits else None,
            **{f"outage_{name}": round(value, 2) for name, value in outage.items()},
            "redis_starts": server.starts,
            "throttled_total": stats["throttled"],
            "max_calls_in_window": stats.get("max_calls_in_window", {}).get("eset", {}),
        }
    )
    if failed:
        figures.extra["failed_by_code"] = dict(failed)
    return dict(failed)
