"""The ASGI app serving every emulated vendor, each under its own path prefix."""

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from worker.sandbox.answers import Vendor, to_response, vendor_error
from worker.sandbox.config import SandboxConfig
from worker.sandbox.control import Control
from worker.sandbox.eset import Eset
from worker.sandbox.fylr import Fylr
from worker.sandbox.spaaza import Spaaza
from worker.sandbox.state import SandboxState

_PREFIXES: tuple[tuple[str, Vendor], ...] = (
    ("/eset/", "eset"),
    ("/fylr/", "fylr"),
    ("/spaaza/", "spaaza"),
)


def create_app(config: SandboxConfig, state: SandboxState | None = None) -> Starlette:
    """The sandbox app over `state` (a fresh one if None), reachable as `app.state.sandbox`."""
    state = state if state is not None else SandboxState(config)
    routes = [
        *Eset(state).routes(),
        *Fylr(state).routes(),
        *Spaaza(state).routes(),
        *Control(state).routes(),
    ]
    handlers = {404: _unrouted, 405: _unrouted}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.sandbox = state
    return app


async def _unrouted(request: Request, exc: Exception) -> Response:
    """404/405 for a path or method no route serves, in the body shape of its vendor.

    An unknown ESET region or service lands here: in production its host would not exist.
    """
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    path = request.url.path
    for prefix, vendor in _PREFIXES:
        if path.startswith(prefix):
            answer = vendor_error(vendor, status, f"No {request.method} {path} here.")
            return to_response(answer, with_request_id=vendor == "eset")
    return JSONResponse({"detail": f"No {request.method} {path} here."}, status)
