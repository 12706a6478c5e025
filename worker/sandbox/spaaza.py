"""Spaaza Services API: `PUT /tasks/{id}`, under `/spaaza`."""

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from worker.sandbox.answers import Answer, json_answer, spaaza_error
from worker.sandbox.clock import is_iso_time
from worker.sandbox.pipeline import call, endpoint, json_object
from worker.sandbox.resources import MISSING_ID_FROM
from worker.sandbox.state import SandboxState

REPEATS = frozenset({"daily", "weekly", "monthly"})


class Spaaza:
    """The Spaaza routes over one sandbox state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        """The Starlette route for the task update."""
        state = self._state

        async def update_task(request: Request) -> Answer:
            return await call(state, "spaaza", request, self._update_task)

        produce = endpoint(state, "spaaza.update_task", update_task, with_request_id=False)
        return [Route("/spaaza/tasks/{task_id}", produce, methods=["PUT"])]

    def _update_task(self, params: Mapping[str, str], body: bytes) -> Answer:
        raw_id = params["task_id"]
        if not raw_id.isdigit() or int(raw_id) >= MISSING_ID_FROM:
            return spaaza_error(404, f"No task exists with ID {raw_id} for this chain.")
        changes = json_object(body)
        if changes is None:
            return spaaza_error(400, "Body must be a JSON object.")
        problem = _changes_problem(changes)
        if problem is not None:
            return spaaza_error(400, problem)
        task = self._state.update_spaaza_task(int(raw_id), changes)
        self._state.apply_effect("spaaza.update_task", (raw_id,))
        return json_answer(200, task)


def _changes_problem(changes: Mapping[str, Any]) -> str | None:
    """Why the update is invalid, or None."""
    for name in ("desc", "debug"):
        if name in changes and not isinstance(changes[name], str):
            return f"{name} must be a string."
    if "target" in changes and not isinstance(changes["target"], dict):
        return "Invalid target: must be an object."
    if "trigger" in changes:
        return _trigger_problem(changes["trigger"])
    return None


def _trigger_problem(trigger: object) -> str | None:
    if not isinstance(trigger, dict) or not is_iso_time(trigger.get("once")):
        return "Invalid trigger: `once` must be an ISO-8601 UTC time."
    if "repeat" in trigger and trigger["repeat"] not in REPEATS:
        return "Invalid trigger: `repeat` must be daily, weekly or monthly."
    return None
