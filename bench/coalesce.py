"""The ``coalesce`` scenario: single-object batch deletes under ESET's 10 calls/s, one
replica, with batch-delete coalescing off and on (``RELAY_BATCH_DELETE_WINDOW_MS``).

Off, every command is a call of its own, so the run takes a tenth of a second per command
(the "off" run is smaller by default for that reason, see ``--coalesce-off-commands``);
on, the commands in flight (``RELAY_CONCURRENCY``) share calls. Both runs read what the
sandbox saw: calls, 429s and the objects deleted (each should be deleted exactly once).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bench.commands import batch_deletes
from bench.measure import steady_rate
from bench.rig.sandbox import ESET_LIMIT_PER_S, ESET_RATE_LIMITS
from bench.run import Options, Rig

Result = dict[str, Any]
ROUTE = "eset.batch_delete"


def coalesce(options: Options) -> Result:
    """The same single-object deletes with coalescing off, then on."""
    off = _run(options, "coalesce-off", options.coalesce_off_commands, window_ms=0)
    on = _run(options, "coalesce-on", options.coalesce_commands, options.coalesce_window_ms)
    return {"off": off, "on": on, "peak_rss_mb": [*off.pop("peak_rss_mb"),
                                                  *on.pop("peak_rss_mb")]}


def _run(options: Options, label: str, count: int, window_ms: float) -> Result:
    # The window is set last, so a --worker-env can not turn the "off" run on.
    env = {**options.worker_env, "RELAY_BATCH_DELETE_WINDOW_MS": f"{window_ms:g}"}
    options = dataclasses.replace(options, worker_env=env)
    # Bounded: by --seconds, or by the time the calls take at the limit (plus start-up).
    bound_s = max(options.seconds, count / ESET_LIMIT_PER_S + 30)
    with Rig(options, label) as rig:
        sandbox = rig.start_sandbox(rate_limited=True)
        collector = rig.collect_events()
        rig.publish_backlog(batch_deletes(count))
        started = time.monotonic()
        (worker,) = rig.relay(replicas=1, concurrency=options.concurrency,
                              rate_limits=ESET_RATE_LIMITS)
        complete = collector.wait_for(count, bound_s, rig.procs.check_alive)
        stats = sandbox.stats()
        rss = worker.peak_rss_mb()
        times = collector.times()
    statuses: dict[str, int] = stats["statuses"].get(ROUTE, {})
    deleted: dict[str, int] = stats["effects"].get(ROUTE, {})
    calls = sum(statuses.values())
    answered = calls - statuses.get("429", 0)
    return {
        "window_ms": window_ms,
        "concurrency": options.concurrency,
        "commands": count,
        "events": len(times),
        "complete": complete,
        "per_s": steady_rate(times, min(100, count // 10)),
        "seconds_to_last_event": times[-1] - started if times else None,
        "vendor_calls": calls,
        "vendor_statuses": statuses,
        "answers_429": statuses.get("429", 0),
        "objects_deleted": len(deleted),
        "objects_deleted_more_than_once": sum(1 for n in deleted.values() if n > 1),
        "objects_per_call": len(deleted) / answered if answered else None,
        "outcomes": collector.outcomes(),
        "peak_rss_mb": [rss],
    }
