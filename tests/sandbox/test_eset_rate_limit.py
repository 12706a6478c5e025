"""ESET's 10 calls/s per account."""

import httpx

from worker.sandbox import Faults, SandboxServer, ScriptedFault

PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"
TOKEN = "/eset/eu/business-account.iam/oauth/token"


def test_eleventh_call_within_a_second_is_429_without_retry_after(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    statuses = [client.get(PATCHING, headers=eset_headers).status_code for _ in range(11)]
    last = client.get(PATCHING, headers=eset_headers)

    assert statuses == [200] * 10 + [429]
    assert last.status_code == 429
    assert "retry-after" not in last.headers
    assert sandbox.state.stats()["throttled"] == 2


def test_limit_is_per_account_not_per_token(
    eset_password_form: dict[str, str], client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    for _ in range(10):
        client.get(PATCHING, headers=eset_headers)
    form = eset_password_form
    other_token = client.post(TOKEN, data=form).json()["access_token"]

    response = client.get(PATCHING, headers={"Authorization": f"Bearer {other_token}"})

    assert response.status_code == 429


def test_token_calls_do_not_count(
    eset_password_form: dict[str, str], client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    form = eset_password_form
    for _ in range(12):
        client.post(TOKEN, data=form)

    statuses = {client.get(PATCHING, headers=eset_headers).status_code for _ in range(10)}

    assert statuses == {200}


def test_collects_count_as_calls(
    sandbox: SandboxServer, client: httpx.Client, eset_headers: dict[str, str]
) -> None:
    sandbox.state.faults = Faults(script=[ScriptedFault(202)])
    response_id = client.get(PATCHING, headers=eset_headers).headers["response-id"]
    collect_headers = {**eset_headers, "response-id": response_id}
    for _ in range(9):
        client.get(PATCHING, headers=collect_headers)

    assert client.get(PATCHING, headers=collect_headers).status_code == 429
