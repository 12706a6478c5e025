"""ESET Connect: device task triggers, quarantine batch delete, recent patching details.

Each ESET service has its own host per region (``https://{region}.{service}.eset.systems``
by default, a setting so the sandbox can stand in). Quarantine management is not
offered in Japan, so a batch-delete for a ``jpn`` tenant is rejected before any call.
"""

from __future__ import annotations

from schemas.commands import BatchDeleteParams, EsetUpdateTriggersParams
from schemas.events import ErrorCode
from worker.errors import CommandRejected
from worker.settings import EsetAccount
from worker.vendors.http import CallBudget, VendorHttp, VendorReply, VendorRequest

QUARANTINE_REGIONS = frozenset({"eu", "de", "us", "ca"})
TOKEN_SERVICE = "business-account.iam"


def eset_host(template: str, region: str, service: str) -> str:
    return template.format(region=region, service=service).rstrip("/")


def token_url(template: str, account: EsetAccount) -> str:
    return f"{eset_host(template, account.region, TOKEN_SERVICE)}/oauth/token"


class EsetClient:
    """The three ESET Connect calls, for one account."""

    def __init__(self, account: EsetAccount, host_template: str, http: VendorHttp) -> None:
        self._account = account
        self._template = host_template
        self._http = http

    def _url(self, service: str, path: str) -> str:
        return eset_host(self._template, self._account.region, service) + path

    async def update_task_triggers(
        self, params: EsetUpdateTriggersParams, budget: CallBudget
    ) -> VendorReply:
        triggers: list[dict[str, dict[str, str]]] = [
            {"manual": {"expireTime": t.manual.expire_time.isoformat()}}
            if t.manual.expire_time
            else {"manual": {}}
            for t in params.triggers
        ]
        request = VendorRequest(
            vendor="eset",
            method="POST",
            url=self._url("automation", f"/v1/device_tasks/{params.task_uuid}:updateTaskTriggers"),
            route="/v1/device_tasks/{taskUuid}:updateTaskTriggers",
            json={"triggers": triggers},
        )
        return await self._http.call(request, budget)

    async def batch_delete(self, params: BatchDeleteParams, budget: CallBudget) -> VendorReply:
        if self._account.region not in QUARANTINE_REGIONS:
            raise CommandRejected(
                ErrorCode.REGION_NOT_SUPPORTED,
                f"ESET offers no quarantine management in region {self._account.region!r}; "
                f"it exists in {', '.join(sorted(QUARANTINE_REGIONS))}",
            )
        request = VendorRequest(
            vendor="eset",
            method="POST",
            url=self._url("quarantine-management", "/v1/quarantined-objects:batchDelete"),
            route="/v1/quarantined-objects:batchDelete",
            json={"objectUuids": [str(u) for u in params.object_uuids]},
        )
        return await self._http.call(request, budget)

    async def fetch_patching(self, budget: CallBudget) -> VendorReply:
        path = "/v1/application-patching-processes/recent/details"
        request = VendorRequest(
            vendor="eset",
            method="GET",
            url=self._url("patch-management", path),
            route=path,
        )
        reply = await self._http.call(request, budget)
        # The contract's event body for this command is the list itself.
        details = reply.body.get("patchingDetails", []) if isinstance(reply.body, dict) else []
        return VendorReply(
            vendor=reply.vendor,
            status=reply.status,
            body=details,
            request_id=reply.request_id,
            response_id=reply.response_id,
        )
