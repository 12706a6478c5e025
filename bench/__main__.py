"""``python -m bench``: run the benchmark scenarios and print a table of figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import isolation, report, scenarios
from bench.run import Options

SCENARIOS: dict[str, Callable[[Options], dict[str, Any]]] = {
    "throughput": scenarios.relay_fast,
    "raw": scenarios.raw_fast,
    "celery": scenarios.celery_fast,
    "slow": scenarios.relay_slow,
    "ratelimit": scenarios.rate_limited,
    "latency": scenarios.latency,
    "coalesce": scenarios.coalesce,
    "isolation": isolation.isolation,
}
# Compared with each other: run in alternating rounds, so that a noisy stretch of the
# machine's time does not fall on one of them only; each reports its median round.
ROUNDED = ("throughput", "raw", "celery")


def parse(argv: list[str] | None) -> tuple[Options, list[str], Path | None]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios (default: all): {', '.join(SCENARIOS)}")
    p.add_argument("--amqp-url", default="amqp://guest:guest@localhost:5672//")
    p.add_argument("--redis-url", default="redis://localhost:6379/0")
    p.add_argument("--commands", type=int, default=2000,
                   help="backlog of each throughput run (fast and 100 ms vendor, anchors)")
    p.add_argument("--seconds", type=float, default=90.0,
                   help="longest wait for one run's events (each run is bounded by it)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="RELAY_CONCURRENCY of the fast-vendor, latency and rate-limit runs")
    p.add_argument("--replicas", type=int, default=4, help="replicas of the rate-limit run")
    p.add_argument("--ratelimit-seconds", type=float, default=15.0,
                   help="length of the rate-limit run (10 commands per second of it)")
    p.add_argument("--latency-commands", type=int, default=200)
    p.add_argument("--coalesce-commands", type=int, default=1000,
                   help="single-object deletes of the coalesce run with coalescing on")
    p.add_argument("--coalesce-off-commands", type=int, default=200,
                   help="... and with it off (one call each at 10/s: 0.1 s per command)")
    p.add_argument("--coalesce-window-ms", type=float, default=50.0,
                   help="RELAY_BATCH_DELETE_WINDOW_MS of the coalesce run with coalescing on")
    p.add_argument("--isolation-replicas", default="1,4",
                   help="replica counts of the isolation runs (comma-separated)")
    p.add_argument("--isolation-backlog", type=int, default=10_000,
                   help="single-object deletes the flooding tenant queues (never drained)")
    p.add_argument("--isolation-quiet", type=int, default=40,
                   help="quiet commands per measured phase, sent at 4/s")
    p.add_argument("--isolation-fair-commands", type=int, default=300,
                   help="commands per flooded account of the fairness runs (>= 250 keeps 20 s)")
    p.add_argument("--isolation-fylr-commands", type=int, default=2000,
                   help="the unlimited vendor's flood (fylr cancel-task), alone and with others")
    p.add_argument("--celery-pool", default="prefork", choices=["prefork", "threads", "solo"],
                   help="Celery's default pool (default: prefork)")
    p.add_argument("--celery-concurrency", type=int, default=os.cpu_count() or 1,
                   help="Celery's default: the number of CPUs")
    p.add_argument("--raw-prefetch", type=int, default=32)
    p.add_argument("--no-tracing", action="store_true",
                   help="run the workers without the SDK tracer (see bench/relay_worker.py)")
    p.add_argument("--log-level", default="INFO", help="RELAY_LOG_LEVEL of the workers")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for every command-relay replica (repeatable)")
    p.add_argument("--logs", type=Path, default=None,
                   help="keep process logs here (default: a temporary directory)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy the fast-vendor replica into this file (.svg, or .txt raw)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of throughput, raw and celery (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="relay-bench-"))
    options = Options(
        amqp_url=args.amqp_url, redis_url=args.redis_url, commands=args.commands,
        seconds=args.seconds, concurrency=args.concurrency, replicas=args.replicas,
        ratelimit_seconds=args.ratelimit_seconds, latency_commands=args.latency_commands,
        coalesce_commands=args.coalesce_commands,
        coalesce_off_commands=args.coalesce_off_commands,
        coalesce_window_ms=args.coalesce_window_ms,
        celery_pool=args.celery_pool, celery_concurrency=args.celery_concurrency,
        raw_prefetch=args.raw_prefetch, tracing=not args.no_tracing, log_level=args.log_level,
        worker_env=dict(pair.split("=", 1) for pair in args.worker_env),
        log_dir=log_dir, profile=args.profile, rounds=max(1, args.rounds),
        isolation_replicas=tuple(int(n) for n in args.isolation_replicas.split(",") if n),
        isolation_backlog=args.isolation_backlog, isolation_quiet=args.isolation_quiet,
        isolation_fair_commands=args.isolation_fair_commands,
        isolation_fylr_commands=args.isolation_fylr_commands,
    )
    return options, only, args.json


def run_scenario(name: str, options: Options) -> dict[str, Any]:
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        result = SCENARIOS[name](options)
    except Exception as error:  # one failed run must not lose the others' figures
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    result["wall_s"] = round(time.monotonic() - started, 1)
    # Everything shares the machine's cores: a busy machine lowers every figure.
    result["loadavg_1m_before"] = round(load_before, 2)
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, with every round's rate and replicas' RSS beside it."""
    if len(runs) == 1:
        return runs[0]
    good = [run for run in runs if "error" not in run and run.get("per_s") is not None]
    if not good:
        return runs[-1]
    median = sorted(good, key=lambda run: run["per_s"])[(len(good) - 1) // 2]
    rss = [mb for run in good for mb in run.get("peak_rss_mb", []) or []]
    return {**median, "rounds_per_s": [run.get("per_s") for run in runs],
            "peak_rss_mb": rss or median.get("peak_rss_mb", [])}


def main(argv: list[str] | None = None) -> int:
    options, only, json_path = parse(argv)
    print(f"process logs: {options.log_dir}", file=sys.stderr)
    plan = [name for _ in range(options.rounds) for name in only if name in ROUNDED]
    plan += [name for name in only if name not in ROUNDED]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in only}
    for name in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        runs[name].append(run_scenario(name, options))
    results = {name: median_run(runs[name]) for name in only}
    rows = report.rows(results)
    print(report.table(rows))
    loads = ", ".join(f"{n} {r['loadavg_1m_before']:g}" for n, r in results.items())
    print(f"\n1-min load average before each run ({os.cpu_count()} CPUs): {loads}")
    if json_path is not None:
        document = {"options": {k: str(v) if isinstance(v, Path) else v
                                for k, v in asdict(options).items()},
                    "rows": [row.as_dict() for row in rows], "results": results}
        json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
