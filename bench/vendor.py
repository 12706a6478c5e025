"""The one vendor request every pipeline in the benchmark makes: ESET quarantine batch
delete of one object, against the sandbox, with the sandbox's built-in credentials."""

from __future__ import annotations

from typing import Any

import httpx

from worker.sandbox import SandboxConfig

CONFIG = SandboxConfig()
REGION = "eu"


def eset_tenants() -> dict[str, Any]:
    """``RELAY_TENANTS`` for a worker pointed at the sandbox (ESET account only)."""
    account = {"region": REGION, "username": CONFIG.eset_username,
               "password": CONFIG.eset_password}
    return {"default": {"eset": account}}


def host_template(base_url: str) -> str:
    return f"{base_url}/eset/{{region}}/{{service}}"


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


# --- several tenants, each with accounts of its own (the isolation scenario) ---


def eset_username(tenant: str) -> str:
    """The sandbox treats a sub-address (``api+flood@…``) as an account of its own, with
    its own rate limit: one ESET account per tenant."""
    local, _, domain = CONFIG.eset_username.partition("@")
    return f"{local}+{tenant}@{domain}"


def fylr_account(base_url: str) -> dict[str, Any]:
    """The sandbox's fylr account (one only; fylr has no rate limit, so tenants share it)."""
    return {"base_url": f"{base_url}/fylr", "client_id": CONFIG.fylr_client_id,
            "client_secret": CONFIG.fylr_client_secret, "username": CONFIG.fylr_username,
            "password": CONFIG.fylr_password}


def tenants(base_url: str, *, eset: list[str], fylr: list[str]) -> dict[str, Any]:
    """``RELAY_TENANTS``: the ``eset`` tenants each with an ESET account of their own, the
    ``fylr`` tenants with the fylr account (a tenant in both gets both)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in [*eset, *fylr]}
    for name in eset:
        out[name]["eset"] = {"region": REGION, "username": eset_username(name),
                             "password": CONFIG.eset_password}
    for name in fylr:
        out[name]["fylr"] = fylr_account(base_url)
    return out
