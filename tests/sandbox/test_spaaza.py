"""Spaaza: `PUT /tasks/{id}`."""

import httpx
import pytest

from worker.sandbox import SandboxServer

TASK = "/spaaza/tasks/12345"
UPDATE = {
    "desc": "Updated wallet ledger export",
    "target": {"action": "export", "export_index": "wallet-ledger", "export_format": "json"},
    "trigger": {"once": "2026-05-27T10:00:00Z"},
}


def test_update_answers_whole_task(client: httpx.Client, spaaza_headers: dict[str, str]) -> None:
    response = client.put(TASK, json=UPDATE, headers=spaaza_headers)

    task = response.json()
    assert response.status_code == 200
    assert task["id"] == 12345
    assert task["state"]["code"] == "READY"
    assert {key: task[key] for key in UPDATE} == UPDATE
    assert task.keys() >= {"chain", "logs", "debug", "version", "result"}


def test_each_update_increments_version_and_counts_effect(
    sandbox: SandboxServer, client: httpx.Client, spaaza_headers: dict[str, str]
) -> None:
    first = client.put(TASK, json={"debug": "a"}, headers=spaaza_headers).json()
    second = client.put(TASK, json={"desc": "b"}, headers=spaaza_headers).json()

    assert second["version"] == first["version"] + 1
    assert (second["debug"], second["desc"]) == ("a", "b")
    assert sandbox.state.stats()["effects"]["spaaza.update_task"] == {"12345": 2}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sandbox-id:wrong", "Bearer sandbox-secret", "sandbox-id:sandbox-secret"],
    ids=str,
)
def test_update_without_token_pair_is_401(client: httpx.Client, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    assert client.put(TASK, json=UPDATE, headers=headers).status_code == 401


def test_missing_task_is_404(client: httpx.Client, spaaza_headers: dict[str, str]) -> None:
    response = client.put("/spaaza/tasks/900001", json=UPDATE, headers=spaaza_headers)

    assert response.status_code == 404


@pytest.mark.parametrize(
    "trigger",
    [{}, {"once": "next tuesday"}, {"once": "2026-05-27T10:00:00Z", "repeat": "hourly"}, "daily"],
    ids=str,
)
def test_invalid_trigger_is_400(
    sandbox: SandboxServer, client: httpx.Client, spaaza_headers: dict[str, str], trigger: object
) -> None:
    response = client.put(TASK, json={"trigger": trigger}, headers=spaaza_headers)

    assert response.status_code == 400
    assert sandbox.state.stats()["effects"] == {}


@pytest.mark.parametrize("repeat", ["daily", "weekly", "monthly"])
def test_repeating_trigger_is_accepted(
    client: httpx.Client, spaaza_headers: dict[str, str], repeat: str
) -> None:
    trigger = {"once": "2026-05-27T10:00:00Z", "repeat": repeat}

    response = client.put(TASK, json={"trigger": trigger}, headers=spaaza_headers)

    assert response.json()["trigger"] == trigger
