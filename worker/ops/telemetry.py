"""Traces and metrics with OpenTelemetry, after the messaging and HTTP conventions.

There is no OpenTelemetry instrumentation for kombu, so the worker makes its own spans:

* ``process relay.commands`` (CONSUMER) continues the publisher's trace, taken from the
  command's ``traceparent``/``tracestate`` headers, and links to it;
* one CLIENT span per vendor HTTP request: every retry and every 202 collect;
* ``publish relay.events`` (PRODUCER), whose context is injected into the event's
  headers so the playbook side can continue the trace.

Exporters come from the standard variables (``OTEL_TRACES_EXPORTER``,
``OTEL_METRICS_EXPORTER``: ``console``, ``otlp`` with the ``otlp`` extra, ``none``). With
none set, the API's no-op providers are used and the instrumentation costs next to
nothing. Metrics are also served to Prometheus when the health port is on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import (
    Counter,
    Histogram,
    Meter,
    MeterProvider,
    UpDownCounter,
)
from opentelemetry.metrics import _Gauge as Gauge  # the API's synchronous gauge
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer, TracerProvider

from worker.ops.stats import CountedCounter, CountedUpDownCounter, Tally

SCOPE = "command-relay"
MESSAGING_SYSTEM = "rabbitmq"
# Histogram buckets of durations in seconds: the SDK's defaults (0, 5, 10, 25, … 10000)
# are made for milliseconds and tell nothing below 5 s. These cover a vendor call (ms) to
# the longest a delivery may work on a command (20 min).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                   300, 600, 1200)


@dataclass(frozen=True)
class Instruments:
    """Every metric the worker records."""

    commands: Counter  # finished commands, by type and outcome
    attempts: Counter  # vendor calls (not collects), by vendor
    vendor_responses: Counter  # vendor answers, by vendor and status code
    command_duration: Histogram  # receipt to settlement
    vendor_duration: Histogram  # time spent in vendor HTTP calls of one command
    in_flight: UpDownCounter
    rate_limit_wait: Histogram
    replays: Counter
    dead_letters: Counter
    lane_wait: Histogram  # a command's time in its lane, by lane
    lane_backlog: Gauge  # commands waiting in a lane, as the broker counts them
    lane_oldest_wait: Gauge  # how long the oldest of them has waited (at most)
    tally: Tally  # what commands, in_flight and dead_letters counted, for the log's stats

    @classmethod
    def on(cls, meter: Meter) -> Instruments:
        tally = Tally()
        return cls(
            commands=CountedCounter(
                meter.create_counter(
                    "relay.commands", unit="{command}", description="Commands finished"
                ),
                tally.done,
            ),
            attempts=meter.create_counter(
                "relay.vendor.attempts", unit="{call}", description="Vendor calls, not collects"
            ),
            vendor_responses=meter.create_counter(
                "relay.vendor.responses", unit="{response}", description="Vendor answers"
            ),
            command_duration=_seconds(meter, "relay.command.duration", "Receipt to settlement"),
            vendor_duration=_seconds(meter, "relay.vendor.duration", "Vendor HTTP time"),
            in_flight=CountedUpDownCounter(
                meter.create_up_down_counter(
                    "relay.commands.in_flight", unit="{command}",
                    description="Commands in flight",
                ),
                tally.in_flight,
            ),
            rate_limit_wait=_seconds(meter, "relay.rate_limit.wait", "Waits for a rate-limit slot"),
            replays=meter.create_counter(
                "relay.replays", unit="{event}", description="Stored events sent again"
            ),
            dead_letters=CountedCounter(
                meter.create_counter(
                    "relay.dead_letters", unit="{message}", description="Messages dead-lettered"
                ),
                tally.dead_lettered,
            ),
            lane_wait=_seconds(meter, "relay.lane.wait", "Time commands waited in their lane"),
            lane_backlog=meter.create_gauge(
                "relay.lane.backlog", unit="{command}", description="Commands waiting in a lane"
            ),
            lane_oldest_wait=meter.create_gauge(
                "relay.lane.oldest_wait", unit="s",
                description="How long the oldest command of a lane has waited, at most",
            ),
            tally=tally,
        )


def _seconds(meter: Meter, name: str, description: str) -> Histogram:
    return meter.create_histogram(
        name, unit="s", description=description,
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
    )


@dataclass(frozen=True)
class Telemetry:
    tracer: Tracer
    instruments: Instruments
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @classmethod
    def using(
        cls,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> Telemetry:
        """Instruments on the given providers (the global, possibly no-op, ones if None)."""
        tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        return cls(tracer, Instruments.on(meter), tracer_provider, meter_provider)

    def shutdown(self) -> None:
        """Flush what the exporters still hold."""
        for provider in (self.tracer_provider, self.meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


def from_environment(prometheus: bool = False) -> Telemetry:
    """Providers built from the ``OTEL_*`` variables; no-op ones when none asks for export."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SCOPE)})
    tracer_provider = None
    span_exporters = _exporters("OTEL_TRACES_EXPORTER", "opentelemetry_traces_exporter")
    if span_exporters:
        sdk_tracer_provider = SdkTracerProvider(resource=resource)
        for exporter in span_exporters:
            sdk_tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        tracer_provider = sdk_tracer_provider
    readers: list[MetricReader] = [
        PeriodicExportingMetricReader(exporter)
        for exporter in _exporters("OTEL_METRICS_EXPORTER", "opentelemetry_metrics_exporter")
    ]
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
    meter_provider = None
    if readers:
        meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers)
    return Telemetry.using(tracer_provider, meter_provider)


def _exporters(variable: str, group: str) -> list[Any]:
    names = [n.strip() for n in os.environ.get(variable, "none").split(",") if n.strip()]
    exporters = []
    for name in names:
        if name == "none":
            continue
        found = entry_points(group=group, name=name)
        if not found:
            raise ValueError(
                f"{variable}={name}: no such exporter installed (console is built in; "
                "otlp needs: pip install 'command-relay[otlp]')"
            )
        exporters.append(next(iter(found)).load()())
    return exporters


def messaging_attributes(
    destination: str, routing_key: str | None, message_id: str | None, operation: str
) -> dict[str, str]:
    attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": destination,
        "messaging.operation.type": operation,
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


def start_process_span(
    tracer: Tracer, queue: str, headers: dict[str, Any] | None, routing_key: str | None,
    message_id: str | None,
) -> trace.Span:
    """The CONSUMER span of one delivery: a child of the publisher's span when the
    command carries a trace context, and linked to it as the conventions ask."""
    carrier = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    parent = propagate.extract(carrier)
    creation = trace.get_current_span(parent).get_span_context()
    links = [trace.Link(creation)] if creation.is_valid else []
    return tracer.start_span(
        f"process {queue}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            **messaging_attributes(queue, routing_key, message_id, "process"),
            "messaging.operation.name": "process",
        },
    )


def trace_headers(span: trace.Span) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) for a message published under ``span``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier
