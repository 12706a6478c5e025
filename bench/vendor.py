"""The one vendor request every pipeline in the benchmark makes: ESET quarantine batch
delete of one object, against the sandbox, with the sandbox's built-in credentials."""

from __future__ import annotations

import httpx

from worker.sandbox import SandboxConfig

CONFIG = SandboxConfig()
REGION = "eu"


def batch_delete_url(base_url: str) -> str:
    return f"{base_url}/eset/{REGION}/quarantine-management/v1/quarantined-objects:batchDelete"


def eset_authorization(client: httpx.Client, base_url: str) -> dict[str, str]:
    """Headers with a fresh bearer token (password grant; valid for an hour)."""
    response = client.post(
        f"{base_url}/eset/{REGION}/business-account.iam/oauth/token",
        data={"grant_type": "password", "username": CONFIG.eset_username,
              "password": CONFIG.eset_password},
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}

