"""ESET Connect: OAuth token, device-task triggers, quarantine delete, patching details.

Every ESET service has its own host `{region}.{service}.eset.systems`; the sandbox
serves them under `/eset/{region}/{service}`. Every response carries `request-id`.
"""

import json
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.routing import Route

from worker.sandbox.answers import Answer, eset_error, json_answer, oauth_error
from worker.sandbox.clock import is_iso_time
from worker.sandbox.pending import CollectOutcome, RequestKey
from worker.sandbox.pipeline import Operation, Produce, endpoint, form_fields, gate, json_object
from worker.sandbox.state import SandboxState
from worker.sandbox.tokens import Grant

REGIONS = frozenset({"eu", "de", "us", "ca", "jpn"})
AUTH, AUTOMATION, QUARANTINE, PATCHING = (
    "business-account.iam",
    "automation",
    "quarantine-management",
    "patch-management",
)
_OK_EMPTY = Answer(200, b"{}")
# Task uuids with this prefix stand for tasks that do not exist (404).
MISSING_TASK_PREFIX = "00000000"


def offers(region: str, service: str) -> bool:
    """True when ESET runs `service` in `region` (no quarantine API in Japan)."""
    return region in REGIONS and not (service == QUARANTINE and region == "jpn")


def _version(name: str, major: int, minor: int, patch: int) -> dict[str, object]:
    # Version id for Major.Minor.Patch, as ESET's v1Version documents it.
    version_id = (major & 0xFFFF) << 48 | (minor & 0xFFFF) << 32 | (patch & 0xFFFF) << 16
    return {"id": str(version_id), "major": major, "minor": minor, "name": name, "patch": patch}


# Serialised once: the answer never changes and the dict must not be shared mutable state.
_PATCHING_BODY = json.dumps(
    {
        "patchingDetails": [
            {
                "applicationUuid": "5f0c6a3e-2b1d-4c8e-9a7f-0d3b6e1c2a41",
                "developerDisplayName": "Igor Pavlov",
                "displayName": "7-Zip",
                "patchedVersion": _version("24.8.0", 24, 8, 0),
                "status": "APPLICATION_PATCHING_STATUS_OK_INSTALLED",
                "timePeriod": {
                    "startTime": "2026-05-25T08:00:00Z",
                    "endTime": "2026-05-25T08:04:12Z",
                },
                "unpatchedVersion": _version("23.1.0", 23, 1, 0),
            },
            {
                "applicationUuid": "c1d9e7b2-6f4a-4e3b-8d2c-7a9b0e5f3c18",
                "developerDisplayName": "Mozilla",
                "displayName": "Mozilla Firefox",
                "patchedVersion": _version("128.3.1", 128, 3, 1),
                "status": "APPLICATION_PATCHING_STATUS_FAILED_TERMINATION_REQUIRED",
                "timePeriod": {
                    "startTime": "2026-05-25T09:30:00Z",
                    "endTime": "2026-05-25T09:31:40Z",
                },
                "unpatchedVersion": _version("127.0.2", 127, 0, 2),
            },
        ]
    },
    separators=(",", ":"),
).encode()


class Eset:
    """The ESET routes over one sandbox state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        """Starlette routes for the token call and the three API calls."""
        base = "/eset/{region}"
        table = [
            ("eset.token", f"{base}/{AUTH}/oauth/token", "POST", self._token),
            (
                "eset.update_task_triggers",
                f"{base}/{AUTOMATION}/v1/device_tasks/{{task_uuid}}:updateTaskTriggers",
                "POST",
                self._on(AUTOMATION, self._update_task_triggers),
            ),
            (
                "eset.batch_delete",
                f"{base}/{QUARANTINE}/v1/quarantined-objects:batchDelete",
                "POST",
                self._on(QUARANTINE, self._batch_delete),
            ),
            (
                "eset.fetch_patching",
                f"{base}/{PATCHING}/v1/application-patching-processes/recent/details",
                "GET",
                self._on(PATCHING, _fetch_patching),
            ),
        ]
        return [
            Route(
                path, endpoint(self._state, name, produce, with_request_id=True), methods=[method]
            )
            for name, path, method, produce in table
        ]

    # --- token ---

    async def _token(self, request: Request) -> Answer:
        if request.path_params["region"] not in REGIONS:
            return eset_error(404)
        fields = await form_fields(request)
        if fields is None:
            return oauth_error(415, "invalid_request", "Body must be form-encoded.")
        grant_type = fields.get("grant_type")
        if grant_type == "password":
            return self._password_grant(fields)
        if grant_type == "refresh_token":
            grant = self._state.refresh_token("eset", fields.get("refresh_token", ""))
            return _grant_answer(grant) if grant else _invalid_grant("Unknown refresh token.")
        return oauth_error(400, "unsupported_grant_type", f"Unsupported grant: {grant_type}.")

    def _password_grant(self, fields: Mapping[str, str]) -> Answer:
        config = self._state.config
        username = fields.get("username", "")
        if not _is_account_of(username, config.eset_username) or (
            fields.get("password") != config.eset_password
        ):
            return _invalid_grant("Wrong username or password.")
        return _grant_answer(self._state.issue_token("eset", username, with_refresh=True))

    # --- API calls, with ESET's 202 pending path ---

    def _on(self, service: str, operation: Operation) -> Produce:
        async def produce(request: Request) -> Answer:
            if not offers(request.path_params["region"], service):
                return eset_error(404)
            return await self._api_call(request, operation)

        return produce

    async def _api_call(self, request: Request, operation: Operation) -> Answer:
        refusal = await gate(self._state, "eset", request)
        if refusal is not None:
            return refusal
        body = await request.body()
        scope = request.scope
        key = RequestKey(scope["method"], scope["path"], scope["query_string"], body)
        response_id = request.headers.get("response-id")
        fault = self._state.pick_fault(key.path, pending_allowed=response_id is None)
        if fault is not None and fault.status != 202:
            if fault.answer_lost and response_id is None:
                operation(request.path_params, body)
            return eset_error(fault.status)
        if response_id is not None:
            return self._collect(response_id, key)
        if fault is not None:
            return self._accept(key, lambda: operation(request.path_params, body))
        return operation(request.path_params, body)

    def _accept(self, key: RequestKey, run: Callable[[], Answer]) -> Answer:
        # The vendor executes the request now, whether or not anyone collects: the effect is
        # applied exactly once. A request that can only time out is never executed.
        answer = run() if self._state.pending_answers_in_time else None
        response_id = self._state.accept_pending(key, answer)
        return Answer(202, headers=(("response-id", response_id),))

    def _collect(self, response_id: str, key: RequestKey) -> Answer:
        collected = self._state.collect(response_id, key)
        outcome = collected.outcome
        if outcome is CollectOutcome.READY and collected.answer is not None:
            return collected.answer
        if outcome is CollectOutcome.PENDING:
            return Answer(202, headers=(("response-id", response_id),))
        if outcome is CollectOutcome.MISMATCH:
            return eset_error(400, "The collect differs from the cached request.")
        if outcome is CollectOutcome.TIMED_OUT:
            return eset_error(504)
        return eset_error(404, "No cached response for this response-id.")

    # --- operations ---

    def _update_task_triggers(self, params: Mapping[str, str], body: bytes) -> Answer:
        payload = json_object(body)
        if payload is None:
            return eset_error(400, "Body must be a JSON object.")
        problem = _triggers_problem(payload)
        if problem is not None:
            return eset_error(400, problem)
        task_uuid = params["task_uuid"]
        if task_uuid.startswith(MISSING_TASK_PREFIX):
            return eset_error(404, f"Device task {task_uuid} not found.")
        self._state.apply_effect("eset.update_task_triggers", (task_uuid,))
        return _OK_EMPTY

    def _batch_delete(self, params: Mapping[str, str], body: bytes) -> Answer:
        payload = json_object(body)
        uuids = payload.get("objectUuids") if payload is not None else None
        if not isinstance(uuids, list) or not uuids:
            return eset_error(400, "objectUuids must be a non-empty list.")
        if not all(isinstance(uuid, str) and uuid for uuid in uuids):
            return eset_error(400, "objectUuids must hold non-empty strings.")
        self._state.apply_effect("eset.batch_delete", uuids)
        return _OK_EMPTY


def _fetch_patching(params: Mapping[str, str], body: bytes) -> Answer:
    return Answer(200, _PATCHING_BODY)


def _triggers_problem(payload: Mapping[str, object]) -> str | None:
    """Why `triggers` is invalid, or None. The only trigger type is `manual`."""
    triggers = payload.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        return "triggers must be a non-empty list."
    for trigger in triggers:
        manual = trigger.get("manual") if isinstance(trigger, dict) else None
        if not isinstance(manual, dict):
            return "Each trigger must be a manual trigger."
        expire_time = manual.get("expireTime")
        if expire_time is not None and not is_iso_time(expire_time):
            return "manual.expireTime must be an RFC 3339 timestamp."
    return None


def _grant_answer(grant: Grant) -> Answer:
    payload = {
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in_s,
    }
    return json_answer(200, payload)


def _invalid_grant(description: str) -> Answer:
    return oauth_error(400, "invalid_grant", description)


def _is_account_of(username: str, configured: str) -> bool:
    """The configured user, or a sub-address of it (``api+acme@…`` for ``api@…``): each
    is an account of its own, with its own rate limit, so one sandbox serves many."""
    if "@" not in configured:
        return username == configured
    local, _, domain = configured.partition("@")
    name, at, rest = username.partition("@")
    return bool(at) and rest == domain and (name == local or name.startswith(f"{local}+"))
