"""fylr: OAuth2 token, task cancel and task read."""

import time

import httpx
import pytest

from worker.sandbox import SandboxConfig, SandboxServer

TOKEN = "/fylr/api/oauth2/token"
CONFIG = SandboxConfig()


def test_client_credentials_grant_answers_bearer_token(client: httpx.Client) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": CONFIG.fylr_client_id,
        "client_secret": CONFIG.fylr_client_secret,
    }

    body = client.post(TOKEN, data=form).json()

    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == CONFIG.token_ttl_s
    assert "refresh_token" not in body


def test_password_grant_with_offline_scope_answers_refresh_token(client: httpx.Client) -> None:
    form = {
        "grant_type": "password",
        "username": CONFIG.fylr_username,
        "password": CONFIG.fylr_password,
        "scope": "offline",
    }
    auth = (CONFIG.fylr_client_id, CONFIG.fylr_client_secret)  # HTTP Basic client auth

    response = client.post(TOKEN, data=form, auth=auth)

    assert response.status_code == 200
    assert response.json()["refresh_token"]


def test_wrong_client_secret_is_401_invalid_client(client: httpx.Client) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": CONFIG.fylr_client_id,
        "client_secret": "wrong",
    }

    response = client.post(TOKEN, data=form)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_call_without_token_is_401_user_required(client: httpx.Client) -> None:
    response = client.post("/fylr/api/v1/task/17/cancel")

    assert response.status_code == 401
    assert response.json()["code"] == "UserRequired"


def test_cancel_of_running_task_is_acknowledged_and_counted(
    sandbox: SandboxServer, client: httpx.Client, fylr_headers: dict[str, str]
) -> None:
    before = client.get("/fylr/api/v1/task/17", headers=fylr_headers).json()["task"]

    response = client.post("/fylr/api/v1/task/17/cancel", headers=fylr_headers)

    assert before["status"] == "running"
    assert (response.status_code, response.json()) == (200, {"status": {"acknowledged": "ok"}})
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"17": 1}


def test_second_cancel_is_400_and_not_counted(
    sandbox: SandboxServer, client: httpx.Client, fylr_headers: dict[str, str]
) -> None:
    client.post("/fylr/api/v1/task/17/cancel", headers=fylr_headers)

    response = client.post("/fylr/api/v1/task/17/cancel", headers=fylr_headers)

    assert response.status_code == 400
    assert response.json().keys() >= {"code", "error", "parameters", "realm", "statuscode"}
    assert sandbox.state.stats()["effects"]["fylr.cancel"] == {"17": 1}


def test_canceled_task_reaches_status_canceled(
    sandbox: SandboxServer, client: httpx.Client, fylr_headers: dict[str, str]
) -> None:
    client.post("/fylr/api/v1/task/17/cancel", headers=fylr_headers)
    requested = client.get("/fylr/api/v1/task/17", headers=fylr_headers).json()["task"]
    time.sleep(sandbox.config.fylr_cancel_settle_s)

    settled = client.get("/fylr/api/v1/task/17", headers=fylr_headers).json()["task"]
    cancel_again = client.post("/fylr/api/v1/task/17/cancel", headers=fylr_headers)

    assert (requested["status"], settled["status"]) == ("running", "canceled")
    assert settled["run_canceled_at"] is not None
    assert settled["_version"] > requested["_version"]
    assert cancel_again.status_code == 400


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/fylr/api/v1/task/900000/cancel"), ("GET", "/fylr/api/v1/task/912345")],
)
def test_missing_task_is_404_object_not_found(
    client: httpx.Client, fylr_headers: dict[str, str], method: str, path: str
) -> None:
    response = client.request(method, path, headers=fylr_headers)

    assert response.status_code == 404
    assert response.json()["code"] == "ObjectNotFound"
