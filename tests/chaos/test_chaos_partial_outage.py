"""Chaos: one of two replicas loses its store (a partition), the other keeps it.

Replica 0 reaches the scenario's own Redis (idempotency and rate-limit store) through a
TCP proxy (``tests/tcp_proxy.py``); replica 1 reaches it directly. A steady stream of
commands (10% of the keys sent twice) runs before, during and after a 20 s cut of the
proxy: every connection of replica 0 to Redis is reset and new ones are refused, while
replica 1 never notices.

Replica 0 must not sit on work it can not do: within seconds it stops taking deliveries
and gives back every one it has not started, so that replica 1 does them; work it had
started (a claim held, a vendor call under way) is held through the cut and finished
after. Once Redis answers again it takes deliveries again. Figures: how long any command
waited on replica 0 (from its delivery to its give-back or settlement; unstarted: to its
start), the deliveries it gave back, commands without a terminal event, keys with two
vendor effects, dead-lettered messages.

    pytest -q -s -rA -m chaos tests/chaos/test_chaos_partial_outage.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.rig.procs import HOST, free_port

from ..tcp_proxy import TcpProxy
from .conftest import Report
from .delivery_waits import DeliveryWait, delivery_waits
from .figures import Figures, Workload, batch_deletes
from .redis_server import RedisServer
from .rig import ChaosRig

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

RATE_PER_S = 20.0  # the stream: a little more than both replicas do, so each one's
# prefetch is full (4 commands running, 4 waiting for a handler) when the cut comes
KEYS = 600  # with 10% sent twice: ~660 commands, ~33 s of stream
DUPLICATE_SHARE = 0.1
CUT_AT_S = 6.0  # after publishing started
CUT_S = 20.0
CONCURRENCY = 4  # per replica (prefetch 8): deliveries wait for a handler slot
VENDOR_LATENCY_MS = 500.0  # a call: 4 handlers do 8/s, 2 replicas 16/s
# No live holder's lease runs out during the cut, though replica 0 can not renew: else a
# duplicate on replica 1 would take over a key whose vendor call is under way.
LEASE_S = 60.0
DEADLINE_S = 300.0
ANSWER_TIMEOUT_S = 180.0  # a claim taken as the cut came, its answer lost: LEASE_S more
MAX_UNSTARTED_WAIT_S = 10.0  # on the cut replica, for a command it had not started
READYZ_AFTER_CUT_S = 5.0  # when replica 0's readiness is asked, during the cut
CUT_REPLICA = 0


@pytest.fixture
def store_proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(HOST, redis_server.port) as proxy:
        yield proxy


@pytest.mark.timeout(300)
def test_a_replica_cut_off_from_its_store_gives_its_work_to_the_other(
    redis_server: RedisServer, store_proxy: TcpProxy, rig: ChaosRig, report: Report,
    tmp_path: Path,
):
    """2 replicas (4 handlers each, vendor calls of 500 ms); ~20 commands/s for ~40 s,
    10% of the keys sent twice; replica 0's way to Redis is cut 10 s in, for 20 s."""
    spans_path = tmp_path / "cut-replica-spans.jsonl"
    health_port = free_port()
    proxied = f"redis://{HOST}:{store_proxy.port}/0"
    rig.start(
        replicas=2,
        concurrency=CONCURRENCY,
        claim_lease_s=LEASE_S,
        RELAY_IDEMPOTENCY_URL=redis_server.url,
        RELAY_RATE_LIMIT_URL=redis_server.url,
        replica_env=[{
            "RELAY_IDEMPOTENCY_URL": proxied,
            "RELAY_RATE_LIMIT_URL": proxied,
            "RELAY_HEALTH_PORT": str(health_port),
            "BENCH_SPANS_FILE": str(spans_path),
        }],
    )
    rig.sandbox_faults(latency_ms=VENDOR_LATENCY_MS)
    workload = batch_deletes(KEYS, duplicate_share=DUPLICATE_SHARE, deadline_s=DEADLINE_S)
    cut: dict[str, Any] = {}

    def cut_and_restore(elapsed_s: float) -> None:
        if "at_s" not in cut:
            if elapsed_s >= CUT_AT_S:
                store_proxy.cut()
                cut["at_s"] = rig.elapsed_s
            return
        since_cut_s = elapsed_s - cut["at_s"]
        if "readyz" not in cut and since_cut_s >= READYZ_AFTER_CUT_S:
            cut["readyz"] = readiness(health_port)
        elif "back_s" not in cut and since_cut_s >= CUT_S:
            store_proxy.restore()
            cut["back_s"] = rig.elapsed_s

    try:
        rig.publish(workload, background=True, rate_per_s=RATE_PER_S)
        answered = rig.run_until_answered(
            workload, timeout_s=ANSWER_TIMEOUT_S, chaos=cut_and_restore
        )
    finally:
        if store_proxy.cut_off:  # whatever failed, replica 0 gets its store back
            store_proxy.restore()
            cut.setdefault("back_s", rig.elapsed_s)
    figures = rig.finish(workload)
    waits = delivery_waits(spans_path)
    add_partial_outage_figures(figures, rig, workload, cut, waits)
    report(figures)

    assert "at_s" in cut and "back_s" in cut, f"the cut never happened: {cut}"
    extra = figures.extra
    problems = list(figures.problems(all_succeed=True))  # lost, replays, executed twice
    if figures.commands_with_repeated_events:  # a delivery returned after its event
        problems.append(f"{figures.commands_with_repeated_events} commands with several events")
    if figures.keys_with_multiple_effects:
        problems.append(f"{figures.keys_with_multiple_effects} keys with two vendor effects")
    if extra.get("dead_lettered"):
        problems.append(f"{extra['dead_lettered']} commands dead-lettered")
    if not extra["given_back"]:
        problems.append("the cut replica gave nothing back: the scenario tested nothing")
    if extra["max_unstarted_wait_s"] > MAX_UNSTARTED_WAIT_S:
        problems.append(
            f"a command waited {extra['max_unstarted_wait_s']}s unstarted on the cut replica"
        )
    if not extra["answered_during_cut"]:
        problems.append("nothing was answered during the cut: the other replica idled")
    if extra["readyz_during_cut"] != 503:
        problems.append(f"the cut replica's /readyz said {extra['readyz_during_cut']}, not 503")
    if extra["crashes"]:
        problems.append(f"{extra['crashes']} replica crashes")
    if set(extra["exit_codes_at_end"]) != {0}:
        problems.append(f"replicas did not stop cleanly: {extra['exit_codes_at_end']}")
    assert not problems, (
        f"{'; '.join(dict.fromkeys(problems))}\n{figures.summary()}\n{rig.diagnostics()}"
    )
    assert answered


def readiness(port: int) -> int | None:
    """The status of the replica's ``/readyz`` (None: it did not answer)."""
    try:
        return httpx.get(f"http://{HOST}:{port}/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def add_partial_outage_figures(
    figures: Figures, rig: ChaosRig, workload: Workload, cut: dict[str, Any],
    waits: list[DeliveryWait],
) -> None:
    """The cut, what the cut replica did with its deliveries, and how long they waited
    there, into ``figures.extra``."""
    assert rig.collector is not None
    first_seen = rig.collector.first_seen()
    cut_from = rig.started_at + cut.get("at_s", 0.0)
    cut_until = rig.started_at + cut.get("back_s", 0.0)
    started = [wait for wait in waits if wait.started]
    figures.extra.update(
        {
            "lost": figures.without_terminal,
            "double_effects": figures.keys_with_multiple_effects,
            "cut_at_s": round(cut.get("at_s", 0.0), 2),
            "cut_back_s": round(cut.get("back_s", 0.0), 2),
            "readyz_during_cut": cut.get("readyz"),
            "answered_during_cut": sum(
                1 for command_id in workload.command_ids
                if cut_from <= first_seen.get(command_id, 0.0) < cut_until
            ),
            "cut_replica_deliveries": len(waits),
            "given_back": sum(1 for wait in waits if wait.outcome == "given_back"),
            "max_unstarted_wait_s": round(max((w.unstarted_s for w in waits), default=0.0), 2),
            "max_wait_on_cut_replica_s": round(
                max((w.on_replica_s for w in waits), default=0.0), 2
            ),
            "held_started_over_10s": sum(
                1 for wait in started if wait.on_replica_s > MAX_UNSTARTED_WAIT_S
            ),
        }
    )
