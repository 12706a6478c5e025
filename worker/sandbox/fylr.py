"""fylr (Programmfabrik): OAuth2 token, task cancel and task read, under `/fylr`."""

import base64
import binascii
from collections.abc import Mapping

from starlette.requests import Request
from starlette.routing import Route

from worker.sandbox.answers import Answer, fylr_error, json_answer, oauth_error
from worker.sandbox.pipeline import call, endpoint, form_fields
from worker.sandbox.resources import MISSING_ID_FROM, CancelOutcome
from worker.sandbox.state import SandboxState
from worker.sandbox.tokens import Grant

_ACKNOWLEDGED = json_answer(200, {"status": {"acknowledged": "ok"}})


class Fylr:
    """The fylr routes over one sandbox state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        """Starlette routes for the token, cancel and read calls."""
        state = self._state

        async def cancel(request: Request) -> Answer:
            return await call(state, "fylr", request, self._cancel)

        async def get_task(request: Request) -> Answer:
            return await call(state, "fylr", request, self._get_task)

        table = [
            ("fylr.token", "/fylr/api/oauth2/token", "POST", self._token),
            ("fylr.cancel", "/fylr/api/v1/task/{task_id}/cancel", "POST", cancel),
            ("fylr.get_task", "/fylr/api/v1/task/{task_id}", "GET", get_task),
        ]
        return [
            Route(path, endpoint(state, name, produce, with_request_id=False), methods=[method])
            for name, path, method, produce in table
        ]

    # --- token ---

    async def _token(self, request: Request) -> Answer:
        fields = await form_fields(request)
        if fields is None:
            return oauth_error(415, "invalid_request", "Body must be form-encoded.")
        if not self._client_authenticates(fields, request.headers.get("authorization")):
            return oauth_error(401, "invalid_client", "Unknown client or wrong client secret.")
        grant_type = fields.get("grant_type")
        if grant_type == "client_credentials":
            return self._grant(self._state.config.fylr_client_id, fields)
        if grant_type == "password":
            return self._password_grant(fields)
        if grant_type == "refresh_token":
            grant = self._state.refresh_token("fylr", fields.get("refresh_token", ""))
            if grant is None:
                return oauth_error(400, "invalid_grant", "Unknown refresh token.")
            return _grant_answer(grant)
        return oauth_error(400, "unsupported_grant_type", f"Unsupported grant: {grant_type}.")

    def _client_authenticates(self, fields: Mapping[str, str], authorization: str | None) -> bool:
        # RFC 6749 lets the client authenticate in the body or with HTTP Basic; accept both.
        client_id, client_secret = fields.get("client_id"), fields.get("client_secret")
        if client_id is None and authorization is not None:
            client_id, client_secret = _basic_credentials(authorization)
        config = self._state.config
        return client_id == config.fylr_client_id and client_secret == config.fylr_client_secret

    def _password_grant(self, fields: Mapping[str, str]) -> Answer:
        config = self._state.config
        username = fields.get("username", "")
        if username != config.fylr_username or fields.get("password") != config.fylr_password:
            return oauth_error(400, "invalid_grant", "Wrong username or password.")
        return self._grant(username, fields)

    def _grant(self, account: str, fields: Mapping[str, str]) -> Answer:
        # fylr hands out a refresh token only for scope `offline`.
        offline = "offline" in fields.get("scope", "").split()
        return _grant_answer(self._state.issue_token("fylr", account, with_refresh=offline))

    # --- operations ---

    def _cancel(self, params: Mapping[str, str], body: bytes) -> Answer:
        task_id = _existing_task_id(params["task_id"])
        if task_id is None:
            return _not_found(params["task_id"])
        outcome = self._state.cancel_fylr_task(task_id)
        if outcome is CancelOutcome.ACKNOWLEDGED:
            self._state.apply_effect("fylr.cancel", (str(task_id),))
            return _ACKNOWLEDGED
        if outcome is CancelOutcome.ALREADY_REQUESTED:
            return fylr_error(400, f"Cancel of task {task_id} was already requested.")
        return fylr_error(400, f"Task {task_id} is not running.")

    def _get_task(self, params: Mapping[str, str], body: bytes) -> Answer:
        task_id = _existing_task_id(params["task_id"])
        if task_id is None:
            return _not_found(params["task_id"])
        return json_answer(200, {"task": self._state.fylr_task(task_id)})


def _existing_task_id(raw: str) -> int | None:
    """The task id, or None when no such task exists (not a number, or >= 900000)."""
    if not raw.isdigit():
        return None
    task_id = int(raw)
    return task_id if task_id < MISSING_ID_FROM else None


def _not_found(raw_id: str) -> Answer:
    return fylr_error(404, f"Task {raw_id} not found.", "ObjectNotFound")


def _basic_credentials(authorization: str) -> tuple[str | None, str | None]:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, _, client_secret = decoded.partition(":")
    return client_id, client_secret


def _grant_answer(grant: Grant) -> Answer:
    payload: dict[str, object] = {
        "access_token": grant.access_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in_s,
    }
    if grant.refresh_token is not None:
        payload["refresh_token"] = grant.refresh_token
    return json_answer(200, payload)
