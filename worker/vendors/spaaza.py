"""Spaaza requests: overwrite a task's trigger (``PUT /tasks/{id}``); the answer is the
whole task. A pure builder."""

from __future__ import annotations

from schemas.commands import SpaazaUpdateTriggersParams
from worker.replies import VendorRequest
from worker.settings import SpaazaAccount


def update_task(account: SpaazaAccount, params: SpaazaUpdateTriggersParams) -> VendorRequest:
    body = params.model_dump(mode="json", exclude={"provider", "task_id"}, exclude_none=True)
    return VendorRequest(
        vendor="spaaza",
        method="PUT",
        url=f"{account.base_url.rstrip('/')}/tasks/{params.task_id}",
        route="/tasks/{id}",
        json=body,
    )
