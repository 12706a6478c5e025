"""The benchmark runs; each returns its figures as a JSON-able dict.

Throughput runs pre-publish a backlog, then start the consumer and measure the steady
rate from event arrivals (the first ``skip`` left out as start-up).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from kombu import Producer

from bench import vendor
from bench.celery_anchor import TASK, celery_delay_objects, celery_queue, make_app
from bench.coalesce import coalesce as coalesce  # a scenario of its own file, listed here
from bench.commands import batch_deletes, publish_command
from bench.measure import percentile, steady_rate
from bench.rig.events import EventCollector
from bench.rig.procs import Proc
from bench.rig.sandbox import ESET_LIMIT_PER_S, ESET_RATE_LIMITS
from bench.run import Options, Rig
from worker.broker.connection import connect

Result = dict[str, Any]
LATENCY_WARMUP = 5


def _skip(count: int) -> int:
    return min(100, count // 10)


def relay_fast(options: Options) -> Result:
    """command-relay, one replica, sandbox answering at once."""
    return _relay_backlog(options, "throughput", latency_ms=0, concurrency=options.concurrency)


def relay_slow(options: Options) -> Result:
    """command-relay, one replica, 100 in flight, sandbox answering after 100 ms."""
    return _relay_backlog(options, "slow", latency_ms=100, concurrency=100)


def _relay_backlog(options: Options, label: str, latency_ms: float, concurrency: int) -> Result:
    with Rig(options, label) as rig:
        rig.start_sandbox(rate_limited=False, latency_ms=latency_ms)
        collector = rig.collect_events()
        rig.publish_backlog(batch_deletes(options.commands))
        (worker,) = rig.relay(replicas=1, concurrency=concurrency, rate_limits={})
        profiler = _profiler(rig, worker, label)
        result = _measure(rig, collector, [worker], options.commands)
        if profiler is not None:
            result["profile"] = _stop_profiler(*profiler)
        return {"concurrency": concurrency, "vendor_latency_ms": latency_ms, **result}


def raw_fast(options: Options) -> Result:
    """The raw anchor (bench/raw_anchor.py) on the same backlog and sandbox."""
    with Rig(options, "raw") as rig:
        sandbox = rig.start_sandbox(rate_limited=False)
        collector = rig.collect_events()
        rig.publish_backlog(batch_deletes(options.commands))
        argv = [sys.executable, "-m", "bench.raw_anchor", options.amqp_url,
                rig.topology.command_queue.name, rig.topology.events.name, sandbox.base_url,
                str(options.raw_prefetch)]
        worker = rig.procs.start("raw", argv)
        result = _measure(rig, collector, [worker], options.commands)
    # Not a command-relay replica: kept out of the RSS figure.
    result["peak_rss_mb_anchor"] = result.pop("peak_rss_mb")
    return {"prefetch": options.raw_prefetch, **result}


def _measure(rig: Rig, collector: EventCollector, workers: list[Proc], count: int) -> Result:
    """Wait for ``count`` events (bounded by ``--seconds``) and work out the figures."""
    check = rig.procs.check_alive
    give_up_at = time.monotonic() + rig.options.seconds
    skip = _skip(count)
    assert rig.sandbox is not None
    watched = [*workers, rig.sandbox.proc]
    collector.wait_for(skip + 1, rig.options.seconds, check)
    cpu_before = [p.cpu_s() or 0.0 for p in watched]
    complete = collector.wait_for(count, max(0.0, give_up_at - time.monotonic()), check)
    cpu_after = [p.cpu_s() or 0.0 for p in watched]
    times = collector.times()
    counted = max(1, len(times) - 1 - skip)
    return {
        "commands": count,
        "events": len(times),
        "complete": complete,
        "per_s": steady_rate(times, skip),
        "outcomes": collector.outcomes(),
        "cpu_ms_per_command": {
            p.name: round((after - before) * 1000 / counted, 3)
            for p, before, after in zip(watched, cpu_before, cpu_after, strict=True)
        },
        "peak_rss_mb": [p.peak_rss_mb() for p in workers],
    }


def celery_fast(options: Options) -> Result:
    """The Celery anchor (bench/celery_anchor.py) on the same sandbox."""
    with Rig(options, "celery") as rig:
        sandbox = rig.start_sandbox(rate_limited=False)
        queue = celery_queue(f"{rig.names.prefix}.celery")
        rig.extra_queues.append(queue)
        rig.extra_names = celery_delay_objects()
        done_key = f"{rig.names.prefix}:done"
        app = make_app(options.amqp_url, queue.name)
        with connect(options.amqp_url) as connection:
            queue.bind(connection.channel()).declare()
        # A connection of its own: Celery's producer pool is process-wide, and a closed one
        # would fail the next round.
        with app.connection_for_write() as connection, connection.Producer() as producer:
            for _ in range(options.commands):
                app.send_task(TASK, args=[str(uuid.uuid4())], queue=queue.name,
                              producer=producer)
        rig.wait_queue_depth(queue.name, options.commands)
        env = {**os.environ, "BENCH_AMQP_URL": options.amqp_url,
               "BENCH_REDIS_URL": options.redis_url, "BENCH_SANDBOX_URL": sandbox.base_url,
               "BENCH_CELERY_QUEUE": queue.name, "BENCH_DONE_KEY": done_key}
        argv = [sys.executable, "-m", "celery", "-A", "bench.celery_anchor", "worker",
                "-P", options.celery_pool, "-c", str(options.celery_concurrency),
                "-Q", queue.name, "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-l", "WARNING"]
        worker = rig.procs.start("celery", argv, env)
        done = redis.Redis.from_url(options.redis_url)
        skip = _skip(options.commands)
        try:
            give_up_at = time.monotonic() + options.seconds
            cpu_before = None
            while (finished := done.llen(done_key)) < options.commands:
                if cpu_before is None and finished > skip:
                    cpu_before, finished_before = worker.cpu_s() or 0.0, finished
                if time.monotonic() > give_up_at:
                    break
                rig.procs.check_alive()
                time.sleep(0.05)
            cpu_after = worker.cpu_s() or 0.0
            times = sorted(float(t) for t in done.lrange(done_key, 0, -1))
            rss = worker.peak_rss_mb()
        finally:
            done.delete(done_key)
            done.close()
    return {
        "pool": options.celery_pool,
        "concurrency": options.celery_concurrency,
        "commands": options.commands,
        "events": len(times),
        "complete": len(times) >= options.commands,
        "per_s": steady_rate(times, skip),
        # Main process and pool children, over the tasks after the first ``skip``.
        "cpu_ms_per_command": None if cpu_before is None else round(
            (cpu_after - cpu_before) * 1000 / max(1, len(times) - finished_before), 3),
        "peak_rss_mb_main_process": rss,
    }


def rate_limited(options: Options) -> Result:
    """Several replicas sharing one ESET account's 10 calls/s through Redis."""
    count = int(ESET_LIMIT_PER_S * options.ratelimit_seconds)
    with Rig(options, "ratelimit") as rig:
        sandbox = rig.start_sandbox(rate_limited=True)
        collector = rig.collect_events()
        rig.publish_backlog(batch_deletes(count))
        workers = rig.relay(replicas=options.replicas, concurrency=options.concurrency,
                            rate_limits=ESET_RATE_LIMITS)
        complete = collector.wait_for(count, options.ratelimit_seconds * 3 + 30,
                                      rig.procs.check_alive)
        stats = sandbox.stats()
        rss = [p.peak_rss_mb() for p in workers]
        times = collector.times()
        statuses: dict[str, int] = stats["statuses"].get("eset.batch_delete", {})
    calls = sum(statuses.values())
    return {
        "replicas": options.replicas,
        "commands": count,
        "events": len(times),
        "complete": complete,
        # Every event is one call. The first second (start-up, and any burst a window
        # limiter would let through) is left out; the rest is the sustained rate.
        "calls_per_s": steady_rate(times, ESET_LIMIT_PER_S),
        "vendor_calls": calls,
        "vendor_statuses": statuses,
        "share_429": statuses.get("429", 0) / calls if calls else None,
        # The busiest sliding second, as the vendor counted arrivals (429s included).
        "max_calls_in_a_second": max(
            (n for accounts in stats.get("max_calls_in_window", {}).values()
             for n in accounts.values()),
            default=None,
        ),
        "outcomes": collector.outcomes(),
        "peak_rss_mb": rss,
    }


def latency(options: Options) -> Result:
    """One command at a time: publish → event arrival, minus the vendor's own time."""
    with Rig(options, "latency") as rig:
        vendor_ms = _direct_call_ms(rig.start_sandbox(rate_limited=False).base_url)
        collector = rig.collect_events()
        (worker,) = rig.relay(replicas=1, concurrency=options.concurrency, rate_limits={})
        give_up_at = time.monotonic() + options.seconds
        samples_ms: list[float] = []
        stages: list[tuple[float, float, float]] = []
        commands = batch_deletes(options.latency_commands + LATENCY_WARMUP)
        with connect(options.amqp_url) as connection:
            producer = Producer(connection.channel())
            for index, command in enumerate(commands):
                sent, sent_at = time.monotonic(), time.time()
                publish_command(producer, rig.topology.commands, command)
                left_s = give_up_at - time.monotonic()
                if left_s <= 0 or not collector.wait_for(index + 1, left_s,
                                                         rig.procs.check_alive):
                    break
                if index >= LATENCY_WARMUP:
                    delivery = collector.deliveries[index]
                    samples_ms.append((delivery.arrived - sent) * 1000)
                    stages.append(_stages(sent_at, delivery.body, delivery.arrived_at))
        rss = worker.peak_rss_mb()
    added = [s - vendor_ms for s in samples_ms]
    return {
        "commands": len(samples_ms),
        "vendor_ms_median": vendor_ms,
        "publish_to_event_ms_p50": percentile(samples_ms, 50),
        "added_ms_p50": percentile(added, 50),
        "added_ms_p90": percentile(added, 90),
        "added_ms_p99": percentile(added, 99),
        # Medians of: publish → handler start, handler start → finish (vendor call
        # included), handler finish → event arrival; from the event's started_at and
        # finished_at (wall clock, same machine).
        "stages_ms_p50": {
            name: percentile([s[i] for s in stages], 50)
            for i, name in enumerate(("to_handler", "in_handler", "to_event"))
        },
        "peak_rss_mb": [rss],
    }


def _stages(sent_at: float, body: bytes, arrived_at: float) -> tuple[float, float, float]:
    data = json.loads(body)["data"]
    started = datetime.fromisoformat(data["started_at"]).timestamp()
    finished = datetime.fromisoformat(data["finished_at"]).timestamp()
    return ((started - sent_at) * 1000, (finished - started) * 1000,
            (arrived_at - finished) * 1000)


def _direct_call_ms(sandbox_url: str, calls: int = 60) -> float:
    """Median time of the vendor call itself, made directly with httpx (keep-alive)."""
    with httpx.Client() as client:
        headers = vendor.eset_authorization(client, sandbox_url)
        url = vendor.batch_delete_url(sandbox_url)
        times_ms = []
        for index in range(calls):
            started = time.monotonic()
            client.post(url, json={"objectUuids": [str(uuid.uuid4())]}, headers=headers)
            if index >= 10:
                times_ms.append((time.monotonic() - started) * 1000)
    return statistics.median(times_ms)


def _profiler(rig: Rig, worker: Proc, label: str) -> tuple[Proc, Path] | None:
    """py-spy on the replica, sampling only the thread holding the GIL (= Python CPU)."""
    base = rig.options.profile
    if base is None:
        return None
    path = base.with_name(f"{base.stem}-{label}{base.suffix or '.svg'}")
    output = "raw" if path.suffix == ".txt" else "flamegraph"
    argv = ["py-spy", "record", "--pid", str(worker.pid), "--rate", "200", "--threads", "--gil",
            "--format", output, "-o", str(path)]
    return rig.procs.start("py-spy", argv), path


def _stop_profiler(profiler: Proc, path: Path) -> str:
    profiler.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    profiler.popen.wait(30)
    return str(path)
