"""The three ESET API calls: answers, validation and effects."""

from typing import Any

import httpx
import pytest

from worker.sandbox import SandboxServer

TRIGGERS = "/eset/{region}/automation/v1/device_tasks/{task}:updateTaskTriggers"
DELETE = "/eset/{region}/quarantine-management/v1/quarantined-objects:batchDelete"
PATCHING = "/eset/{region}/patch-management/v1/application-patching-processes/recent/details"
TASK = "3f2b8c1e-0000-4000-8000-00000000abcd"
MANUAL = {"triggers": [{"manual": {"expireTime": "2026-06-01T00:00:00Z"}}]}


def test_update_task_triggers_answers_empty_object(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    url = TRIGGERS.format(region="eu", task=TASK)

    response = client.post(url, json=MANUAL, headers=eset_headers)

    assert (response.status_code, response.json()) == (200, {})
    assert sandbox.state.stats()["effects"]["eset.update_task_triggers"] == {TASK: 1}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"triggers": []},
        {"triggers": [{}]},
        {"triggers": [{"manual": {"expireTime": "tomorrow"}}]},
        ["not", "an", "object"],
    ],
    ids=["missing", "empty", "not-manual", "bad-expire-time", "not-object"],
)
def test_update_task_triggers_rejects_invalid_triggers_with_rpc_status(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str], body: Any
) -> None:
    url = TRIGGERS.format(region="eu", task=TASK)

    response = client.post(url, json=body, headers=eset_headers)

    assert response.status_code == 400
    assert response.json().keys() == {"code", "message", "details"}
    assert "eset.update_task_triggers" not in sandbox.state.stats()["effects"]


def test_update_task_triggers_of_missing_task_is_404(
    client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    url = TRIGGERS.format(region="eu", task="00000000-dead-4000-8000-000000000000")

    assert client.post(url, json=MANUAL, headers=eset_headers).status_code == 404


def test_batch_delete_counts_effect_per_object(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    body = {"objectUuids": ["obj-1", "obj-2"]}

    response = client.post(DELETE.format(region="de"), json=body, headers=eset_headers)

    assert (response.status_code, response.json()) == (200, {})
    assert sandbox.state.stats()["effects"]["eset.batch_delete"] == {"obj-1": 1, "obj-2": 1}


@pytest.mark.parametrize("body", [{"objectUuids": []}, {}, {"objectUuids": [1]}])
def test_batch_delete_rejects_empty_or_invalid_list(
    client: httpx.Client, eset_headers: dict[str, str], body: dict[str, Any]
) -> None:
    response = client.post(DELETE.format(region="eu"), json=body, headers=eset_headers)

    assert response.status_code == 400


def test_batch_delete_in_japan_is_404(client: httpx.Client, eset_headers: dict[str, str]) -> None:
    """ESET offers no quarantine API in Japan."""
    body = {"objectUuids": ["obj-1"]}

    assert (
        client.post(DELETE.format(region="jpn"), json=body, headers=eset_headers).status_code == 404
    )


def test_fetch_patching_lists_two_details(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    response = client.get(PATCHING.format(region="jpn"), headers=eset_headers)

    details = response.json()["patchingDetails"]
    assert response.status_code == 200
    assert len(details) == 2
    assert {"applicationUuid", "displayName", "patchedVersion", "status", "timePeriod"} <= set(
        details[0]
    )
    assert sandbox.state.stats()["effects"] == {}


@pytest.mark.parametrize(
    "path",
    [
        "/eset/jp/patch-management/v1/application-patching-processes/recent/details",
        "/eset/eu/application-management/v1/application-patching-processes/recent/details",
        "/eset/jp/business-account.iam/oauth/token",
    ],
    ids=["region-jp", "unknown-service", "token-region-jp"],
)
def test_unknown_region_or_service_is_404(
    client: httpx.Client, eset_headers: dict[str, str], path: str
) -> None:
    method = "POST" if path.endswith("token") else "GET"

    response = client.request(method, path, headers=eset_headers)

    assert response.status_code == 404
    assert response.json()["code"] == 5  # google.rpc NOT_FOUND


def test_stats_count_calls_and_statuses_per_route(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    client.get(PATCHING.format(region="eu"), headers=eset_headers)
    client.get(PATCHING.format(region="eu"))

    stats = sandbox.state.stats()

    assert stats["calls"] == {"eset.token": 1, "eset.fetch_patching": 2}
    assert stats["statuses"]["eset.fetch_patching"] == {"200": 1, "401": 1}
