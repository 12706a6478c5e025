"""fylr requests: cancel a running task (``POST /api/v1/task/{id}/cancel``). Pure builders.

A 200 only sets ``run_canceled_at``; the task runner later moves the task to ``canceled``.
A task that is not running, or already asked to cancel, answers 400: a refusal, not a
transient error, so it is not retried.

A 400 after an attempt whose answer was lost (a 5xx, a timeout: fylr may have acted) may
be the answer to this command's own first cancel. Then the task is read (:func:`task`):
if its cancel was requested or it is ``canceled`` (:func:`cancel_requested`), the command
succeeded, and the event carries the task as fylr gave it.
"""

from __future__ import annotations

from typing import Any

from schemas.commands import CancelTaskParams
from worker.replies import VendorRequest
from worker.settings import FylrAccount
from worker.vendors.auth import Form


def token_url(account: FylrAccount) -> str:
    return f"{_base(account)}/api/oauth2/token"


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


def cancel(account: FylrAccount, params: CancelTaskParams) -> VendorRequest:
    return VendorRequest(
        vendor="fylr",
        method="POST",
        url=f"{_base(account)}/api/v1/task/{params.task_id}/cancel",
        route="/api/v1/task/{taskId}/cancel",
    )


def task(account: FylrAccount, task_id: int) -> VendorRequest:
    return VendorRequest(
        vendor="fylr",
        method="GET",
        url=f"{_base(account)}/api/v1/task/{task_id}",
        route="/api/v1/task/{taskId}",
    )


def cancel_requested(body: Any) -> bool:
    task = body.get("task", body) if isinstance(body, dict) else None
    if not isinstance(task, dict):
        return False
    return task.get("status") == "canceled" or bool(task.get("run_canceled_at"))


def _base(account: FylrAccount) -> str:
    return account.base_url.rstrip("/")
