"""The vendor side of a command: its request, built by the vendor's module (``eset.py``,
``fylr.py``, ``spaaza.py``: pure builders), sent by its account's :class:`Sender`.

A command names a tenant; the tenant's configuration names the accounts and hosts. Each
account gets its own sender: HTTP client and connection pool (``transport.py``), token
cache and rate-limit slot. An ESET account's batch deletes go through a coalescer that
wraps its sender (``coalescing.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

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
from schemas.events import ErrorCode, VendorName
from worker.errors import CommandRejected, PermanentFailure
from worker.ops.telemetry import Telemetry
from worker.redaction import Redactor
from worker.replies import VendorReply, VendorRequest
from worker.settings import EsetAccount, FylrAccount, Settings, SpaazaAccount, Tenant
from worker.vendors import eset, fylr, spaaza
from worker.vendors.auth import OAuthToken, StaticBearer
from worker.vendors.coalescing import BatchDeleteCoalescer
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy
from worker.vendors.sender import GO_AHEAD, CallBudget, Marks, Send, Sender
from worker.vendors.transport import VendorClient


@dataclass(frozen=True)
class Confirmation:
    """A read that can show a refused mutation was this command's own, done by an earlier
    attempt whose answer was lost (fylr refuses a second cancel with 400)."""

    request: VendorRequest
    shows_done: Callable[[Any], bool]


@dataclass(frozen=True)
class VendorCall:
    """What one command sends, through which account's sender, and how its answer is read."""

    command_type: str
    request: VendorRequest
    sender: Send
    confirmation: Confirmation | None = None


class Vendors:
    """The vendor side of a command: :meth:`call_for` builds its request (and checks the
    tenant may make it), :meth:`run` sends it. Senders are made on first use."""

    def __init__(
        self,
        settings: Settings,
        rate_limits: RateLimits,
        policy: RetryPolicy,
        telemetry: Telemetry,
        transport: httpx.AsyncBaseTransport | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        """``redactor``: the process's; it learns every token a vendor issues (default:
        one knowing the configuration's secrets)."""
        self._settings = settings
        self.redactor = redactor or Redactor(settings.secret_values())
        self._rate_limits = rate_limits
        self._policy = policy
        self._telemetry = telemetry
        self._transport = transport  # tests may swap the network for a fake
        self._senders: dict[tuple[str, VendorName], Sender] = {}
        self._coalescers: dict[str, BatchDeleteCoalescer] = {}
        self._http_clients: list[VendorClient] = []

    def call_for(self, command: Command) -> VendorCall:
        """The command's request; raises CommandRejected when its tenant can not make it."""
        template = self._settings.eset_host_template
        match command:
            case UpdateTriggersCommand(params=EsetUpdateTriggersParams() as params):
                account = self._account(command.tenant, "eset")
                return self._call(command, eset.update_triggers(template, account, params))
            case UpdateTriggersCommand(params=SpaazaUpdateTriggersParams() as params):
                account = self._account(command.tenant, "spaaza")
                return self._call(command, spaaza.update_task(account, params))
            case BatchDeleteCommand(params=params):
                account = self._account(command.tenant, "eset")
                request = eset.batch_delete(template, account, params)
                return VendorCall(command.type, request, self._deletes(command.tenant))
            case CancelTaskCommand(params=params):
                account = self._account(command.tenant, "fylr")
                confirmation = Confirmation(
                    fylr.task(account, params.task_id), fylr.cancel_requested
                )
                return self._call(command, fylr.cancel(account, params), confirmation)
            case FetchPatchingCommand():
                account = self._account(command.tenant, "eset")
                request = eset.patching(template, account)
                return self._call(command, request)
        raise AssertionError(f"no vendor call for {command.type}")  # the contract is closed

    async def run(
        self, call: VendorCall, budget: CallBudget, marks: Marks = GO_AHEAD
    ) -> VendorReply:
        """The vendor's final answer; raises a RelayError otherwise (Withheld when
        ``marks`` said no)."""
        try:
            reply = await call.sender.send(call.request, budget, marks)
        except PermanentFailure as refusal:
            return await self._confirmed(call, budget, refusal)
        finally:
            self._record(call, budget)
        return reply

    async def collect(self, call: VendorCall, response_id: str, budget: CallBudget) -> VendorReply:
        """Collect the 202 a worker that died got for this command (ESET mutations only)."""
        try:
            return await call.sender.collect(call.request, response_id, budget)
        finally:
            self._record(call, budget)

    def tenant(self, name: str) -> Tenant:
        tenant = self._settings.tenants.get(name)
        if tenant is None:
            # The others are not named: on a shared broker, one customer's publisher
            # must not learn the other customers' tenant names.
            raise CommandRejected(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {name!r} is not configured here: check the tenant's name, or ask "
                "the operator to configure it (command-relay check lists the tenants)",
            )
        return tenant

    async def aclose(self) -> None:
        for client in self._http_clients:
            await client.aclose()

    async def _confirmed(
        self, call: VendorCall, budget: CallBudget, refusal: PermanentFailure
    ) -> VendorReply:
        """A 400 after an attempt whose answer was lost may be the answer to this
        command's own earlier call: the confirmation's read tells, and is the reply."""
        check = call.confirmation
        if check is None or refusal.vendor_status != 400 or not budget.may_have_acted_before:
            raise refusal
        try:
            reply = await call.sender.send(check.request, budget)
        except PermanentFailure:
            raise refusal from None  # the read shows nothing: the refusal stands
        if not check.shows_done(reply.body):
            raise refusal
        return reply

    def _record(self, call: VendorCall, budget: CallBudget) -> None:
        self._telemetry.instruments.vendor_duration.record(
            budget.vendor_time_s, {"relay.command.type": call.command_type}
        )

    def _call(
        self,
        command: Command,
        request: VendorRequest,
        confirmation: Confirmation | None = None,
    ) -> VendorCall:
        sender = self._sender(command.tenant, request.vendor)
        return VendorCall(command.type, request, sender, confirmation)

    def _account(self, tenant_name: str, vendor: VendorName) -> Any:
        account = getattr(self.tenant(tenant_name), vendor)
        if account is None:
            raise CommandRejected(
                ErrorCode.VENDOR_NOT_CONFIGURED,
                f"tenant {tenant_name!r} has no {vendor} account configured",
            )
        return account

    def _sender(self, tenant_name: str, vendor: VendorName) -> Sender:
        key = (tenant_name, vendor)
        if key not in self._senders:
            account = self._account(tenant_name, vendor)
            make: Callable[[Any], Sender] = getattr(self, f"_make_{vendor}")
            self._senders[key] = make(account)
        return self._senders[key]

    def _deletes(self, tenant_name: str) -> Send:
        """The ESET account's batch deletes, merged when they arrive together (when a
        window is set: without one, each goes straight to the account's sender)."""
        window_s = self._settings.batch_delete_window_ms / 1000
        if window_s <= 0:
            return self._sender(tenant_name, "eset")
        if tenant_name not in self._coalescers:
            self._coalescers[tenant_name] = BatchDeleteCoalescer(
                self._sender(tenant_name, "eset"),
                window_s,
                self._settings.batch_delete_max_objects,
            )
        return self._coalescers[tenant_name]

    def _make_eset(self, account: EsetAccount) -> Sender:
        client = self._http_client()
        auth = OAuthToken(
            client,
            eset.token_url(self._settings.eset_host_template, account),
            {"grant_type": "password", "username": account.username, "password": account.password},
            vendor="eset",
            refresh_margin_s=self._settings.token_refresh_margin_s,
            on_issued=partial(self.redactor.remember, f"eset|{account.username}"),
        )
        return self._new_sender(client, auth, "eset", account.username, follows_202=True)

    def _make_fylr(self, account: FylrAccount) -> Sender:
        client = self._http_client()
        account_key = f"{account.base_url}|{account.client_id}|{account.username or ''}"
        auth = OAuthToken(
            client,
            fylr.token_url(account),
            fylr.grant(account),
            vendor="fylr",
            refresh_margin_s=self._settings.token_refresh_margin_s,
            client_fields=fylr.client(account),
            on_issued=partial(self.redactor.remember, f"fylr|{account_key}"),
        )
        return self._new_sender(client, auth, "fylr", account_key)

    def _make_spaaza(self, account: SpaazaAccount) -> Sender:
        client = self._http_client()
        secret = f"{account.token_id}:{account.token_secret.get_secret_value()}"
        auth = StaticBearer(type(account.token_secret)(secret))
        account_key = f"{account.base_url}|{account.token_id}"
        return self._new_sender(client, auth, "spaaza", account_key)

    def _new_sender(
        self,
        client: VendorClient,
        auth: OAuthToken | StaticBearer,
        vendor: str,
        account_key: str,
        follows_202: bool = False,
    ) -> Sender:
        return Sender(
            client=client,
            auth=auth,
            rate_slot=self._rate_limits.slot(vendor, account_key),
            policy=self._policy,
            telemetry=self._telemetry,
            collect_interval_s=self._settings.collect_interval_s,
            redactor=self.redactor,
            follows_202=follows_202,
        )

    def _http_client(self) -> VendorClient:
        settings = self._settings
        client = VendorClient(
            settings.concurrency, settings.http_timeout_s, self._transport,
            settings.max_response_bytes, settings.tls,
        )
        self._http_clients.append(client)
        return client
