"""A worker on the embedded broker with a hundred lanes: kombu's transport ran out of
database connections at about 15 (one held by each lane's channel), and reconnected
forever. ``python -m bench.embedded_lanes`` measures its idle CPU and latency."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from worker.admin.config import check
from worker.broker.embedded import EmbeddedTransport
from worker.sandbox import SandboxServer
from worker.sandbox.worker_setup import sandbox_settings

from .harness import embedded, running_relay
from .lanes import tenant_with_own_eset

TENANTS = 100


@pytest.mark.timeout(180)
def test_a_hundred_lanes_each_run_a_command_on_one_connection(
    sandbox: SandboxServer, data_dir: Path, caplog: pytest.LogCaptureFixture
):
    """100 tenants, each with an ESET account of its own (so a lane of its own), one
    command each: every event arrives, and the consumer connects once."""
    config, url = sandbox.state.config, sandbox.base_url
    names = [f"tenant{number:03d}" for number in range(TENANTS)]
    tenants = {name: tenant_with_own_eset(url, config, name) for name in names}
    caplog.set_level(logging.INFO, logger="worker.broker.consumer")
    with running_relay(
        sandbox, **embedded(data_dir, tenants=tenants, rate_limits={"eset": "10/second"})
    ) as relay:
        assert len(relay.service.consumer.topology.lanes) == TENANTS
        sent = {
            relay.send({"type": "fetch-patching", "id": str(uuid.uuid4()), "tenant": name,
                        "params": {}}): name
            for name in names
        }
        events = relay.events(TENANTS, timeout_s=60)
    assert {event.data.command_id: event.data.tenant for event in events} == sent
    assert {event.data.outcome for event in events} == {"succeeded"}
    consumer_log = [record.getMessage() for record in caplog.records
                    if record.name == "worker.broker.consumer"]
    assert consumer_log.count("consuming") == 1, consumer_log
    assert not [line for line in consumer_log if "reconnect" in line or "lost" in line]


def test_more_lanes_than_the_embedded_broker_has_channels_is_refused_at_start_up(
    sandbox: SandboxServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The one limit left (kombu's 65,535 channel ids per connection) is named, with its
    value, by ``check``, whose errors ``run`` refuses to start with; here a transport of
    3 channels meets 3 lanes."""
    monkeypatch.setattr(EmbeddedTransport, "channel_max", 3)
    config, url = sandbox.state.config, sandbox.base_url
    tenants = {name: tenant_with_own_eset(url, config, name) for name in ("a", "b", "c")}
    settings = sandbox_settings(url, config, **embedded(data_dir, tenants=tenants))
    (problem,) = [problem for problem in check(settings, environ={})
                  if problem.level == "error"]
    assert problem.name == "RELAY_TENANTS"
    assert "3 lanes" in problem.problem and "the embedded broker has 3" in problem.problem
