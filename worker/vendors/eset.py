"""ESET Connect requests: device task triggers, quarantine batch delete, recent patching
details. Pure builders: a command's parameters and an account in, a request out.

Each ESET service has its own host per region (``https://{region}.{service}.eset.systems``
by default, a setting so the sandbox can stand in). Quarantine management is not
offered in Japan, so a batch-delete for a ``jpn`` tenant is rejected before any call.
"""

from __future__ import annotations

from typing import Any

from schemas.commands import BatchDeleteParams, EsetUpdateTriggersParams
from schemas.events import ErrorCode
from worker.errors import CommandRejected, TransientFailure
from worker.replies import VendorRequest
from worker.settings import EsetAccount

QUARANTINE_REGIONS = frozenset({"eu", "de", "us", "ca"})
TOKEN_SERVICE = "business-account.iam"
PATCHING_PATH = "/v1/application-patching-processes/recent/details"


def eset_host(template: str, region: str, service: str) -> str:
    return template.format(region=region, service=service).rstrip("/")


def token_url(template: str, account: EsetAccount) -> str:
    return f"{eset_host(template, account.region, TOKEN_SERVICE)}/oauth/token"


def update_triggers(
    template: str, account: EsetAccount, params: EsetUpdateTriggersParams
) -> VendorRequest:
    triggers: list[dict[str, dict[str, str]]] = [
        {"manual": {"expireTime": t.manual.expire_time.isoformat()}}
        if t.manual.expire_time
        else {"manual": {}}
        for t in params.triggers
    ]
    path = f"/v1/device_tasks/{params.task_uuid}:updateTaskTriggers"
    return VendorRequest(
        vendor="eset",
        method="POST",
        url=eset_host(template, account.region, "automation") + path,
        route="/v1/device_tasks/{taskUuid}:updateTaskTriggers",
        json={"triggers": triggers},
    )


def batch_delete(template: str, account: EsetAccount, params: BatchDeleteParams) -> VendorRequest:
    if account.region not in QUARANTINE_REGIONS:
        raise CommandRejected(
            ErrorCode.REGION_NOT_SUPPORTED,
            f"ESET offers no quarantine management in region {account.region!r}; "
            f"it exists in {', '.join(sorted(QUARANTINE_REGIONS))}",
        )
    route = "/v1/quarantined-objects:batchDelete"
    return VendorRequest(
        vendor="eset",
        method="POST",
        url=eset_host(template, account.region, "quarantine-management") + route,
        route=route,
        # A list, sent as it is: a merged call fills its own in right before it goes out
        # (see coalescing.py).
        json={"objectUuids": [str(u) for u in params.object_uuids]},
    )


def patching(template: str, account: EsetAccount) -> VendorRequest:
    return VendorRequest(
        vendor="eset",
        method="GET",
        url=eset_host(template, account.region, "patch-management") + PATCHING_PATH,
        route=PATCHING_PATH,
        body_of=patching_details,
    )


def patching_details(body: Any) -> list[Any]:
    """The contract's event body for fetch-patching: the list itself (ESET's JSON leaves
    an empty list out). A 200 with anything else is not the list, and not a success:
    the read is asked again."""
    details = body.get("patchingDetails", []) if isinstance(body, dict) else None
    if not isinstance(details, list):
        raise TransientFailure(
            ErrorCode.VENDOR_UNAVAILABLE,
            "eset answered 200 with a body that holds no patchingDetails list",
            vendor_status=200,
        )
    return details
