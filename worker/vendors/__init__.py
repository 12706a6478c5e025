"""Vendor clients, one per configured account, and the dispatch of a command to its call.

A command names a tenant; the tenant's configuration names the accounts and hosts. Each
account gets its own HTTP client and connection pool (``transport.py``), its own token
cache and its own rate-limit slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import httpx

from schemas.commands import (
    BatchDeleteCommand,
    CancelTaskCommand,
    Command,
    EsetUpdateTriggersParams,
    FetchPatchingCommand,
    SpaazaUpdateTriggersParams,
    UpdateTriggersCommand,
)
from schemas.events import ErrorCode
from worker.errors import CommandRejected
from worker.ops.telemetry import Telemetry
from worker.replies import VendorReply
from worker.settings import Settings, Tenant
from worker.vendors import eset, fylr
from worker.vendors.auth import OAuthToken, StaticBearer
from worker.vendors.eset import EsetClient
from worker.vendors.fylr import FylrClient
from worker.vendors.http import CallBudget, VendorHttp
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy
from worker.vendors.spaaza import SpaazaClient
from worker.vendors.transport import VendorClient

Client = TypeVar("Client", EsetClient, FylrClient, SpaazaClient)


class Vendors:
    """Runs a validated command against its vendor; clients are made on first use."""

    def __init__(
        self,
        settings: Settings,
        rate_limits: RateLimits,
        policy: RetryPolicy,
        telemetry: Telemetry,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._rate_limits = rate_limits
        self._policy = policy
        self._telemetry = telemetry
        self._transport = transport  # tests may swap the network for a fake
        self._clients: dict[tuple[str, str], EsetClient | FylrClient | SpaazaClient] = {}
        self._http_clients: list[VendorClient] = []

    async def execute(self, command: Command, budget: CallBudget) -> VendorReply:
        """The vendor's final answer to the command; raises a RelayError otherwise."""
        try:
            return await self._dispatch(command, budget)
        finally:
            self._telemetry.instruments.vendor_duration.record(
                budget.vendor_time_s, {"relay.command.type": command.type}
            )

    async def _dispatch(self, command: Command, budget: CallBudget) -> VendorReply:
        match command:
            case UpdateTriggersCommand(params=EsetUpdateTriggersParams() as params):
                return await self.eset(command.tenant).update_task_triggers(params, budget)
            case UpdateTriggersCommand(params=SpaazaUpdateTriggersParams() as params):
                return await self.spaaza(command.tenant).update_task(params, budget)
            case BatchDeleteCommand(params=params):
                return await self.eset(command.tenant).batch_delete(params, budget)
            case CancelTaskCommand(params=params):
                return await self.fylr(command.tenant).cancel_task(params, budget)
            case FetchPatchingCommand():
                return await self.eset(command.tenant).fetch_patching(budget)
        raise AssertionError(f"no vendor call for {command.type}")  # the contract is closed

    async def collect(self, command: Command, response_id: str, budget: CallBudget) -> VendorReply:
        """Collect the 202 a worker that died got for this command (ESET mutations only)."""
        match command:
            case (
                UpdateTriggersCommand(params=EsetUpdateTriggersParams() as params)
                | BatchDeleteCommand(params=params)
            ):
                return await self.eset(command.tenant).collect(params, response_id, budget)
        raise AssertionError(f"{command.type} is never collected")  # only ESET answers 202

    def tenant(self, name: str) -> Tenant:
        tenant = self._settings.tenants.get(name)
        if tenant is None:
            known = ", ".join(sorted(self._settings.tenants)) or "none"
            raise CommandRejected(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {name!r} is not configured here (configured: {known})",
            )
        return tenant

    def eset(self, tenant_name: str) -> EsetClient:
        return self._client(tenant_name, "eset", self._make_eset)

    def fylr(self, tenant_name: str) -> FylrClient:
        return self._client(tenant_name, "fylr", self._make_fylr)

    def spaaza(self, tenant_name: str) -> SpaazaClient:
        return self._client(tenant_name, "spaaza", self._make_spaaza)

    async def aclose(self) -> None:
        for client in self._http_clients:
            await client.aclose()

    def _client(
        self, tenant_name: str, vendor: str, make: Callable[[Tenant], Client]
    ) -> Client:
        key = (tenant_name, vendor)
        if key not in self._clients:
            tenant = self.tenant(tenant_name)
            if getattr(tenant, vendor) is None:
                raise CommandRejected(
                    ErrorCode.VENDOR_NOT_CONFIGURED,
                    f"tenant {tenant_name!r} has no {vendor} account configured",
                )
            self._clients[key] = make(tenant)
        client = self._clients[key]
        assert isinstance(client, (EsetClient, FylrClient, SpaazaClient))
        return client  # type: ignore[return-value]

    def _make_eset(self, tenant: Tenant) -> EsetClient:
        account = tenant.eset
        assert account is not None
        client = self._http_client()
        template = self._settings.eset_host_template
        auth = OAuthToken(
            client,
            eset.token_url(template, account),
            {"grant_type": "password", "username": account.username, "password": account.password},
            vendor="eset",
            refresh_margin_s=self._settings.token_refresh_margin_s,
        )
        http = self._vendor_http(client, auth, "eset", account.username, follows_202=True)
        return EsetClient(
            account, template, http,
            batch_delete_window_s=self._settings.batch_delete_window_ms / 1000,
            batch_delete_max_objects=self._settings.batch_delete_max_objects,
        )

    def _make_fylr(self, tenant: Tenant) -> FylrClient:
        account = tenant.fylr
        assert account is not None
        client = self._http_client()
        auth = OAuthToken(
            client,
            fylr.token_url(account),
            fylr.grant(account),
            vendor="fylr",
            refresh_margin_s=self._settings.token_refresh_margin_s,
            client_fields=fylr.client(account),
        )
        account_key = f"{account.base_url}|{account.client_id}|{account.username or ''}"
        return FylrClient(account, self._vendor_http(client, auth, "fylr", account_key))

    def _make_spaaza(self, tenant: Tenant) -> SpaazaClient:
        account = tenant.spaaza
        assert account is not None
        client = self._http_client()
        secret = f"{account.token_id}:{account.token_secret.get_secret_value()}"
        auth = StaticBearer(type(account.token_secret)(secret))
        account_key = f"{account.base_url}|{account.token_id}"
        return SpaazaClient(account, self._vendor_http(client, auth, "spaaza", account_key))

    def _vendor_http(
        self,
        client: VendorClient,
        auth: OAuthToken | StaticBearer,
        vendor: str,
        account_key: str,
        follows_202: bool = False,
    ) -> VendorHttp:
        return VendorHttp(
            client=client,
            auth=auth,
            rate_slot=self._rate_limits.slot(vendor, account_key),
            policy=self._policy,
            telemetry=self._telemetry,
            collect_interval_s=self._settings.collect_interval_s,
            follows_202=follows_202,
        )

    def _http_client(self) -> VendorClient:
        settings = self._settings
        client = VendorClient(
            settings.concurrency, settings.http_timeout_s, self._transport,
            settings.max_response_bytes,
        )
        self._http_clients.append(client)
        return client
