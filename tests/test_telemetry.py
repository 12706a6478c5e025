"""One command, followed from the publisher's span to the event's headers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from worker.client import Reply
from worker.ops.health import create_health_app
from worker.ops.logs import handler_for
from worker.ops.telemetry import Telemetry
from worker.sandbox import Faults, SandboxServer, ScriptedFault

from .harness import RunningRelay, embedded, running_relay

SECRETS = ("sandbox-password", "sandbox-secret")


class Traced:
    def __init__(self, relay: RunningRelay, spans: InMemorySpanExporter,
                 metrics: InMemoryMetricReader, provider: TracerProvider) -> None:
        self.relay, self.spans, self.metrics, self.provider = relay, spans, metrics, provider

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def traced(sandbox: SandboxServer, data_dir: Path) -> Iterator[Traced]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    telemetry = Telemetry.using(provider, MeterProvider(metric_readers=[metrics]))
    with running_relay(
        sandbox,
        telemetry=telemetry,
        **embedded(data_dir, health_port=0),
    ) as relay:
        yield Traced(relay, spans, metrics, provider)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = handler_for("json", stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # everything, httpx and httpcore included
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def publish_traced(traced: Traced, command: dict[str, Any]) -> tuple[trace.Span, Reply]:
    """Publish under a playbook's own span, the way an instrumented publisher would."""
    tracer = traced.provider.get_tracer("playbook")
    with tracer.start_as_current_span("playbook send", kind=SpanKind.PRODUCER) as span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        traced.relay.send_raw(json.dumps(command).encode(), headers=headers)
    (reply,) = traced.relay.replies(1)
    return span, reply


def batch_delete() -> dict[str, Any]:
    return {"type": "batch-delete", "idempotency_key": f"k-{uuid.uuid4()}",
            "params": {"object_uuids": [str(uuid.uuid4())]}}


@pytest.fixture
def followed(traced: Traced, sandbox: SandboxServer, json_logs: io.StringIO):
    """A batch-delete that meets a 429, then a 202, then succeeds."""
    sandbox.state.faults = Faults(script=[ScriptedFault(status=429), ScriptedFault(status=202)])
    command = batch_delete()
    publisher_span, reply = publish_traced(traced, command)
    assert reply.event.data.outcome == "succeeded"
    traced.relay.service.telemetry.tracer_provider.force_flush()  # type: ignore[union-attr]
    spans = [s for s in traced.spans.get_finished_spans() if s.context.trace_id
             == publisher_span.get_span_context().trace_id]
    return command, publisher_span, reply, spans


def by_kind(spans: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


def routing_and_handling(spans: list[ReadableSpan]) -> tuple[ReadableSpan, ReadableSpan]:
    """The delivery from the command queue that forwarded the command to its lane, and
    the delivery from the lane that handled it."""
    (routing,) = [s for s in by_kind(spans, SpanKind.CONSUMER)
                  if (s.attributes or {})["relay.outcome"] == "laned"]
    (handling,) = [s for s in by_kind(spans, SpanKind.CONSUMER) if s is not routing]
    return routing, handling


def test_process_span_continues_the_publishers_trace(followed):
    command, publisher_span, _, spans = followed
    _, process = routing_and_handling(spans)
    assert process.parent is not None
    assert process.parent.span_id == publisher_span.get_span_context().span_id
    assert [link.context.span_id for link in process.links] == [
        publisher_span.get_span_context().span_id
    ]
    attributes = process.attributes or {}
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"].startswith("test.lane.")
    assert attributes["messaging.destination.name"].endswith(".eset.default")
    assert attributes["messaging.message.id"]
    assert attributes["relay.command.type"] == "batch-delete"
    assert attributes["relay.idempotency_key"] == command["idempotency_key"]
    assert attributes["relay.tenant"] == "default"
    assert attributes["relay.outcome"] == "succeeded"


def test_the_delivery_that_forwarded_the_command_to_its_lane_is_traced_too(followed):
    command, publisher_span, _, spans = followed
    routing, _ = routing_and_handling(spans)
    assert routing.parent is not None
    assert routing.parent.span_id == publisher_span.get_span_context().span_id
    attributes = routing.attributes or {}
    assert attributes["messaging.destination.name"].startswith("test.commands.")
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "unknown"
    assert attributes["relay.idempotency_key"] == command["idempotency_key"]


def test_every_http_attempt_and_collect_is_a_client_span(followed):
    _, _, _, spans = followed
    _, process = routing_and_handling(spans)
    calls = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    statuses = [(s.attributes or {})["http.response.status_code"] for s in calls]
    assert statuses[:2] == [429, 202] and statuses[-1] == 200
    collects = [s for s in calls if (s.attributes or {})["relay.collect"]]
    assert collects and all((s.attributes or {})["relay.vendor.response_id"] for s in collects)
    assert all(s.parent is not None and s.parent.span_id == process.context.span_id
               for s in calls)
    first, second = calls[0].attributes or {}, calls[1].attributes or {}
    assert first["url.template"] == "/v1/quarantined-objects:batchDelete"
    assert first["http.request.method"] == "POST"
    assert first["relay.vendor.request_id"]
    assert second["http.request.resend_count"] == 1


def test_publish_span_is_injected_into_the_event_headers(followed):
    _, publisher_span, reply, spans = followed
    _, process = routing_and_handling(spans)
    producers = [p for p in by_kind(spans, SpanKind.PRODUCER)
                 if p.context.span_id != publisher_span.get_span_context().span_id]
    assert len(producers) == 2  # the events exchange and the reply_to queue
    assert {(p.attributes or {})["messaging.operation.type"] for p in producers} == {"send"}
    assert all(p.parent is not None and p.parent.span_id == process.context.span_id
               for p in producers)
    trace_id = f"{publisher_span.get_span_context().trace_id:032x}"
    _, header_trace_id, header_span_id, _ = reply.headers["traceparent"].split("-")
    assert header_trace_id == trace_id
    assert header_span_id in {f"{p.context.span_id:016x}" for p in producers}


def test_metrics_count_the_command_its_attempts_and_vendor_answers(followed, traced: Traced):
    (finished,) = traced.metric_points("relay.commands")
    assert finished.value == 1
    assert finished.attributes["relay.outcome"] == "succeeded"
    assert sum(p.value for p in traced.metric_points("relay.vendor.attempts")) == 2
    statuses = {p.attributes["http.response.status_code"]: p.value
                for p in traced.metric_points("relay.vendor.responses")}
    assert statuses[429] == 1 and statuses[202] >= 1 and statuses[200] == 1
    durations = {p.attributes["relay.outcome"]: p.count
                 for p in traced.metric_points("relay.command.duration")}
    assert durations == {"laned": 1, "succeeded": 1}  # one per delivery
    (duration, *_) = traced.metric_points("relay.command.duration")
    assert duration.explicit_bounds[:2] == (0.005, 0.01)  # seconds, not milliseconds
    (lane_wait,) = traced.metric_points("relay.lane.wait")
    assert lane_wait.count == 1 and lane_wait.attributes == {"relay.lane": "eset.default"}


def test_json_logs_carry_trace_and_command_ids_and_no_secrets(followed, json_logs: io.StringIO):
    command, publisher_span, _, _ = followed
    text = json_logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    (done,) = [line for line in lines if line["message"] == "command succeeded"]
    assert done["trace_id"] == f"{publisher_span.get_span_context().trace_id:032x}"
    assert done["idempotency_key"] == command["idempotency_key"]
    assert done["command_id"]
    assert not any(secret in text for secret in SECRETS)
    assert "Bearer ey" not in text and "access_token" not in text


def test_health_endpoints_answer(traced: Traced):
    server = traced.relay.service.health
    assert server is not None
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"broker": True, "store": True}
    assert httpx.get(f"{base}/metrics").status_code == 200


def test_readiness_fails_when_a_dependency_does():
    def broken() -> bool:
        raise ConnectionError("store unreachable")

    async def probe() -> httpx.Response:
        app = create_health_app({"broker": lambda: True, "store": broken})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://health") as client:
            return await client.get("/readyz")

    answer = asyncio.run(probe())
    assert answer.status_code == 503
    assert answer.json()["checks"] == {"broker": True, "store": False}


def test_readiness_says_why_commands_are_held():
    async def probe() -> httpx.Response:
        app = create_health_app(
            {"broker": lambda: True, "store": lambda: False},
            lambda: {"store": "the idempotency store is unreachable: ConnectionError"},
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://health") as client:
            return await client.get("/readyz")

    answer = asyncio.run(probe())
    assert answer.status_code == 503
    assert "unreachable" in answer.json()["reasons"]["store"]
