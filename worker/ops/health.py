"""Health endpoints for orchestrators and Prometheus.

* ``/healthz``: liveness: the handler loop runs. The endpoints are served from a thread
  of their own, which answers even when the loop is stuck, so the loop proves itself:
  a :class:`LoopHeartbeat` task on it stamps the time, and ``/healthz`` fails (503, with
  the reason) once that stamp is older than the stall allowed.
* ``/readyz``: readiness: the broker connection is up and the idempotency store answers.
* ``/metrics``: the worker's OpenTelemetry metrics in Prometheus text format.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Check = Callable[[], bool]
Liveness = Callable[[], str | None]  # None: alive; else why not


class LoopHeartbeat:
    """Proof that an asyncio loop runs: :meth:`beat`, a task on that loop, stamps the
    time every ``every_s``; :meth:`stalled`, from any thread, says whether the last stamp
    is older than ``stall_s``."""

    def __init__(self, stall_s: float, setting: str = "RELAY_LIVENESS_STALL_S") -> None:
        self.stall_s = stall_s
        self.every_s = min(1.0, stall_s / 4)  # stamps well within the stall allowed
        self._setting = setting
        self._stamped_at = time.monotonic()  # a float, written whole: no lock needed

    async def beat(self) -> None:
        """Stamp until cancelled (run it as a task on the loop to watch)."""
        while True:
            self._stamped_at = time.monotonic()
            await asyncio.sleep(self.every_s)

    def stalled(self) -> str | None:
        """None while the loop stamps in time; else the reason liveness fails."""
        silent_s = time.monotonic() - self._stamped_at
        if silent_s <= self.stall_s:
            return None
        return (f"the handler loop has not run for {silent_s:.0f}s (more than "
                f"{self._setting}={self.stall_s:g}): something blocks it")


def create_health_app(
    checks: dict[str, Check],
    reasons: Callable[[], dict[str, str]] | None = None,
    liveness: Liveness | None = None,
) -> Starlette:
    """``checks``: name → a callable that is True when that dependency is usable;
    ``reasons``: why the worker is holding work, if it is (shown by ``/readyz``);
    ``liveness``: None while the worker is alive, else why not (``/healthz`` fails)."""

    async def healthz(request: Request) -> Response:
        stalled = liveness() if liveness is not None else None
        if stalled is not None:
            return JSONResponse({"status": "stalled", "reason": stalled}, status_code=503)
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
