"""``command-relay run`` as a run starts each replica (``bench/rig/replicas.py``; the chaos
scenarios too), with the benchmark's tracing on where it asks for it.

TRACING HOOK. "All features on" includes tracing with spans that are made and then
dropped: with ``BENCH_TRACING=sdk-noop`` (what the harness sets unless ``--no-tracing``)
this installs an SDK tracer provider whose exporter discards every batch, as the global
provider, before the worker starts. The worker's telemetry falls back to the global
provider when ``OTEL_TRACES_EXPORTER`` names no exporter (worker/ops/telemetry.py,
``from_environment``). If the worker ever sets its own provider unconditionally, change
this hook (e.g. to an ``OTEL_TRACES_EXPORTER`` no-op exporter) so spans are still made.
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


def main() -> None:
    if os.environ.get("BENCH_TRACING") == "sdk-noop":
        install_noop_tracing()
    from worker.cli import app

    app(["run"])


if __name__ == "__main__":
    main()
