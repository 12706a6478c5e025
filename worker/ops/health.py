"""Health endpoints for orchestrators and Prometheus.

* ``/healthz``: liveness: the process answers.
* ``/readyz``: readiness: the broker connection is up and the idempotency store answers.
* ``/metrics``: the worker's OpenTelemetry metrics in Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Check = Callable[[], bool]


def create_health_app(
    checks: dict[str, Check], reasons: Callable[[], dict[str, str]] | None = None
) -> Starlette:
    """``checks``: name → a callable that is True when that dependency is usable;
    ``reasons``: why the worker is holding work, if it is (shown by ``/readyz``)."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        results = {name: _safe(check) for name, check in checks.items()}
        ready = all(results.values())
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": results}
        if reasons is not None and (held := reasons()):
            body["reasons"] = held
        return JSONResponse(
            body,
            status_code=200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


def _safe(check: Check) -> bool:
    try:
        return check()
    except Exception:  # a failing check means "not ready", never a crashed probe
        return False
