"""Publishers bound to tenants, without a server: which tenants are bound (and when the
check is on at all), the handler's one check before the claim, which publisher a
message names (the header the worker carries over is believed from the worker's own
user only), and what ``command-relay check`` says. Over RabbitMQ with real users:
``tests/integration/test_publishers_rabbitmq.py``."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from schemas.commands import Command, parse_command
from worker.broker.origin import PUBLISHER_HEADER, carry_publisher, publisher_of
from worker.handler import Handler
from worker.idempotency import SqliteStore, claim_key
from worker.ops.outage import Outage
from worker.settings import EsetAccount, Settings, Tenant
from worker.settlement import Action, DeliveryInfo, Settlement
from worker.vendors.retries import RetryPolicy

from .command_line import cli_env, run_cli
from .test_handler_outcomes import Clock, Vendor
from .test_vendor_calls import vendors_for

RABBITMQ = "amqp://relay-worker:pw@rabbit.invalid:5672//"
WORKER = "relay-worker"


def account(name: str) -> EsetAccount:
    return EsetAccount(username=f"{name}@example.com", password=SecretStr("pw"))


def settings(broker_url: str = RABBITMQ, **overrides: Any) -> Settings:
    """Tenant ``acme`` bound to publisher ``playbooks-acme``; ``globex`` names none."""
    return Settings(
        broker_url=broker_url,
        tenants={
            "acme": Tenant(eset=account("acme"), publishers=("playbooks-acme",)),
            "globex": Tenant(eset=account("globex")),
        },
        rate_limits={}, collect_interval_s=0, **overrides,
    )


def batch_delete(tenant: str) -> Command:
    parsed: Command = parse_command({
        "type": "batch-delete", "tenant": tenant,
        "params": {"object_uuids": [str(uuid.uuid4())]},
    }).with_defaults(str(uuid.uuid4()))
    return parsed


@dataclass
class Handled:
    settlement: Settlement
    vendor_calls: int
    claimed: bool  # the idempotency store has a record of the command's key


async def handle(cmd: Command, publisher: str | None, config: Settings, tmp_path: Path) -> Handled:
    clock = Clock()
    policy = RetryPolicy(max_attempts=2, initial_wait_s=0, max_wait_s=0,
                         sleep=clock.sleep, clock=clock)
    store = SqliteStore(tmp_path / f"{uuid.uuid4().hex}.sqlite3", lease_s=30, retention_s=600)
    vendor = Vendor(script=[])
    vendors = vendors_for(config, policy, httpx.MockTransport(vendor))
    timings = replace(config.handler_timings, retry_delays_s=())
    try:
        handler = Handler(store, vendors, policy, timings, "replica", Outage({}),
                          config.publisher_binding)
        settlement = await handler.handle(cmd, DeliveryInfo(publisher=publisher))
        return Handled(settlement, len(vendor.calls), await store.find(claim_key(cmd)) is not None)
    finally:
        await vendors.aclose()
        await store.close()


def test_the_check_is_on_for_rabbitmq_once_a_tenant_names_publishers():
    binding = settings().publisher_binding
    assert binding is not None and not binding.required
    assert binding.publishers == {"acme": frozenset({"playbooks-acme"}), "globex": frozenset()}
    assert settings().consumer.bind_publishers
    # The embedded broker authenticates no one: a user_id there is whatever was written.
    assert settings("sqla+sqlite:///relay.sqlite3").publisher_binding is None
    assert not settings("sqla+sqlite:///relay.sqlite3").consumer.bind_publishers
    unbound = Settings(broker_url=RABBITMQ, tenants={"globex": Tenant(eset=account("g"))})
    assert unbound.publisher_binding is None
    required = unbound.model_copy(update={"require_publishers": True}).publisher_binding
    assert required is not None and required.required


@pytest.mark.parametrize(
    ("tenant", "publisher", "required", "allowed"),
    [
        ("acme", "playbooks-acme", False, True),
        ("ACME", "playbooks-acme", False, True),  # tenant names are case-insensitive
        ("acme", "playbooks-globex", False, False),
        ("acme", "Playbooks-Acme", False, False),  # AMQP user names are not
        ("acme", None, False, False),  # no user_id: an unknown publisher
        ("globex", "playbooks-acme", False, True),  # names none: open to every publisher
        ("globex", None, False, True),
        ("globex", "playbooks-acme", True, False),  # ... unless every tenant must name some
        ("acme", "playbooks-acme", True, True),
    ],
)
def test_who_may_act_for_which_tenant(
    tenant: str, publisher: str | None, required: bool, allowed: bool, tmp_path: Path
):
    config = settings(require_publishers=required)
    done = asyncio.run(handle(batch_delete(tenant), publisher, config, tmp_path))
    event = done.settlement.event
    assert event is not None
    if allowed:
        assert event.data.outcome == "succeeded"
        assert done.vendor_calls == 1
        return
    assert event.data.outcome == "rejected"
    assert event.data.error is not None and event.data.error.code == "forbidden_tenant"
    assert done.settlement.action is Action.DEAD_LETTER
    # Rejected before the claim: no vendor call, and nothing of the key is touched, so
    # another tenant's publisher can not even get a replay of its work.
    assert done.vendor_calls == 0 and not done.claimed


def test_a_rejection_says_what_to_fix(tmp_path: Path):
    def message(tenant: str, publisher: str | None, **overrides: Any) -> str:
        config = settings(**overrides)
        done = asyncio.run(handle(batch_delete(tenant), publisher, config, tmp_path))
        assert done.settlement.event is not None
        error = done.settlement.event.data.error
        assert error is not None and error.code == "forbidden_tenant"
        return error.message

    wrong = message("acme", "playbooks-globex")
    assert "'playbooks-globex' may not act for tenant 'acme'" in wrong
    assert "RELAY_TENANTS__ACME__PUBLISHERS" in wrong
    assert "playbooks-acme" not in wrong  # who may is not told to who may not
    assert "user_id set to the user you connect as" in message("acme", None)
    unnamed = message("globex", "playbooks-acme", require_publishers=True)
    assert "names no publishers" in unnamed and "RELAY_TENANTS__GLOBEX__PUBLISHERS" in unnamed


def test_an_unknown_tenant_stays_unknown_tenant(tmp_path: Path):
    done = asyncio.run(handle(batch_delete("initech"), "playbooks-acme",
                              settings(require_publishers=True), tmp_path))
    assert done.settlement.event is not None and done.settlement.event.data.error is not None
    assert done.settlement.event.data.error.code == "unknown_tenant"


@dataclass
class Message:
    """What the consumer reads off a kombu message: its properties and headers."""

    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)


@pytest.mark.parametrize(
    ("user_id", "headers", "publisher"),
    [
        ("playbooks-acme", {}, "playbooks-acme"),
        (None, {}, None),
        # A publisher writing the header is not believed: only its own user_id counts.
        ("playbooks-globex", {PUBLISHER_HEADER: "playbooks-acme"}, "playbooks-globex"),
        (None, {PUBLISHER_HEADER: "playbooks-acme"}, None),
        # The worker's own copy (its lane, a delay queue): the publisher it carried over.
        (WORKER, {PUBLISHER_HEADER: "playbooks-acme"}, "playbooks-acme"),
        (WORKER, {PUBLISHER_HEADER: ""}, None),  # the original had no user_id
        (WORKER, {}, WORKER),  # published as the worker's user, not moved on by it
        ("", {}, None),
    ],
)
def test_which_publisher_a_message_names(
    user_id: str | None, headers: dict[str, Any], publisher: str | None
):
    properties = {} if user_id is None else {"user_id": user_id}
    assert publisher_of(Message(properties, headers), WORKER) == publisher


def test_the_header_is_never_believed_when_publishers_are_not_checked():
    copy = Message({"user_id": WORKER}, {PUBLISHER_HEADER: "playbooks-acme"})
    assert publisher_of(copy, None) == WORKER


def test_a_copy_carries_the_publisher_under_the_workers_user():
    original = Message({"user_id": "playbooks-acme"})
    headers: dict[str, Any] = {}
    properties = carry_publisher(original, headers, WORKER)
    assert properties == {"user_id": WORKER}
    assert headers == {PUBLISHER_HEADER: "playbooks-acme"}
    copy = Message(properties, headers)
    assert publisher_of(copy, WORKER) == "playbooks-acme"
    # Moved on again (back from a delay queue, then to the lane): still the same one.
    again: dict[str, Any] = dict(headers)
    assert carry_publisher(copy, again, WORKER) == {"user_id": WORKER}
    assert again[PUBLISHER_HEADER] == "playbooks-acme"
    anonymous: dict[str, Any] = {}
    carry_publisher(Message(), anonymous, WORKER)
    assert anonymous == {PUBLISHER_HEADER: ""}
    unchecked: dict[str, Any] = {}
    assert carry_publisher(original, unchecked, None) == {} and unchecked == {}


def test_check_reports_open_tenants_beside_bound_ones(tmp_path: Path):
    account_variables = {
        f"RELAY_TENANTS__{name}__ESET__{key}": value
        for name in ("ACME", "GLOBEX") for key, value in (("USERNAME", "u"), ("PASSWORD", "p"))
    }
    env = cli_env(tmp_path, RELAY_BROKER_URL="amqp://guest:guest@rabbit.invalid:5672//",
                  RELAY_TENANTS__ACME__PUBLISHERS='["playbooks-acme"]', **account_variables)
    mixed = run_cli("check", env=env)
    assert mixed.returncode == 0, mixed.stdout
    assert (
        "warning: RELAY_TENANTS__GLOBEX__PUBLISHERS: is not set, so every publisher may act "
        "for this tenant, those of acme included; set "
        """RELAY_TENANTS__GLOBEX__PUBLISHERS='["AMQP_USER"]', or RELAY_REQUIRE_PUBLISHERS=true """
        "to refuse its commands"
    ) in mixed.stdout.splitlines()
    assert "ACME__PUBLISHERS" not in mixed.stdout

    required = run_cli("check", env={**env, "RELAY_REQUIRE_PUBLISHERS": "true"})
    assert required.returncode == 1
    assert (
        "error: RELAY_TENANTS__GLOBEX__PUBLISHERS: is not set, and RELAY_REQUIRE_PUBLISHERS "
        "refuses every command for a tenant naming no publishers (forbidden_tenant); set "
        """RELAY_TENANTS__GLOBEX__PUBLISHERS='["AMQP_USER"]'"""
    ) in required.stdout.splitlines()

    embedded = run_cli("check", env={**env, "RELAY_BROKER_URL": "sqla+sqlite:///relay.sqlite3"})
    assert (
        "warning: RELAY_TENANTS__ACME__PUBLISHERS: the embedded broker does not authenticate "
        "publishers, so publishers are not checked; use RabbitMQ (RELAY_BROKER_URL=amqp://…) "
        "to bind tenants to their publishers"
    ) in embedded.stdout.splitlines()
