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
