"""Figures from what a run observed: rates, percentiles, a replica's ``/metrics``."""

from __future__ import annotations

import statistics

import httpx
from prometheus_client.parser import text_string_to_metric_families


def steady_rate(times: list[float], skip: int) -> float | None:
    """Events per second between the ``skip``-th and the last arrival: the first ones are
    left out so that start-up (connections, first token) does not count."""
    if len(times) <= skip + 1:
        return None
    span_s = times[-1] - times[skip]
    return (len(times) - 1 - skip) / span_s if span_s > 0 else None


def percentile(values: list[float], percent: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape_metrics(port: int, timeout_s: float = 5.0) -> Samples:
    """A replica's ``/metrics``: sample name → (labels, value) of each sample."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples
