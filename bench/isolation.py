"""The ``isolation`` scenario: a tenant flooding a rate-limited vendor account must not
hold up the other tenants' commands, nor leave the flooded account idle.

The worker routes each command of a rate-limited vendor into a lane queue of its account
(``<RELAY_LANE_QUEUE_PREFIX><vendor>.<tenant>``) and handles the others (fylr) straight
from the main queue. Every run has its own sandbox (ESET's 10 calls/s per account; each
tenant its own sub-addressed ESET user, so its own limit) and its own replicas:

* isolation, on each of ``--isolation-replicas``: the quiet tenant's commands (fylr
  cancel-task and ESET fetch-patching on its own account), sent one at a time at 4/s and
  timed from publish to event: with no backlog, right after a burst of
  ``--isolation-backlog`` deletes of the tenant ``flood`` (while it is being routed), and
  once the main queue has been drained into the lane. Meanwhile: the flood account's
  calls/s and 429s, the lane's depth and the lane metrics; at the end each replica's peak
  RSS and the longest receipt-to-settlement its histogram saw.
* fairness, 1 replica: 2, then 5 accounts flooded at once (queued before the replica
  starts, each account's commands one block after the other's): each account's calls/s
  over one common window, and the slowest over the fastest.
* the unlimited vendor: a fylr cancel-task flood alone, and queued behind the 5 floods.

The backlog is never drained (10,000 at 10/s would take 17 minutes): a run stops once it
has measured, and its queues, lanes included, are deleted.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Self

import httpx
from kombu import Producer
from kombu.exceptions import ChannelError

from bench.commands import batch_deletes, cancel_task, publish_command
from bench.measure import Samples, percentile, scrape_metrics, steady_rate
from bench.rig.events import EventCollector
from bench.rig.procs import Proc, free_port
from bench.rig.sandbox import ESET_LIMIT_PER_S, ESET_RATE_LIMITS
from bench.rig.tenants import eset_sub_account, sandbox_tenants
from bench.run import Options, Rig
from worker.broker.connection import connect

Result = dict[str, Any]
ROUTE = "eset.batch_delete"
FLOOD, QUIET, BULK = "flood", "quiet", "bulk"  # tenants: ESET flood, quiet one, fylr flood
QUIET_PER_S = 4.0
QUIET_WAIT_S = 30.0  # longest wait for a phase's events after its last publish
START_WAIT_S = 30.0  # replicas up, first tokens
ROUTING_WAIT_S = 60.0  # longest wait for the main queue to be drained into the lanes
SKIP_S = 1.0  # a rate leaves out its first second (start of the pacing, any burst)
STEADY_WINDOW_S = 10.0  # the flood's calls/s is counted over at least this
FAIR_WINDOW_S = 20.0
FYLR_WAIT_S = 30.0
DURATION = "relay_command_duration_seconds"  # receipt to settlement, a histogram


def isolation(options: Options) -> Result:
    runs = {str(n): _isolation_run(options, n) for n in options.isolation_replicas}
    fairness = {str(n): _fairness_run(options, n, fylr=n == 5) for n in (2, 5)}
    alone = _fylr_alone(options)
    rss = [mb for run in runs.values() for mb in run.get("peak_rss_mb_replicas", [])]
    return {"replica_runs": runs, "fairness": fairness, "fylr_alone": alone,
            # Not "peak_rss_mb": with the backlog the goal differs from the other runs'.
            "peak_rss_mb_backlogged": max((mb for mb in rss if mb is not None), default=None)}


# --- isolation: quiet commands next to a flood, 1 and 4 replicas ---


def _isolation_run(options: Options, replicas: int) -> Result:
    with Rig(options, f"isolation-{replicas}") as rig:
        lane = rig.names.lane_queue("eset", FLOOD)
        sandbox = rig.start_sandbox(rate_limited=True)
        events = Events(rig.collect_events())
        ports = [free_port() for _ in range(replicas)]
        workers = rig.relay(
            replicas=replicas, concurrency=options.concurrency, rate_limits=ESET_RATE_LIMITS,
            tenants=sandbox_tenants(sandbox.base_url, {FLOOD: ["eset"], QUIET: ["eset", "fylr"]}),
            health_ports=ports,
        )
        result: Result = {"replicas": replicas, "backlog": options.isolation_backlog}
        quiet = QuietSender(rig, events)
        quiet.warm_up(2 * replicas)
        result["baseline"] = quiet.phase(options.isolation_quiet)
        result.update(_flood(rig, quiet, lane, options))
        result.update(_quiet_next_to_flood(rig, quiet, ports, lane, options))
        settled = [_settled(_scrape(port)) for port in ports]
        result["settled_per_replica"] = settled
        result["settled_within_s"] = _max([s["within_s"] for s in settled])
        result["peak_rss_mb_replicas"] = [p.peak_rss_mb() for p in workers]
        result["outcomes"] = events.outcomes
        return result


def _flood(rig: Rig, quiet: QuietSender, lane: str, options: Options) -> Result:
    """The burst, quiet commands sent right after it, and how long routing took."""
    main = rig.topology.command_queue.name
    with DepthWatcher(rig, [main, lane]) as depths:
        started = time.monotonic()
        rig.publish_burst(batch_deletes(options.isolation_backlog, FLOOD))
        published = time.monotonic()
        during = quiet.phase(options.isolation_quiet)
        # Empty once every message was handed to a consumer (ready count: the few a
        # router holds unacked are not counted).
        drained = depths.wait(main, 0, published, ROUTING_WAIT_S)
        left = depths.latest(main)
    routing_s = None if drained is None else drained - started
    return {
        "burst_publish_s": published - started,
        "during_routing": during,
        "routed": drained is not None,
        "routing_s": routing_s,
        "routing_per_s": options.isolation_backlog / routing_s if routing_s else None,
        "main_queue_left": None if drained is not None else left,
        "routing_waited_s": time.monotonic() - published,
    }


def _quiet_next_to_flood(
    rig: Rig, quiet: QuietSender, ports: list[int], lane: str, options: Options
) -> Result:
    """Quiet commands with the backlog in the lane; the flood account's rate meanwhile."""
    assert rig.sandbox is not None
    probes: list[Result] = []
    before = rig.sandbox.stats()
    started = time.monotonic()
    after = quiet.phase(options.isolation_quiet,
                        at_half=lambda: probes.append(_probe(rig, ports, lane)))
    _sleep_until(started + SKIP_S + STEADY_WINDOW_S, rig)
    ended = time.monotonic()
    stats = rig.sandbox.stats()
    flood = quiet.events.times(FLOOD)
    window_s = ended - started - SKIP_S
    statuses = _diff(stats["statuses"].get(ROUTE, {}), before["statuses"].get(ROUTE, {}))
    calls = sum(statuses.values())
    peaks = stats.get("max_calls_in_window", {}).get("eset", {})
    return {
        "after_routing": after,
        "flood_window_s": window_s,
        # First to last event of the window: n events there are n - 1 intervals.
        "flood_calls_per_s": steady_rate([t for t in flood if started + SKIP_S <= t <= ended],
                                         0),
        "flood_vendor_statuses": statuses,
        "flood_vendor_statuses_run": stats["statuses"].get(ROUTE, {}),
        "share_429": statuses.get("429", 0) / calls if calls else None,
        "flood_max_calls_in_a_second": peaks.get(eset_sub_account(FLOOD)),
        "mid_run": probes[0] if probes else None,
    }


def _probe(rig: Rig, ports: list[int], lane: str) -> Result:
    """What the broker and the replicas say about the backlog, mid-phase."""
    metrics = [_lane_metrics(_scrape(port)) for port in ports]
    return {"lane_depth": rig.queue_depth(lane),
            "main_depth": rig.queue_depth(rig.topology.command_queue.name),
            "lane_metrics_per_replica": metrics}


class QuietSender:
    """The quiet tenant's commands, one at a time at a steady pace, alternating a fylr
    cancel-task and an ESET fetch-patching; each timed from its publish to its event."""

    def __init__(self, rig: Rig, events: Events) -> None:
        self.rig, self.events = rig, events
        self._task_ids = itertools.count(1)  # a fylr task accepts one cancel

    def warm_up(self, count: int) -> None:
        """Replicas up, tokens fetched; not measured."""
        sent = self._send(count)
        if not self.events.wait(lambda: self.events.has(sent), START_WAIT_S,
                                self.rig.procs.check_alive):
            raise TimeoutError(f"no events for the warm-up commands within {START_WAIT_S:g}s")

    def phase(self, count: int, at_half: Callable[[], None] | None = None) -> Result:
        sent = self._send(count, at_half)
        complete = self.events.wait(lambda: self.events.has(sent), QUIET_WAIT_S,
                                    self.rig.procs.check_alive)
        # A command still without its event counts with the time waited: a lower bound.
        gave_up = time.monotonic()
        latency = {cid: self.events.arrived(cid, gave_up) - at for cid, (at, _) in sent.items()}
        by_type = {kind: [latency[cid] for cid, (_, k) in sent.items() if k == kind]
                   for kind in ("cancel-task", "fetch-patching")}
        return {"commands": count, "events": self.events.received(sent),
                "complete": complete, **_spread(list(latency.values())),
                "by_type": {kind: _spread(values) for kind, values in by_type.items()}}

    def _send(self, count: int, at_half: Callable[[], None] | None = None
              ) -> dict[str, tuple[float, str]]:
        sent: dict[str, tuple[float, str]] = {}
        # A connection per phase: an idle one would miss its heartbeats between phases.
        with connect(self.rig.options.amqp_url) as connection:
            producer = Producer(connection.channel())
            started = time.monotonic()
            for index in range(count):
                time.sleep(max(0.0, started + index / QUIET_PER_S - time.monotonic()))
                command = self._command(index)
                sent[command["id"]] = (time.monotonic(), command["type"])
                publish_command(producer, self.rig.topology.commands, command)
                if at_half is not None and index == count // 2:
                    at_half()
        return sent

    def _command(self, index: int) -> dict[str, Any]:
        if index % 2:
            return {"type": "fetch-patching", "id": str(uuid.uuid4()), "tenant": QUIET,
                    "params": {}}
        return cancel_task(QUIET, next(self._task_ids))


class Events:
    """The collector's events by command id and by tenant, grouped as they come in."""

    def __init__(self, collector: EventCollector) -> None:
        self._collector = collector
        self._grouped = 0
        self._by_id: dict[str, float] = {}
        self._by_tenant: dict[str, list[float]] = {}
        self.outcomes: dict[str, dict[str, int]] = {}  # tenant → "<type>.<outcome>" → n

    def update(self) -> None:
        new = self._collector.events_since(self._grouped)
        self._grouped += len(new)
        for arrived, seen in new:
            tenant = str(seen.tenant)
            self._by_id.setdefault(seen.command_id, arrived)
            self._by_tenant.setdefault(tenant, []).append(arrived)
            counts = self.outcomes.setdefault(tenant, {})
            key = f"{seen.command_type}.{seen.outcome}"
            counts[key] = counts.get(key, 0) + 1

    def has(self, ids: dict[str, Any]) -> bool:
        return all(cid in self._by_id for cid in ids)

    def received(self, ids: dict[str, Any]) -> int:
        return sum(cid in self._by_id for cid in ids)

    def arrived(self, command_id: str, default: float) -> float:
        return self._by_id.get(command_id, default)

    def times(self, tenant: str) -> list[float]:
        self.update()
        return sorted(self._by_tenant.get(tenant, []))

    def count(self, tenants: list[str]) -> int:
        return sum(len(self._by_tenant.get(t, [])) for t in tenants)

    def wait(self, done: Callable[[], bool], timeout_s: float, check: Callable[[], None]) -> bool:
        """True once ``done()``; False after ``timeout_s``. ``check`` raises when a process
        of the run died."""
        give_up_at = time.monotonic() + timeout_s
        while True:
            self.update()
            if done():
                return True
            if time.monotonic() >= give_up_at:
                return False
            check()
            time.sleep(0.05)


class Sampling:
    """A thread taking samples (its ``_run``) from entering the block until leaving it."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        raise NotImplementedError


class DepthWatcher(Sampling):
    """Polls the ready count of some queues (a passive declare every 0.2 s) in a thread;
    None while a queue does not exist."""

    def __init__(self, rig: Rig, queues: list[str]) -> None:
        super().__init__("depths")
        self._rig, self._queues = rig, queues
        self._samples: list[tuple[float, dict[str, int | None]]] = []

    def _run(self) -> None:
        with connect(self._rig.options.amqp_url) as connection:
            channel = connection.channel()
            while not self._stop.wait(0.2):
                depths: dict[str, int | None] = {}
                for name in self._queues:
                    try:
                        depths[name] = channel.queue_declare(name, passive=True).message_count
                    except ChannelError:  # missing: the broker closed the channel
                        depths[name], channel = None, connection.channel()
                self._samples.append((time.monotonic(), depths))

    def wait(self, queue: str, depth: int, after: float, timeout_s: float) -> float | None:
        """When ``queue`` first held at most ``depth`` after ``after``; None on timeout."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            for at, depths in list(self._samples):
                found = depths.get(queue)
                if at >= after and found is not None and found <= depth:
                    return at
            self._rig.procs.check_alive()
            time.sleep(0.2)
        return None

    def latest(self, queue: str) -> int | None:
        return self._samples[-1][1].get(queue) if self._samples else None


# --- fairness: several accounts flooded at once; the unlimited vendor next to them ---


def _fairness_run(options: Options, accounts: int, *, fylr: bool) -> Result:
    names = [f"account{i}" for i in range(1, accounts + 1)]
    fylr_count = options.isolation_fylr_commands if fylr else 0
    per_account = options.isolation_fair_commands
    # The window must end before any account runs out of commands (at 10/s).
    window_s = min(FAIR_WINDOW_S, max(2.0, 0.8 * per_account / ESET_LIMIT_PER_S - SKIP_S))
    with Rig(options, f"fairness-{accounts}") as rig:
        sandbox = rig.start_sandbox(rate_limited=True)
        events = Events(rig.collect_events())
        backlog = [c for name in names for c in batch_deletes(per_account, name)]
        task_ids = itertools.count(1)
        backlog += [cancel_task(BULK, next(task_ids)) for _ in range(fylr_count)]
        rig.publish_backlog(backlog)
        accounts_of = {name: ["eset"] for name in names} | ({BULK: ["fylr"]} if fylr else {})
        (worker,) = rig.relay(
            replicas=1, concurrency=options.concurrency, rate_limits=ESET_RATE_LIMITS,
            tenants=sandbox_tenants(sandbox.base_url, accounts_of),
        )
        check = rig.procs.check_alive
        with CpuSampler([worker, sandbox.proc]) as cpu:
            events.wait(lambda: events.count(names) > 0, START_WAIT_S, check)
            first = min((t for name in names for t in events.times(name)), default=None)
            if first is not None:
                _sleep_until(first + SKIP_S + window_s, rig)
            fylr_complete = events.wait(lambda: events.count([BULK]) >= fylr_count,
                                        FYLR_WAIT_S, check)
        rates = {name: _rate_in(events.times(name), first, window_s) for name in names}
        rss = worker.peak_rss_mb()
    known = [rate for rate in rates.values() if rate is not None]
    result: Result = {
        "accounts": accounts, "commands_per_account": per_account, "window_s": window_s,
        "calls_per_s": rates,
        "min_over_max": min(known) / max(known) if known and max(known) > 0 else None,
        "outcomes": events.outcomes, "peak_rss_mb": rss,
    }
    if fylr:
        result["fylr"] = _fylr_figures(events.times(BULK), fylr_count, fylr_complete, cpu)
    return result


def _fylr_alone(options: Options) -> Result:
    count = options.isolation_fylr_commands
    with Rig(options, "fylr-alone") as rig:
        sandbox = rig.start_sandbox(rate_limited=True)
        events = Events(rig.collect_events())
        task_ids = itertools.count(1)
        rig.publish_backlog([cancel_task(BULK, next(task_ids)) for _ in range(count)])
        (worker,) = rig.relay(
            replicas=1, concurrency=options.concurrency, rate_limits=ESET_RATE_LIMITS,
            tenants=sandbox_tenants(sandbox.base_url, {BULK: ["fylr"]}),
        )
        with CpuSampler([worker, sandbox.proc]) as cpu:
            complete = events.wait(lambda: events.count([BULK]) >= count,
                                   START_WAIT_S + FYLR_WAIT_S, rig.procs.check_alive)
        return {**_fylr_figures(events.times(BULK), count, complete, cpu),
                "outcomes": events.outcomes, "peak_rss_mb": worker.peak_rss_mb()}


def _fylr_figures(times: list[float], count: int, complete: bool, cpu: CpuSampler) -> Result:
    skip = min(100, count // 10)
    # How busy the replica and the sandbox were meanwhile: at about 1.0 the replica's one
    # core is what limits the rate, and other work in it (the lanes) takes from it.
    busy = cpu.busy(times[skip], times[-1]) if len(times) > skip + 1 else {}
    return {"commands": count, "events": len(times), "complete": complete,
            "per_s": steady_rate(times, skip), "cpu_busy": busy}


class CpuSampler(Sampling):
    """Some processes' CPU seconds, every 0.2 s, in a thread."""

    def __init__(self, procs: list[Proc]) -> None:
        super().__init__("cpu")
        self._procs = procs
        self._samples: list[tuple[float, list[float]]] = []

    def _run(self) -> None:
        while True:
            self._samples.append((time.monotonic(), [p.cpu_s() or 0.0 for p in self._procs]))
            if self._stop.wait(0.2):
                return

    def busy(self, start: float, end: float) -> dict[str, float]:
        """Each process's CPU seconds per second between the samples nearest to
        ``start`` and ``end`` (1.0: one core all the time)."""
        if not self._samples:
            return {}
        first = min(self._samples, key=lambda sample: abs(sample[0] - start))
        last = min(self._samples, key=lambda sample: abs(sample[0] - end))
        span_s = last[0] - first[0]
        if span_s <= 0:
            return {}
        return {p.name: round((b - a) / span_s, 2)
                for p, a, b in zip(self._procs, first[1], last[1], strict=True)}


# --- small helpers ---


def _rate_in(times: list[float], first: float | None, window_s: float) -> float | None:
    """Events per second in the window that starts ``SKIP_S`` after ``first``."""
    if first is None:
        return None
    start = first + SKIP_S
    return sum(start <= t <= start + window_s for t in times) / window_s


def _spread(values: list[float]) -> Result:
    return {"p50_s": percentile(values, 50), "p99_s": percentile(values, 99),
            "max_s": max(values, default=None)}


def _scrape(port: int) -> Samples:
    """A replica's /metrics; empty when it does not answer (the figures say n/a)."""
    try:
        return scrape_metrics(port)
    except httpx.HTTPError:
        return {}


def _lane_metrics(samples: Samples) -> dict[str, dict[str, float]]:
    """The ``relay_lane*`` samples but histogram buckets: name → lane → value."""
    return {name: {labels.get("relay_lane", ",".join(labels.values())): value
                   for labels, value in found}
            for name, found in samples.items()
            if name.startswith("relay_lane") and not name.endswith("_bucket")}


def _settled(samples: Samples) -> Result:
    """From the receipt-to-settlement histogram: the smallest bucket bound that holds every
    delivery the replica settled (none was held unacked longer), also by outcome (``laned``:
    forwarded from the command queue to a lane), and the mean."""
    buckets = samples.get(f"{DURATION}_bucket", [])
    by_outcome = {labels.get("relay_outcome", "?") for labels, _ in buckets}
    count = sum(value for _, value in samples.get(f"{DURATION}_count", []))
    total_s = sum(value for _, value in samples.get(f"{DURATION}_sum", []))
    return {"within_s": _within(buckets), "deliveries": count,
            "mean_s": total_s / count if count else None,
            "within_s_by_outcome": {
                outcome: _within([b for b in buckets if b[0].get("relay_outcome", "?") == outcome])
                for outcome in sorted(by_outcome)}}


def _within(buckets: list[tuple[dict[str, str], float]]) -> float | None:
    by_bound: dict[float, float] = {}
    for labels, value in buckets:
        bound = float(labels["le"])
        by_bound[bound] = by_bound.get(bound, 0.0) + value  # summed over the label sets
    if not by_bound:
        return None
    everything = by_bound[max(by_bound)]  # the +Inf bucket
    return min(bound for bound, n in by_bound.items() if n >= everything)


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: n - before.get(key, 0) for key, n in after.items() if n - before.get(key, 0)}


def _max(values: list[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _sleep_until(deadline: float, rig: Rig) -> None:
    while (left_s := deadline - time.monotonic()) > 0:
        rig.procs.check_alive()
        time.sleep(min(0.2, left_s))
