"""A vendor scripted answer by answer (``httpx.MockTransport``) behind a handler built the
way the worker builds it (claim, vendor call, stored event): what the vendor saw and what
the events say are what tests observe."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from schemas.commands import Command, parse_command
from schemas.events import ResultEvent
from worker.handler import Handler
from worker.idempotency import SqliteStore
from worker.ops.outage import Outage
from worker.ops.telemetry import Telemetry
from worker.settings import EsetAccount, FylrAccount, Settings, SpaazaAccount, Tenant
from worker.settlement import Settlement
from worker.vendors import Vendors
from worker.vendors.ratelimit import RateLimits
from worker.vendors.retries import RetryPolicy

ESET_PASSWORD = "eset-password-7a1c"
FYLR_SECRET = "fylr-client-secret-93be"
FYLR_PASSWORD = "fylr-password-1f2e"
SPAAZA_SECRET = "spaaza-token-secret-5d0c"
TOKEN = "issued-access-token-42c9e1"
REFRESH = "issued-refresh-token-8b7f30"
GOOD_TOKEN = {"access_token": TOKEN, "refresh_token": REFRESH, "token_type": "Bearer",
              "expires_in": 3600}
PATCHING = {"patchingDetails": [{"displayName": "7-Zip"}]}

Answer = Callable[[httpx.Request], httpx.Response]


def status(code: int, **options: Any) -> Answer:
    return lambda request: httpx.Response(code, **options)


@dataclass
class ScriptedVendor:
    """Answers the API calls from ``answers`` (then 200 ``{}``) and the token requests
    from ``tokens`` (then a good token); keeps every request it saw."""

    answers: list[Answer] = field(default_factory=list)
    tokens: list[Answer] = field(default_factory=list)
    calls: list[httpx.Request] = field(default_factory=list)
    token_calls: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            self.token_calls.append(request)
            return self.tokens.pop(0)(request) if self.tokens else httpx.Response(
                200, json=GOOD_TOKEN)
        self.calls.append(request)
        if self.answers:
            return self.answers.pop(0)(request)
        if request.url.path.endswith("/details"):
            return httpx.Response(200, json=PATCHING)
        return httpx.Response(200, json={})


def command(kind: str, **fields: Any) -> Command:
    params: dict[str, Any] = {
        "batch-delete": {"object_uuids": [str(uuid.uuid4())]},
        "fetch-patching": {},
        "cancel-task": {"task_id": 31},
        "update-triggers": {"provider": "spaaza", "task_id": 7,
                            "trigger": {"once": "2030-01-01T00:00:00Z"}},
    }[kind]
    parsed: Command = parse_command({"type": kind, "params": params, **fields})
    return parsed.with_defaults(str(uuid.uuid4()))


def tenant() -> Tenant:
    """A tenant with an account of each vendor, at hosts only the scripted vendor answers."""
    return Tenant(
        eset=EsetAccount(username="api@example.com", password=SecretStr(ESET_PASSWORD)),
        fylr=FylrAccount(base_url="https://fylr.example.com", client_id="relay",
                         client_secret=SecretStr(FYLR_SECRET), username="relay",
                         password=SecretStr(FYLR_PASSWORD)),
        spaaza=SpaazaAccount(base_url="https://spaaza.example.com", token_id="relay-id",
                             token_secret=SecretStr(SPAAZA_SECRET)),
    )


def settings(http_timeout_s: float = 5.0, tenants: tuple[str, ...] = ("default",)) -> Settings:
    return Settings(
        tenants={name: tenant() for name in tenants},
        rate_limits={}, collect_interval_s=0, http_timeout_s=http_timeout_s,
    )


@dataclass
class Rig:
    """A handler over a SQLite store and ``vendor``, as the worker builds it."""

    vendor: ScriptedVendor
    tmp_path: Path
    http_timeout_s: float = 5.0
    tenants: tuple[str, ...] = ("default",)
    retry_delays_s: tuple[float, ...] = ()  # RabbitMQ's delay queues; none: the embedded's
    events: list[ResultEvent] = field(default_factory=list)

    async def run(self, *commands: Command) -> list[Settlement]:
        policy = RetryPolicy(max_attempts=3, initial_wait_s=0.001, max_wait_s=0.01)
        config = settings(self.http_timeout_s, self.tenants)
        vendors = Vendors(config, RateLimits(config.rate_limit, Outage({})), policy,
                          Telemetry.using(), httpx.MockTransport(self.vendor))
        store = SqliteStore(self.tmp_path / "claims.sqlite3", lease_s=30, retention_s=600)
        timings = replace(config.handler_timings, command_timeout_s=30,
                          retry_delays_s=self.retry_delays_s)
        handler = Handler(store, vendors, policy, timings, "this-replica", Outage({}))
        try:
            settlements = [await handler.handle(each) for each in commands]
        finally:
            await vendors.aclose()
            await store.close()
        self.events += [s.event for s in settlements if s.event is not None]
        return settlements


def run(
    vendor: ScriptedVendor, tmp_path: Path, *commands: Command,
    tenants: tuple[str, ...] = ("default",),
) -> list[ResultEvent]:
    rig = Rig(vendor, tmp_path, tenants=tenants)
    asyncio.run(rig.run(*commands))
    return rig.events
