"""Lanes: which commands get one, how big its prefetch is, and that a flooded account's
backlog waits in its own lane on the embedded broker."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer
from kombu.message import Message
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from schemas.commands import parse_command
from worker.broker.decoding import decode_message
from worker.broker.lanes import LANED_AT_HEADER, LaneMonitor, vendor_of
from worker.broker.topology import Topology
from worker.ops.telemetry import Telemetry
from worker.sandbox import SandboxServer
from worker.sandbox.worker_setup import demo_commands, sandbox_settings

from .harness import embedded, running_relay
from .lanes import FLOOD, flood_and_quiet, quiet_answered_during_the_flood


def topology(sandbox: SandboxServer, **overrides: Any) -> Topology:
    settings = sandbox_settings(sandbox.base_url, sandbox.state.config, **overrides)
    return Topology.from_settings(settings)


@pytest.mark.parametrize(
    ("kind", "provider", "vendor"),
    [("update-triggers", "", "eset"), ("update-triggers", "spaaza", "spaaza"),
     ("batch-delete", "", "eset"), ("cancel-task", "", "fylr"), ("fetch-patching", "", "eset")],
)
def test_every_command_has_its_vendor(kind: str, provider: str, vendor: str):
    (command,) = [c for c in demo_commands()
                  if c["type"] == kind and c["params"].get("provider", "") == provider]
    assert vendor_of(parse_command(command)) == vendor


def test_each_account_of_a_limited_vendor_gets_a_lane(sandbox: SandboxServer):
    lanes = topology(sandbox, **flood_and_quiet(sandbox)).lanes
    assert sorted(lanes) == [("eset", "flood"), ("eset", "quiet")]
    assert lanes[("eset", "quiet")].queue.name == "relay.lane.eset.quiet"
    assert lanes[("eset", "quiet")].prefetch == 30  # 3 s of 10 calls/s


def test_no_rate_limit_no_lanes(sandbox: SandboxServer):
    assert topology(sandbox, rate_limits={}).lanes == {}


@pytest.mark.parametrize(("limit", "prefetch"), [("1/minute", 2), ("100/second", 300)])
def test_a_lanes_prefetch_is_three_seconds_of_its_budget(
    sandbox: SandboxServer, limit: str, prefetch: int
):
    (lane,) = topology(sandbox, rate_limits={"fylr": limit}).lanes.values()
    assert (lane.vendor, lane.prefetch) == ("fylr", prefetch)


def test_lane_prefetch_and_names_are_settings(sandbox: SandboxServer):
    (lane,) = topology(sandbox, lane_prefetch=7, lane_queue_prefix="acme.lanes.").lanes.values()
    assert (lane.queue.name, lane.prefetch) == ("acme.lanes.eset.default", 7)


def test_only_valid_commands_of_a_laned_account_go_to_a_lane(sandbox: SandboxServer):
    lanes = topology(sandbox, **flood_and_quiet(sandbox))
    cancel, patching, unknown_tenant, rejected = (
        decode_message(body, "m")
        for body in (b'{"type": "cancel-task", "tenant": "quiet", "params": {"task_id": 1}}',
                     b'{"type": "fetch-patching", "tenant": "quiet", "params": {}}',
                     b'{"type": "fetch-patching", "tenant": "nobody", "params": {}}',
                     b"{")
    )
    assert lanes.lane_for(cancel) is None  # fylr has no limit
    lane = lanes.lane_for(patching)
    assert lane is not None and lane.name == "eset.quiet"
    assert lanes.lane_for(unknown_tenant) is None  # handled, and rejected, where it is
    assert lanes.lane_for(rejected) is None


def test_a_flooded_accounts_backlog_does_not_delay_another_account(
    sandbox: SandboxServer, data_dir: Path
):
    with running_relay(sandbox, **embedded(data_dir, **flood_and_quiet(sandbox))) as relay:
        answered_flood, _ = quiet_answered_during_the_flood(relay)
    # Without lanes the quiet commands queue behind the whole flood (15 s at 10/s).
    assert answered_flood < FLOOD // 2


def delivered(headers: dict[str, object]) -> Message:
    return Message(body=b"{}", headers=headers)


def lane_metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    if data is None:  # nothing recorded at all
        return {}
    return {
        metric.name: {point.attributes["relay.lane"]: point for point in metric.data.data_points}
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name.startswith("relay.lane.")
    }


@pytest.mark.parametrize("laned_at", ["1700000000", math.nan, True, None, -math.inf])
def test_a_lane_wait_is_recorded_only_from_a_usable_timestamp(
    sandbox: SandboxServer, data_dir: Path, laned_at: object
):
    reader = InMemoryMetricReader()
    telemetry = Telemetry.using(meter_provider=MeterProvider(metric_readers=[reader]))
    (lane,) = topology(sandbox).lanes.values()
    monitor = LaneMonitor([lane], telemetry.instruments, "memory://", 1.0)
    monitor.delivered(lane, delivered({LANED_AT_HEADER: laned_at}))
    assert "relay.lane.wait" not in lane_metrics(reader)


def test_the_monitor_reports_each_lanes_backlog_and_oldest_wait(
    sandbox: SandboxServer, data_dir: Path
):
    settings = embedded(data_dir)
    reader = InMemoryMetricReader()
    telemetry = Telemetry.using(meter_provider=MeterProvider(metric_readers=[reader]))
    (lane,) = topology(sandbox, **settings).lanes.values()
    monitor = LaneMonitor([lane], telemetry.instruments, settings["broker_url"], 1.0)
    with Connection(settings["broker_url"]) as connection:
        channel = connection.channel()
        lane.queue.bind(channel).declare()
        for _ in range(3):
            Producer(channel).publish(b"{}", routing_key=lane.queue.name)
        monitor.delivered(lane, delivered({LANED_AT_HEADER: 1_000.0}))  # long ago
        monitor._poll(channel)
    metrics = lane_metrics(reader)
    assert metrics["relay.lane.backlog"]["eset.default"].value == 3
    assert metrics["relay.lane.oldest_wait"]["eset.default"].value > 1_000_000
    assert metrics["relay.lane.wait"]["eset.default"].count == 1
