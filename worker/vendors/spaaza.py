"""Spaaza: overwrite a task's trigger (``PUT /tasks/{id}``); the answer is the whole task."""

from __future__ import annotations

from schemas.commands import SpaazaUpdateTriggersParams
from worker.replies import VendorReply, VendorRequest
from worker.settings import SpaazaAccount
from worker.vendors.http import CallBudget, VendorHttp


class SpaazaClient:
    def __init__(self, account: SpaazaAccount, http: VendorHttp) -> None:
        self._base = account.base_url.rstrip("/")
        self._http = http

    async def update_task(
        self, params: SpaazaUpdateTriggersParams, budget: CallBudget
    ) -> VendorReply:
        body = params.model_dump(mode="json", exclude={"provider", "task_id"}, exclude_none=True)
        request = VendorRequest(
            vendor="spaaza",
            method="PUT",
            url=f"{self._base}/tasks/{params.task_id}",
            route="/tasks/{id}",
            json=body,
        )
        return await self._http.call(request, budget)
