"""``RELAY_TENANTS`` for replicas pointed at the sandbox: the accounts of its built-in
credentials (``worker/sandbox/worker_setup.py``), with their secrets written out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from worker.sandbox import SandboxConfig
from worker.sandbox.worker_setup import sandbox_tenant

CONFIG = SandboxConfig()
ALL_VENDORS = ("eset", "fylr", "spaaza")


def sandbox_tenants(base_url: str, accounts: Mapping[str, Iterable[str]]) -> dict[str, Any]:
    """Each tenant with its accounts (tenant -> vendors) at the sandbox. The tenant
    ``default`` acts as the sandbox's own ESET user, any other as an ESET user of its own
    (:func:`eset_sub_account`), so with a rate limit of its own."""
    tenant = sandbox_tenant(base_url, CONFIG).model_dump(mode="json")
    # model_dump masks SecretStr values; the sandbox accepts its own defaults.
    tenant["eset"]["password"] = CONFIG.eset_password
    tenant["fylr"]["client_secret"] = CONFIG.fylr_client_secret
    tenant["fylr"]["password"] = CONFIG.fylr_password
    tenant["spaaza"]["token_secret"] = CONFIG.spaaza_token_secret
    tenants = {}
    for name, vendors in accounts.items():
        user = CONFIG.eset_username if name == "default" else eset_sub_account(name)
        own = {**tenant, "eset": {**tenant["eset"], "username": user}}
        # The sandbox serves plain http: only a tenant marked as a sandbox may use it.
        tenants[name] = {"sandbox": True, **{vendor: own[vendor] for vendor in vendors}}
    return tenants


def eset_sub_account(name: str) -> str:
    """The sandbox's ESET user sub-addressed with ``name`` (``api+name@…``): an account of
    its own there, with its own rate limit, and the same password."""
    local, _, domain = CONFIG.eset_username.partition("@")
    return f"{local}+{name}@{domain}"
