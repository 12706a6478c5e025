"""`/_sandbox/*`: unauthenticated controls for tests and demos in other processes."""

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.sandbox.faults import Faults
from worker.sandbox.state import SandboxState

_FAULTS = TypeAdapter(Faults)


class Control:
    """The control routes over one sandbox state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        """Stats, faults (read and replace), reset and token revocation."""
        return [
            Route("/_sandbox/stats", self._stats, methods=["GET"]),
            Route("/_sandbox/faults", self._get_faults, methods=["GET"]),
            Route("/_sandbox/faults", self._put_faults, methods=["PUT"]),
            Route("/_sandbox/reset", self._reset, methods=["POST"]),
            Route("/_sandbox/revoke-tokens", self._revoke_tokens, methods=["POST"]),
        ]

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(self._state.stats())

    async def _get_faults(self, request: Request) -> Response:
        return Response(_FAULTS.dump_json(self._state.faults), media_type="application/json")

    async def _put_faults(self, request: Request) -> Response:
        try:
            faults = _FAULTS.validate_json(await request.body())
        except ValidationError as error:
            return Response(error.json(), 422, media_type="application/json")
        self._state.set_faults(faults)
        return Response(_FAULTS.dump_json(faults), media_type="application/json")

    async def _reset(self, request: Request) -> Response:
        self._state.reset()
        return JSONResponse({})

    async def _revoke_tokens(self, request: Request) -> Response:
        self._state.revoke_tokens()
        return JSONResponse({})
