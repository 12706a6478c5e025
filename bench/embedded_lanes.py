"""A worker on the embedded broker with many lanes: its CPU while idle, and how long a
command takes in one lane and on the command queue.

    python -m bench.embedded_lanes                       # 100 lanes, about 1 minute
    python -m bench.embedded_lanes --lanes 14,100,500 --idle-seconds 30

For each number of lanes: a sandbox process (its ESET limit off) and one replica
(``command-relay run``, INFO logs, no tracing) whose tenants each have an ESET account of
their own (the sandbox's sub-addressed users), so one lane each, on fresh SQLite files.
Once it consumes and has been quiet for ``--settle-seconds``, its CPU (user + system,
from ``/proc``) over ``--idle-seconds`` is the idle figure, in per cent of one core. Then
``--commands`` commands are sent one at a time, each once its previous one's event has
arrived: fetch-patching of the first tenant (its lane) and cancel-task (fylr, handled
from the command queue), alternating; latency = publish to its event's arrival at the
reply queue, polled as the worker polls. ``--worker-pythonpath`` runs the replica from
another checkout (e.g. to measure the transport it had before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.rig.procs import Procs, clean_environment
from bench.rig.sandbox import SandboxProcess
from bench.rig.tenants import sandbox_tenants
from worker.broker.topology import Topology
from worker.client import CommandClient
from worker.settings import Settings

CONSUMING_TIMEOUT_S = 120.0
EVENT_TIMEOUT_S = 30.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.embedded_lanes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lanes", default="100", help="numbers of lanes, comma-separated")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--settle-seconds", type=float, default=3.0)
    p.add_argument("--commands", type=int, default=40)
    p.add_argument("--poll-interval", type=float, default=0.02,
                   help="RELAY_BROKER_POLL_INTERVAL_S of the replica and of the reply queue")
    p.add_argument("--worker-pythonpath", default=None,
                   help="PYTHONPATH of the replica (another checkout); default: this one")
    p.add_argument("--logs", type=Path, default=None, help="where process logs go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    log_root = args.logs or Path(tempfile.mkdtemp(prefix="bench-embedded-lanes-"))
    print(f"logs in {log_root}", flush=True)
    rows = [measure(int(lanes), args, log_root / f"lanes-{lanes}")
            for lanes in args.lanes.split(",")]
    print()
    print("| lanes | connected after s | idle CPU % of a core | lane p50 / p90 / max ms "
          "| command queue p50 / p90 / max ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['lanes']} | {row['connected_s']:.1f} | {row['idle_cpu_pct']:.1f} "
              f"| {_spread(row['lane_ms'])} | {_spread(row['queue_ms'])} |")
    return 0


def measure(lanes: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with Procs(log_dir) as procs, tempfile.TemporaryDirectory() as data:
        sandbox = SandboxProcess(procs, rate_limited=False)
        # 0 lanes: one tenant without an ESET account (the floor: no lane, same worker).
        names = [f"t{number:04d}" for number in range(max(lanes, 1))]
        vendors = ("eset", "fylr") if lanes else ("fylr",)
        tenants_file = Path(data, "tenants.json")
        tenants = sandbox_tenants(sandbox.base_url, {name: vendors for name in names})
        tenants_file.write_text(json.dumps(tenants))
        env = {
            **clean_environment(),
            "RELAY_BROKER_URL": f"sqla+sqlite:///{Path(data, 'broker.sqlite3')}",
            "RELAY_IDEMPOTENCY_URL": f"sqlite:///{Path(data, 'idempotency.sqlite3')}",
            # From a file: hundreds of tenants are more than one variable may hold.
            "RELAY_TENANTS_FILE": str(tenants_file),
            "RELAY_RATE_LIMITS": json.dumps({"eset": "10/second"}),
            "RELAY_ESET_HOST_TEMPLATE": f"{sandbox.base_url}/eset/{{region}}/{{service}}",
            "RELAY_BROKER_POLL_INTERVAL_S": str(args.poll_interval),
            "RELAY_STATS_INTERVAL_S": "0",
        }
        if args.worker_pythonpath:
            env["PYTHONPATH"] = args.worker_pythonpath
        started = time.monotonic()
        worker = procs.start("worker", [sys.executable, "-m", "bench.relay_worker"], env)
        _wait_for_line(worker.log_path, "consuming", procs=procs)
        connected_s = time.monotonic() - started
        time.sleep(args.settle_seconds)
        cpu_before, idle_started = worker.cpu_s(), time.monotonic()
        time.sleep(args.idle_seconds)
        cpu_after, idle_s = worker.cpu_s(), time.monotonic() - idle_started
        assert cpu_before is not None and cpu_after is not None, "the worker is gone"
        settings = Settings(broker_url=env["RELAY_BROKER_URL"], tenants={})
        lane_ms, queue_ms = _latencies(settings, names[0], args.commands, with_lane=lanes > 0)
        row = {"lanes": lanes, "connected_s": connected_s,
               "idle_cpu_pct": 100 * (cpu_after - cpu_before) / idle_s,
               "lane_ms": lane_ms, "queue_ms": queue_ms}
        print(json.dumps(row | {"lane_ms": _spread(lane_ms), "queue_ms": _spread(queue_ms)}),
              flush=True)
        return row


def _latencies(
    settings: Settings, tenant: str, commands: int, with_lane: bool
) -> tuple[list[float], list[float]]:
    lane_ms: list[float] = []
    queue_ms: list[float] = []
    with CommandClient(settings.broker_url, Topology.from_settings(settings)) as client:
        reply_to = client.reply_queue()
        for number in range(commands):
            in_lane = with_lane and number % 2 == 0
            command: dict[str, Any] = (
                {"type": "fetch-patching", "params": {}} if in_lane
                else {"type": "cancel-task", "params": {"task_id": 4711 + number}}
            )
            command |= {"id": str(uuid.uuid4()), "tenant": tenant}
            sent = time.monotonic()
            client.publish(command, reply_to=reply_to)
            reply = next(client.events(EVENT_TIMEOUT_S), None)
            assert reply is not None, f"no event for {command['type']} in {EVENT_TIMEOUT_S}s"
            assert reply.event.data.command_id == command["id"], reply.event
            (lane_ms if in_lane else queue_ms).append(1000 * (time.monotonic() - sent))
    return lane_ms, queue_ms


def _wait_for_line(path: Path, *needles: str, procs: Procs) -> None:
    give_up_at = time.monotonic() + CONSUMING_TIMEOUT_S
    while time.monotonic() < give_up_at:
        procs.check_alive()
        text = path.read_text(errors="replace") if path.exists() else ""
        if any(needle in text for needle in needles):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the worker did not consume within {CONSUMING_TIMEOUT_S:g}s ({path})")


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered):.0f} / {p90:.0f} / {ordered[-1]:.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
