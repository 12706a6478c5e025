"""ESET's token endpoint, bearer checks and request-id headers."""

from collections.abc import Callable

import httpx
import pytest

from worker.sandbox import Faults, SandboxConfig, SandboxServer, ScriptedFault

TOKEN = "/eset/eu/business-account.iam/oauth/token"
PATCHING = "/eset/eu/patch-management/v1/application-patching-processes/recent/details"

Login = Callable[[httpx.Client], httpx.Response]


def test_password_grant_answers_bearer_tokens(client: httpx.Client, eset_login: Login) -> None:
    response = eset_login(client)

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["access_token"] and body["refresh_token"]


def test_json_token_body_is_415(client: httpx.Client) -> None:
    config = SandboxConfig()
    form = {"grant_type": "password", "username": config.eset_username, "password": "x"}

    assert client.post(TOKEN, json=form).status_code == 415


def test_wrong_password_is_400_invalid_grant(client: httpx.Client) -> None:
    form = {"grant_type": "password", "username": SandboxConfig().eset_username, "password": "no"}

    response = client.post(TOKEN, data=form)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_refresh_rotates_access_and_refresh_tokens(client: httpx.Client, eset_login: Login) -> None:
    first = eset_login(client).json()

    refreshed = client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    second = refreshed.json()
    reused = client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )

    assert refreshed.status_code == 200
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert reused.status_code == 400
    headers = {"Authorization": f"Bearer {second['access_token']}"}
    assert client.get(PATCHING, headers=headers).status_code == 200


@pytest.mark.parametrize(
    "authorization", [None, "Bearer not-a-token", "Basic YXBpOnNhbmRib3g="], ids=str
)
def test_api_call_without_valid_token_is_401(
    client: httpx.Client, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}

    response = client.get(PATCHING, headers=headers)

    assert response.status_code == 401
    assert response.json()["code"] == 16  # google.rpc UNAUTHENTICATED


def test_revoked_token_is_401_until_refreshed(client: httpx.Client, eset_login: Login) -> None:
    tokens = eset_login(client).json()
    client.post("/_sandbox/revoke-tokens")

    revoked = client.get(PATCHING, headers={"Authorization": f"Bearer {tokens['access_token']}"})
    fresh = client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    ).json()
    retried = client.get(PATCHING, headers={"Authorization": f"Bearer {fresh['access_token']}"})

    assert (revoked.status_code, retried.status_code) == (401, 200)


def test_token_from_another_vendor_is_401(
    client: httpx.Client, fylr_headers: dict[str, str]
) -> None:
    assert client.get(PATCHING, headers=fylr_headers).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "fault"),
    [
        ("POST", TOKEN, None),
        ("GET", PATCHING, None),
        ("GET", PATCHING, 202),
        ("GET", PATCHING, 503),
        ("GET", "/eset/eu/patch-management/v1/nothing-here", None),
        ("GET", "/eset/xx/patch-management/v1/application-patching-processes/recent/details", None),
    ],
)
def test_every_eset_response_carries_a_request_id(
    sandbox: SandboxServer,
    client: httpx.Client,
    eset_headers: dict[str, str],
    method: str,
    path: str,
    fault: int | None,
) -> None:
    if fault is not None:
        sandbox.state.faults = Faults(script=[ScriptedFault(fault)])

    response = client.request(method, path, headers=eset_headers)

    assert len(response.headers["request-id"]) == 36
