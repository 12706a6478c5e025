"""Publishers bound to tenants, over RabbitMQ with real users: the worker and two
publishers, each with the permissions deploy/README.md documents (the worker: its own
names; a publisher: write on the command exchange, nothing else).

Tenant ``acme`` names publisher A; ``globex`` names none. A's commands for acme run,
through acme's lane and through a delay queue and back; B's are rejected
``forbidden_tenant`` and dead-lettered, as is a command without ``user_id``; RabbitMQ
refuses a forged ``user_id`` and a publisher's write anywhere but the command exchange;
a replayed dead letter keeps its publisher.

The users are made with ``rabbitmqctl`` (again if they exist, with new passwords) and
deleted afterwards."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pika
import pika.exceptions
import pytest

from worker.admin.deadletters import DeadLetterQueue, Replayer, Verdict
from worker.broker.origin import PUBLISHER_HEADER
from worker.idempotency import open_store
from worker.sandbox import Faults, SandboxServer, ScriptedFault

from ..chaos.broker import RabbitCtl
from ..harness import RunningRelay, running_relay
from ..lanes import tenant_with_own_eset
from ..servers import unavailable
from .test_rabbitmq import _delete_queues, pika_parameters

pytestmark = pytest.mark.integration

WORKER, PUBLISHER_A, PUBLISHER_B = "relay-test-worker", "relay-test-acme", "relay-test-globex"
# The harness's names (test.commands.<suffix>, test.lane.<suffix>.…) and the client's
# reply queues, as a deployment's would be relay.*: the worker's own, and no more.
WORKER_NAMES = r"^(test\..*|relay\.replies\..*)$"
WORKER_WRITES = r"^(test\..*|relay\.replies\..*|amq\.default)$"
COMMAND_EXCHANGES = r"^test\.commands\.[0-9a-f]{8}$"  # relay.commands in a deployment
REPLY_QUEUES = r"^amq\.gen-.*"  # server-named, exclusive: a publisher's own replies


@dataclass(frozen=True)
class Users:
    amqp_url: str  # the administrator's
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        parts = urlsplit(self.amqp_url)
        vhost = unquote(parts.path[1:]) or "/"
        return (f"amqp://{user}:{self.passwords[user]}@{parts.hostname}:{parts.port or 5672}"
                f"/{quote(vhost, safe='')}")


@pytest.fixture(scope="module")
def users(amqp_url: str) -> Iterator[Users]:
    ctl = RabbitCtl.find()
    if ctl is None:
        unavailable("rabbitmqctl is not usable here: the test makes RabbitMQ users with it")
    parts = urlsplit(amqp_url)
    vhost = unquote(parts.path[1:]) or "/"
    passwords = {user: secrets.token_urlsafe(16) for user in (WORKER, PUBLISHER_A, PUBLISHER_B)}
    permissions = {
        WORKER: (WORKER_NAMES, WORKER_WRITES, WORKER_NAMES),
        PUBLISHER_A: (REPLY_QUEUES, COMMAND_EXCHANGES, REPLY_QUEUES),
        PUBLISHER_B: (REPLY_QUEUES, COMMAND_EXCHANGES, REPLY_QUEUES),
    }
    for user, password in passwords.items():
        existing = ctl.run("-q", "list_users", "--no-table-headers")
        if user in {line.split("\t")[0] for line in existing.splitlines()}:
            ctl.run("change_password", user, password)
        else:
            ctl.run("add_user", user, password)
        ctl.run("set_permissions", "-p", vhost, user, *permissions[user])
    try:
        yield Users(amqp_url, passwords)
    finally:
        for user in passwords:
            ctl.run("delete_user", user)


@pytest.fixture
def relay(
    sandbox: SandboxServer, users: Users, amqp_url: str, tmp_path: Path
) -> Iterator[RunningRelay]:
    config, url = sandbox.state.config, sandbox.base_url
    acme = tenant_with_own_eset(url, config, "acme").model_copy(
        update={"publishers": (PUBLISHER_A,)}
    )
    with running_relay(
        sandbox,
        broker_url=users.url(WORKER),
        idempotency_url=f"sqlite:///{tmp_path / 'idempotency.sqlite3'}",
        tenants={"acme": acme, "globex": tenant_with_own_eset(url, config, "globex")},
        rate_limits={"eset": "10/second"},  # each tenant's ESET account has a lane
        retry_in_process_s=1.0,
        retry_max_attempts=2,
        retry_delays_s=(0.3, 0.6),
    ) as running:
        assert running.settings.publisher_binding is not None
        assert ("eset", "acme") in running.service.consumer.topology.lanes
        yield running
    _delete_queues(amqp_url, running)


def publish(
    users: Users, relay: RunningRelay, user: str, command: dict[str, Any], *,
    user_id: str | None = "self", exchange: str | None = None, routing_key: str | None = None,
) -> str:
    """Publish ``command`` as ``user`` (with ``user_id`` = that user unless told)."""
    connection = pika.BlockingConnection(pika_parameters(users.url(user)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        message_id = str(uuid.uuid4())
        channel.basic_publish(
            exchange=relay.settings.command_exchange if exchange is None else exchange,
            routing_key=command["type"] if routing_key is None else routing_key,
            body=json.dumps(command).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
                reply_to=relay.reply_to,
                user_id=user if user_id == "self" else user_id,
            ),
        )
        return message_id
    finally:
        if connection.is_open:
            connection.close()


def batch_delete(tenant: str) -> dict[str, Any]:
    return {"type": "batch-delete", "tenant": tenant,
            "params": {"object_uuids": [str(uuid.uuid4())]}}


def test_a_publisher_acts_for_its_own_tenant_through_its_lane(
    users: Users, relay: RunningRelay, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
):
    """A publishes for acme and gets the event on a reply queue of its own (server-named,
    exclusive: all its permissions allow)."""
    connection = pika.BlockingConnection(pika_parameters(users.url(PUBLISHER_A)))
    try:
        channel = connection.channel()
        reply_to = channel.queue_declare("", exclusive=True).method.queue
        with caplog.at_level(logging.DEBUG):
            channel.basic_publish(
                relay.settings.command_exchange, "batch-delete",
                json.dumps(batch_delete("acme")).encode(),
                pika.BasicProperties(content_type="application/json", reply_to=reply_to,
                                     message_id=str(uuid.uuid4()), user_id=PUBLISHER_A),
            )
            _, _, body = next(channel.consume(reply_to, auto_ack=True, inactivity_timeout=20))
    finally:
        connection.close()
    assert body is not None, "no event on the publisher's reply queue"
    data = json.loads(body)["data"]
    assert data["outcome"] == "succeeded", data["error"]
    assert data["tenant"] == "acme"
    assert sandbox.state.stats()["calls"]["eset.batch_delete"] == 1
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert not any(password in logged for password in users.passwords.values())


def test_through_a_delay_queue_and_back_the_publisher_still_counts(
    users: Users, relay: RunningRelay, sandbox: SandboxServer
):
    """Two 503s use up the first delivery: a delay queue, the command queue, the lane
    again (each a copy the worker published), then the call goes through."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=503)] * 3)
    publish(users, relay, PUBLISHER_A, batch_delete("acme"))
    (event,) = relay.events(1)
    assert event.data.outcome == "succeeded", event.data.error
    assert event.data.attempts == 4


def test_another_tenants_publisher_is_rejected_and_dead_lettered(
    users: Users, relay: RunningRelay, sandbox: SandboxServer
):
    message_id = publish(users, relay, PUBLISHER_B, batch_delete("acme"))
    (event,) = relay.events(1)
    assert event.data.outcome == "rejected"
    assert event.data.error is not None and event.data.error.code == "forbidden_tenant"
    assert f"'{PUBLISHER_B}' may not act for tenant 'acme'" in event.data.error.message
    assert "eset.batch_delete" not in sandbox.state.stats()["calls"]
    (kept,) = relay.dead_letters()
    assert kept.properties["message_id"] == message_id
    assert kept.headers["x-relay-error-code"] == "forbidden_tenant"
    # Kept as the worker's copy, with who sent it: a replay is judged by that publisher.
    assert kept.properties["user_id"] == WORKER
    assert kept.headers[PUBLISHER_HEADER] == PUBLISHER_B
    # globex names no publishers: open to every one (command-relay check warns of it).
    publish(users, relay, PUBLISHER_B, batch_delete("globex"))
    (event,) = relay.events(1)
    assert event.data.outcome == "succeeded", event.data.error


def test_a_command_without_user_id_for_a_bound_tenant_is_rejected(
    users: Users, relay: RunningRelay
):
    publish(users, relay, PUBLISHER_A, batch_delete("acme"), user_id=None)
    (event,) = relay.events(1)
    assert event.data.outcome == "rejected"
    assert event.data.error is not None and event.data.error.code == "forbidden_tenant"
    assert "user_id" in event.data.error.message
    (kept,) = relay.dead_letters()
    assert kept.headers[PUBLISHER_HEADER] == ""


def test_rabbitmq_refuses_a_forged_user_id_and_writes_past_the_command_exchange(
    users: Users, relay: RunningRelay
):
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as forged:
        publish(users, relay, PUBLISHER_B, batch_delete("acme"), user_id=PUBLISHER_A)
    assert forged.value.reply_code == 406  # PRECONDITION_FAILED: user_id is not B
    # The worker's own queues (a lane here; delay queues, the dead-letter queue) are
    # reached only through the default exchange, which a publisher may not write to.
    lane = relay.service.consumer.topology.lanes[("eset", "acme")].queue.name
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        publish(users, relay, PUBLISHER_B, batch_delete("acme"), exchange="", routing_key=lane)
    assert refused.value.reply_code == 403  # ACCESS_REFUSED to amq.default
    assert not list(relay.client.events(timeout_s=1))


def test_a_replayed_dead_letter_keeps_its_publisher(
    users: Users, relay: RunningRelay, sandbox: SandboxServer
):
    """Replayed (as `command-relay dlq replay` does, with the worker's user): A's failed
    command runs again for acme; B's stays refused, not passed off as the worker's."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=400)])
    publish(users, relay, PUBLISHER_A, batch_delete("acme"))
    (failed,) = relay.events(1)
    assert failed.data.error is not None and failed.data.error.code == "vendor_rejected"
    publish(users, relay, PUBLISHER_B, batch_delete("acme"))
    (refused,) = relay.events(1)
    assert refused.data.error is not None and refused.data.error.code == "forbidden_tenant"

    settings = relay.settings
    store = open_store(settings.idempotency_url, settings.claim_lease_s,
                       settings.idempotency_retention_s)
    with Replayer(store, force=False) as replayer, DeadLetterQueue(settings) as queue:
        report = queue.walk(lambda letter: Verdict.REPLAY if replayer.prepare(letter)
                            else Verdict.KEEP)
    assert len(report.replayed) == 2
    outcomes = {event.data.command_id: event for event in relay.events(2)}
    assert outcomes[failed.data.command_id].data.outcome == "succeeded"
    again = outcomes[refused.data.command_id]
    assert again.data.error is not None and again.data.error.code == "forbidden_tenant"
    assert not again.data.replayed  # judged afresh, and refused again
