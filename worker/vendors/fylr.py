"""fylr: cancel a running task (``POST /api/v1/task/{id}/cancel``).

A 200 only sets ``run_canceled_at``; the task runner later moves the task to ``canceled``.
A task that is not running, or already asked to cancel, answers 400: a refusal, not a
transient error, so it is not retried.

A 400 after an attempt whose answer was lost (a 5xx, a timeout: fylr may have acted) may
be the answer to this command's own first cancel. Then the task is read: if its cancel
was requested or it is ``canceled``, the command succeeded, and the event carries the
task as fylr gave it.
"""

from __future__ import annotations

from typing import Any

from schemas.commands import CancelTaskParams
from worker.errors import PermanentFailure
from worker.replies import VendorReply, VendorRequest
from worker.settings import FylrAccount
from worker.vendors.auth import Form
from worker.vendors.http import CallBudget, VendorHttp


def token_url(account: FylrAccount) -> str:
    return f"{account.base_url.rstrip('/')}/api/oauth2/token"


def client(account: FylrAccount) -> Form:
    """The OAuth2 client's own credentials, sent with every grant."""
    return {"client_id": account.client_id, "client_secret": account.client_secret}


def grant(account: FylrAccount) -> Form:
    """The password grant when a user is configured (scope offline: a refresh token too),
    else client credentials."""
    if account.username and account.password:
        return {
            "grant_type": "password",
            "username": account.username,
            "password": account.password,
            "scope": "offline",
        }
    return {"grant_type": "client_credentials"}


class FylrClient:
    def __init__(self, account: FylrAccount, http: VendorHttp) -> None:
        self._base = account.base_url.rstrip("/")
        self._http = http

    async def cancel_task(self, params: CancelTaskParams, budget: CallBudget) -> VendorReply:
        request = VendorRequest(
            vendor="fylr",
            method="POST",
            url=f"{self._base}/api/v1/task/{params.task_id}/cancel",
            route="/api/v1/task/{taskId}/cancel",
        )
        try:
            return await self._http.call(request, budget)
        except PermanentFailure as error:
            if error.vendor_status != 400 or not budget.may_have_acted_before:
                raise
            task = await self._task(params.task_id, budget)
            if not _cancel_requested(task.body):
                raise
            return task

    async def _task(self, task_id: int, budget: CallBudget) -> VendorReply:
        request = VendorRequest(
            vendor="fylr",
            method="GET",
            url=f"{self._base}/api/v1/task/{task_id}",
            route="/api/v1/task/{taskId}",
        )
        return await self._http.call(request, budget)


def _cancel_requested(body: Any) -> bool:
    task = body.get("task", body) if isinstance(body, dict) else None
    if not isinstance(task, dict):
        return False
    return task.get("status") == "canceled" or bool(task.get("run_canceled_at"))
