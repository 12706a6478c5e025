"""ESET Connect: device task triggers, quarantine batch delete, recent patching details.

Each ESET service has its own host per region (``https://{region}.{service}.eset.systems``
by default, a setting so the sandbox can stand in). Quarantine management is not
offered in Japan, so a batch-delete for a ``jpn`` tenant is rejected before any call.
Batch deletes may be merged into one call per account (``coalescing.py``).
"""

from __future__ import annotations

from schemas.commands import MAX_OBJECTS_PER_BATCH, BatchDeleteParams, EsetUpdateTriggersParams
from schemas.events import ErrorCode
from worker.errors import CommandRejected
from worker.replies import VendorReply, VendorRequest
from worker.settings import EsetAccount
from worker.vendors.coalescing import BatchDeleteCoalescer
from worker.vendors.http import CallBudget, VendorHttp

QUARANTINE_REGIONS = frozenset({"eu", "de", "us", "ca"})
TOKEN_SERVICE = "business-account.iam"


def eset_host(template: str, region: str, service: str) -> str:
    return template.format(region=region, service=service).rstrip("/")


def token_url(template: str, account: EsetAccount) -> str:
    return f"{eset_host(template, account.region, TOKEN_SERVICE)}/oauth/token"


class EsetClient:
    """The three ESET Connect calls, for one account."""

    def __init__(
        self,
        account: EsetAccount,
        host_template: str,
        http: VendorHttp,
        batch_delete_window_s: float = 0.0,
        batch_delete_max_objects: int = MAX_OBJECTS_PER_BATCH,
    ) -> None:
        self._account = account
        self._template = host_template
        self._http = http
        self._deletes = BatchDeleteCoalescer(
            http.call, self._batch_delete_request, batch_delete_window_s,
            batch_delete_max_objects,
        )

    def _url(self, service: str, path: str) -> str:
        return eset_host(self._template, self._account.region, service) + path

    async def update_task_triggers(
        self, params: EsetUpdateTriggersParams, budget: CallBudget
    ) -> VendorReply:
        return await self._http.call(self._update_triggers_request(params), budget)

    async def collect(
        self, params: EsetUpdateTriggersParams | BatchDeleteParams, response_id: str,
        budget: CallBudget,
    ) -> VendorReply:
        """The answer to a mutation that ESET accepted (202) for a worker that died: the
        identical request, collected with its ``response-id``."""
        if isinstance(params, BatchDeleteParams):
            request = self._batch_delete_request([str(u) for u in params.object_uuids])
        else:
            request = self._update_triggers_request(params)
        return await self._http.collect(request, response_id, budget)

    def _update_triggers_request(self, params: EsetUpdateTriggersParams) -> VendorRequest:
        triggers: list[dict[str, dict[str, str]]] = [
            {"manual": {"expireTime": t.manual.expire_time.isoformat()}}
            if t.manual.expire_time
            else {"manual": {}}
            for t in params.triggers
        ]
        return VendorRequest(
            vendor="eset",
            method="POST",
            url=self._url("automation", f"/v1/device_tasks/{params.task_uuid}:updateTaskTriggers"),
            route="/v1/device_tasks/{taskUuid}:updateTaskTriggers",
            json={"triggers": triggers},
        )

    async def batch_delete(self, params: BatchDeleteParams, budget: CallBudget) -> VendorReply:
        if self._account.region not in QUARANTINE_REGIONS:
            raise CommandRejected(
                ErrorCode.REGION_NOT_SUPPORTED,
                f"ESET offers no quarantine management in region {self._account.region!r}; "
                f"it exists in {', '.join(sorted(QUARANTINE_REGIONS))}",
            )
        return await self._deletes.delete([str(u) for u in params.object_uuids], budget)

    def _batch_delete_request(self, object_uuids: list[str]) -> VendorRequest:
        # The list goes into the body as it is: a merged call fills it in right before
        # it is sent (see coalescing.py).
        return VendorRequest(
            vendor="eset",
            method="POST",
            url=self._url("quarantine-management", "/v1/quarantined-objects:batchDelete"),
            route="/v1/quarantined-objects:batchDelete",
            json={"objectUuids": object_uuids},
        )

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
