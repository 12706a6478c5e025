"""The vendor-side objects the commands act on: fylr and Spaaza tasks.

Tasks come into being on first reference, so any plausible id works without seeding;
ids from `MISSING_ID_FROM` up do not exist, to exercise the vendors' 404s.
"""

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.sandbox.clock import utc_now_iso

MISSING_ID_FROM = 900_000
# A chain id as in Spaaza's sample answer; the sandbox has one chain.
SPAAZA_CHAIN_ID = 1764


class CancelOutcome(enum.Enum):
    ACKNOWLEDGED = "acknowledged"
    ALREADY_REQUESTED = "already_requested"
    NOT_RUNNING = "not_running"


@dataclass(slots=True)
class _FylrTask:
    task_id: int
    created_at: str = field(default_factory=utc_now_iso)
    status: str = "running"
    version: int = 1
    run_canceled_at: str | None = None
    run_finished_at: str | None = None
    updated_at: str | None = None
    cancel_requested_at: float | None = None  # monotonic

    def settle(self, now: float, settle_s: float) -> None:
        """Play the task runner: a cancel request takes effect `settle_s` later."""
        if self.status != "running" or self.cancel_requested_at is None:
            return
        if now - self.cancel_requested_at >= settle_s:
            self.status = "canceled"
            self.run_finished_at = self.updated_at = utc_now_iso()
            self.version += 1

    def payload(self) -> dict[str, Any]:
        """The `task` object of `GET /api/v1/task/{id}` (fylr api-docs page 002)."""
        return {
            "_id": self.task_id,
            "_version": self.version,
            "created_at": self.created_at,
            "description": f"Sandbox task {self.task_id}",
            "next_run_at": None,
            "run_canceled_at": self.run_canceled_at,
            "run_finished_at": self.run_finished_at,
            "run_started_at": self.created_at,
            "status": self.status,
            "status_msg": "",
            "status_percent": 100 if self.status == "canceled" else 42,
            "task_module": "sandbox",
            "task_params": {},
            "task_timeout_sec": 3600,
            "updated_at": self.updated_at or self.created_at,
        }


class FylrTasks:
    """fylr tasks by id, all `running` when first seen; not thread-safe."""

    def __init__(self, cancel_settle_s: float) -> None:
        self._settle_s = cancel_settle_s
        self._tasks: dict[int, _FylrTask] = {}

    def view(self, task_id: int, now: float) -> dict[str, Any]:
        """The task as fylr shows it at `now`."""
        return self._task(task_id, now).payload()

    def cancel(self, task_id: int, now: float) -> CancelOutcome:
        """Request a cancel; only a running task without an earlier request accepts it."""
        task = self._task(task_id, now)
        if task.cancel_requested_at is not None and task.status == "running":
            return CancelOutcome.ALREADY_REQUESTED
        if task.status != "running":
            return CancelOutcome.NOT_RUNNING
        task.cancel_requested_at = now
        task.run_canceled_at = task.updated_at = utc_now_iso()
        task.version += 1
        return CancelOutcome.ACKNOWLEDGED

    def _task(self, task_id: int, now: float) -> _FylrTask:
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _FylrTask(task_id)
        task.settle(now, self._settle_s)
        return task


@dataclass(slots=True)
class _SpaazaTask:
    task_id: int
    created_date: str = field(default_factory=utc_now_iso)
    last_modified: str = ""
    desc: str = ""
    debug: str = ""
    # Replaced wholesale by updates, never mutated in place, so payloads may share them.
    target: Mapping[str, Any] = field(default_factory=dict)
    trigger: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1

    def payload(self) -> dict[str, Any]:
        """The whole task object, shaped like Spaaza's sample answer (api-docs page 003)."""
        return {
            "id": self.task_id,
            "chain": SPAAZA_CHAIN_ID,
            "desc": self.desc,
            "state": {
                "code": "READY",
                "last_run_date": "0001-01-01T00:00:00Z",
                "last_modified": self.last_modified or self.created_date,
                "created_date": self.created_date,
            },
            "trigger": self.trigger,
            "target": self.target,
            "logs": None,
            "debug": self.debug,
            "version": self.version,
            "result": "",
        }


class SpaazaTasks:
    """Spaaza tasks by id, all `READY` (not started) when first seen; not thread-safe."""

    def __init__(self) -> None:
        self._tasks: dict[int, _SpaazaTask] = {}

    def update(self, task_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Overwrite the given fields (already validated); returns the whole task."""
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _SpaazaTask(task_id)
        task.desc = changes.get("desc", task.desc)
        task.debug = changes.get("debug", task.debug)
        task.target = changes.get("target", task.target)
        task.trigger = changes.get("trigger", task.trigger)
        task.version += 1
        task.last_modified = utc_now_iso()
        return task.payload()
