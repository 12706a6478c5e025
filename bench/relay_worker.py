"""``command-relay run`` as a run starts each replica (``bench/rig/replicas.py``; the chaos
scenarios too), with the benchmark's tracing on where it asks for it.

TRACING HOOK. "All features on" includes tracing with spans that are made and then
dropped: with ``BENCH_TRACING=sdk-noop`` (what the harness sets unless ``--no-tracing``)
this installs an SDK tracer provider whose exporter discards every batch, as the global
provider, before the worker starts. The worker's telemetry falls back to the global
provider when ``OTEL_TRACES_EXPORTER`` names no exporter (worker/ops/telemetry.py,
``from_environment``). If the worker ever sets its own provider unconditionally, change
this hook (e.g. to an ``OTEL_TRACES_EXPORTER`` no-op exporter) so spans are still made.

SPANS FILE. With ``BENCH_SPANS_FILE=path`` every span the replica ends is appended to that
file as one JSON line (name, start and end in Unix nanoseconds, attributes, events): a chaos
scenario reads there how long each delivery waited on this replica (``process`` spans).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def install_noop_tracing() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DiscardingExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    trace.set_tracer_provider(provider)


def install_spans_file(path: str) -> None:
    import json
    import threading

    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def __init__(self) -> None:
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 (open while the process runs; line-buffered)
            self._lock = threading.Lock()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with self._lock:
                for span in spans:
                    self._file.write(json.dumps(_as_record(span), default=str) + "\n")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self._file.close()

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
    trace.set_tracer_provider(provider)


def _as_record(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": event.name, "time_ns": event.timestamp,
             "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
    }


def main() -> None:
    spans_file = os.environ.get("BENCH_SPANS_FILE")
    if spans_file:
        install_spans_file(spans_file)
    elif os.environ.get("BENCH_TRACING") == "sdk-noop":
        install_noop_tracing()
    from worker.cli import app

    app(["run"])


if __name__ == "__main__":
    main()
