"""The results as a plain-text table (scenario, figure, value, goal, met?) and as JSON."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = dict[str, dict[str, Any]]
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Row:
    scenario: str
    figure: str
    value: float | None
    unit: str = ""
    goal: tuple[str, float] | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.value is None:
            return None
        op, threshold = self.goal
        return _OPS[op](self.value, threshold)

    def as_dict(self) -> dict[str, Any]:
        goal = f"{self.goal[0]} {self.goal[1]:g}" if self.goal else None
        return {"scenario": self.scenario, "figure": self.figure, "value": self.value,
                "unit": self.unit, "goal": goal, "met": self.met, "note": self.note}


def rows(all_results: Results) -> list[Row]:
    out: list[Row] = []
    results = {name: r for name, r in all_results.items() if "error" not in r}
    fast = "fast vendor, 1 replica"
    relay, raw, celery = (results.get(k, {}) for k in ("throughput", "raw", "celery"))
    if "throughput" in results:
        out.append(Row(fast, "command-relay", relay.get("per_s"), "commands/s", (">=", 900),
                       _run_note(relay)))
        cpu = relay.get("cpu_ms_per_command", {})
        out.append(Row(fast, "  its CPU per command", cpu.get("relay-0"), "ms"))
        out.append(Row(fast, "  sandbox CPU per command", cpu.get("sandbox"), "ms"))
    if "raw" in results:
        out.append(Row(fast, "raw anchor (kombu+httpx+confirm)", raw.get("per_s"),
                       "commands/s", note=_run_note(raw)))
        out.append(Row(fast, "  its CPU per command", raw.get("cpu_ms_per_command", {})
                       .get("raw"), "ms"))
    if "celery" in results:
        pool = f"{celery.get('pool')} pool, -c {celery.get('concurrency')}"
        out.append(Row(fast, f"Celery anchor ({pool})", celery.get("per_s"), "tasks/s",
                       note=_run_note(celery)))
        out.append(Row(fast, "  its CPU per task (all processes)",
                       celery.get("cpu_ms_per_command"), "ms"))
    if "throughput" in results and "raw" in results:
        out.append(Row(fast, "command-relay / raw", _ratio(relay, raw), "x",
                       note=_rounds_note(relay, raw)))
    if "throughput" in results and "celery" in results:
        out.append(Row(fast, "command-relay / Celery", _ratio(relay, celery), "x", (">=", 1.0),
                       _rounds_note(relay, celery)))
    if "slow" in results:
        slow = results["slow"]
        out.append(Row("100 ms vendor, 100 in flight", "command-relay", slow.get("per_s"),
                       "commands/s", (">=", 700), _run_note(slow)))
        out.append(Row("100 ms vendor, 100 in flight", "  its CPU per command",
                       slow.get("cpu_ms_per_command", {}).get("relay-0"), "ms"))
    if "ratelimit" in results:
        limited = results["ratelimit"]
        scenario = f"10/s ESET limit, {limited.get('replicas')} replicas"
        out.append(Row(scenario, "vendor calls achieved", limited.get("calls_per_s"), "calls/s",
                       (">=", 9.5), _run_note(limited)))
        share = limited.get("share_429")
        out.append(Row(scenario, "429 answers", None if share is None else share * 100,
                       "% of calls", ("<=", 1.0)))
        out.append(Row(scenario, "most calls in one sliding second",
                       limited.get("max_calls_in_a_second"), "calls", ("<=", 10)))
    if "latency" in results:
        low = results["latency"]
        note = f"vendor call {_fmt(low.get('vendor_ms_median'))} ms subtracted"
        out.append(Row("low load, 1 at a time", "added latency p50", low.get("added_ms_p50"),
                       "ms", ("<=", 5.0), note))
        out.append(Row("low load, 1 at a time", "added latency p99", low.get("added_ms_p99"),
                       "ms"))
    if "coalesce" in results:
        out.extend(_coalesce_rows(results["coalesce"]))
    if "isolation" in results:
        out.extend(_isolation_rows(results["isolation"]))
    rss = [mb for result in results.values() for mb in result.get("peak_rss_mb", []) or []
           if mb is not None]
    if rss:
        out.append(Row("all command-relay runs", "peak RSS per replica (max)", max(rss), "MB",
                       ("<=", 120.0), f"{len(rss)} replicas"))
    for name, result in all_results.items():
        if "error" in result:
            out.append(Row(name, "FAILED", None, note=str(result["error"]).splitlines()[0]))
    return out


def _coalesce_rows(result: dict[str, Any]) -> list[Row]:
    """Each figure with coalescing off, then on, on adjacent rows."""
    scenario = "1-object deletes, 10/s limit"
    out: list[Row] = []
    for figure, key, unit in [
        ("commands/s", "per_s", "commands/s"),
        ("vendor calls", "vendor_calls", "calls"),
        ("429 answers", "answers_429", ""),
        ("objects deleted", "objects_deleted", ""),
    ]:
        for name in ("off", "on"):
            run = result.get(name, {})
            out.append(Row(scenario, f"{figure}, coalescing {name}", run.get(key), unit,
                           note=_coalesce_note(figure, run)))
    out.append(Row(scenario, "commands/s, on / off", _ratio(result.get("on", {}),
                                                          result.get("off", {})), "x"))
    return out


def _coalesce_note(figure: str, run: dict[str, Any]) -> str:
    if figure == "commands/s":
        window = f", window {run.get('window_ms'):g} ms" if run.get("window_ms") else ""
        return "; ".join(filter(None, [
            f"{run.get('commands')} commands{window}, {run.get('concurrency')} in flight",
            f"last event {_fmt(run.get('seconds_to_last_event'))} s after start",
            _run_note(run),
        ]))
    if figure == "vendor calls":
        return f"{_fmt(run.get('objects_per_call'))} objects per call"
    if figure == "objects deleted":
        twice = run.get("objects_deleted_more_than_once")
        return f"of {run.get('commands')}" + (f"; {twice} more than once" if twice else "")
    return ""


def _isolation_rows(result: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for run in result.get("replica_runs", {}).values():
        out.extend(_flood_rows(run))
    rss = result.get("peak_rss_mb_backlogged")
    runs = result.get("replica_runs", {}).values()
    replicas = sum(len(run.get("peak_rss_mb_replicas", [])) for run in runs)
    out.append(Row("flood isolation", "peak RSS per replica (max)", rss, "MB", ("<=", 150.0),
                   f"{_replicas(replicas)}, backlog queued"))
    for fair in result.get("fairness", {}).values():
        rates = ", ".join(_fmt(r) for r in fair.get("calls_per_s", {}).values())
        out.append(Row(f"{fair.get('accounts')} accounts flooded, 1 replica",
                       "slowest / fastest account", fair.get("min_over_max"), "x", (">=", 0.9),
                       f"calls/s {rates} over the same {_fmt(fair.get('window_s'))} s"))
    alone = result.get("fylr_alone", {})
    behind = result.get("fairness", {}).get("5", {}).get("fylr", {})
    scenario = "fylr flood (no limit), 1 replica"
    out.append(Row(scenario, "cancel-task alone", alone.get("per_s"), "commands/s",
                   note=_fylr_note(alone)))
    out.append(Row(scenario, "cancel-task queued behind 5 ESET floods", behind.get("per_s"),
                   "commands/s", note=_fylr_note(behind)))
    # "Not slowed beyond noise": this machine's noise is about ±15% (bench/README.md).
    out.append(Row(scenario, "behind the floods / alone", _ratio(behind, alone), "x",
                   (">=", 0.85), "noise ±15%"))
    return out


def _fylr_note(run: dict[str, Any]) -> str:
    busy = ", ".join(f"{name} {_fmt(share)}" for name, share in run.get("cpu_busy", {}).items())
    return "; ".join(filter(None, [busy and f"CPU s/s meanwhile: {busy}", _run_note(run)]))


def _flood_rows(run: dict[str, Any]) -> list[Row]:
    """Quiet commands' latency without and with a flood; the flood's pace; resources."""
    scenario = f"flood isolation, {_replicas(run.get('replicas'))}"
    backlog = f"{run.get('backlog'):,}"
    out = [
        _latency_row(scenario, "quiet p99, no backlog", run.get("baseline", {})),
        _latency_row(scenario, f"quiet p99, {backlog} backlogged",
                     run.get("after_routing", {}), goal=True),
        _latency_row(scenario, "quiet p99, sent right after the burst",
                     run.get("during_routing", {})),
        Row(scenario, "burst routed off the command queue", run.get("routing_per_s"),
            "commands/s", note=_routing_note(run)),
        Row(scenario, "flood account, while quiet ran", run.get("flood_calls_per_s"),
            "calls/s", (">=", 9.5), f"over {_fmt(run.get('flood_window_s'))} s"),
    ]
    share = run.get("share_429")
    whole = run.get("flood_vendor_statuses_run") or {}
    out.append(Row(scenario, "  its 429 answers", None if share is None else share * 100,
                   "% of calls", ("<=", 1.0),
                   f"whole run: {whole.get('429', 0)} of {sum(whole.values())} calls"))
    out.append(Row(scenario, "  its most calls in one sliding second",
                   run.get("flood_max_calls_in_a_second"), "calls", ("<=", 10), "whole run"))
    mid = run.get("mid_run") or {}
    out.append(Row(scenario, "flood lane depth (broker), mid-phase", mid.get("lane_depth"),
                   "messages", note=_lane_note(mid)))
    settled = run.get("settled_per_replica", [])
    means = ", ".join(_fmt(s.get("mean_s")) for s in settled)
    outcomes: dict[str, float] = {}
    for replica in settled:
        for outcome, bound in (replica.get("within_s_by_outcome") or {}).items():
            if bound is not None:
                outcomes[outcome] = max(bound, outcomes.get(outcome, 0.0))
    by_outcome = ", ".join(f"{name} {_fmt(bound)}" for name, bound in outcomes.items())
    out.append(Row(scenario, "all deliveries settled within", run.get("settled_within_s"), "s",
                   note=f"a histogram bucket bound ({by_outcome}); mean {means} s; "
                   "RabbitMQ's consumer_timeout: 1800 s"))
    return out


def _replicas(count: int | None) -> str:
    return f"{count} replica" + ("" if count == 1 else "s")


def _latency_row(scenario: str, figure: str, phase: dict[str, Any], goal: bool = False) -> Row:
    def ms(key: str) -> float | None:
        value = phase.get(key)
        return None if value is None else value * 1000

    note = f"p50 {_fmt(ms('p50_s'))}, max {_fmt(ms('max_s'))} ms"
    if not phase.get("complete", True):
        note += (f"; partial: {phase.get('events')} of {phase.get('commands')} in time"
                 " (the rest count the time waited)")
    return Row(scenario, figure, ms("p99_s"), "ms", ("<=", 1000.0) if goal else None, note)


def _routing_note(run: dict[str, Any]) -> str:
    publish = f"publishing took {_fmt(run.get('burst_publish_s'))} s"
    if run.get("routed"):
        return f"{run.get('backlog'):,} in {_fmt(run.get('routing_s'))} s; {publish}"
    return (f"not drained: {run.get('main_queue_left')} still queued after "
            f"{_fmt(run.get('routing_waited_s'))} s; {publish}")


def _lane_note(mid: dict[str, Any]) -> str:
    metrics = (mid.get("lane_metrics_per_replica") or [{}])[0]
    backlog = metrics.get("relay_lane_backlog", {}).get("eset.flood")
    oldest = metrics.get("relay_lane_oldest_wait_seconds", {}).get("eset.flood")
    return (f"relay_lane_backlog {_fmt(backlog)}, oldest wait {_fmt(oldest)} s; "
            f"command queue {mid.get('main_depth')}")


def table(all_rows: list[Row]) -> str:
    header = ("scenario", "figure", "value", "goal", "met?", "note")
    lines = [
        (r.scenario, r.figure, f"{_fmt(r.value)} {r.unit}".strip(),
         f"{r.goal[0]} {r.goal[1]:g}" if r.goal else "",
         {True: "yes", False: "NO", None: ""}[r.met], r.note)
        for r in all_rows
    ]
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    rendered = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                for cells in [header, *lines]]
    return "\n".join([rendered[0], rule, *rendered[1:]])


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """a's rate over b's: the median of the rounds' ratios when both ran in rounds (each
    round ran them back to back, so a noisy stretch of the machine touches both)."""
    pairs = list(zip(a.get("rounds_per_s") or [], b.get("rounds_per_s") or [], strict=False))
    ratios: list[float] = sorted(x / y for x, y in pairs if x and y)
    if ratios:
        return ratios[(len(ratios) - 1) // 2]
    x, y = a.get("per_s"), b.get("per_s")
    return x / y if x and y else None


def _rounds_note(a: dict[str, Any], b: dict[str, Any]) -> str:
    pairs = list(zip(a.get("rounds_per_s") or [], b.get("rounds_per_s") or [], strict=False))
    if len(pairs) < 2:
        return ""
    return "median of the rounds' ratios: " + ", ".join(
        f"{x / y:.2f}" if x and y else "n/a" for x, y in pairs)


def _run_note(result: dict[str, Any]) -> str:
    rounds = result.get("rounds_per_s")
    note = ""
    if rounds:
        note = f"median of {len(rounds)} rounds: " + ", ".join(_fmt(r) for r in rounds)
    if not result.get("complete", True):
        partial = f"partial: {result.get('events')} of {result.get('commands')} in time"
        note = f"{note}; {partial}" if note else partial
    return note


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
