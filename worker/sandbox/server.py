"""Running the sandbox: in a background thread for tests, or in the foreground for a CLI."""

from types import TracebackType
from typing import Any, Self

import uvicorn

from worker.ops.http_server import BackgroundServer, uvicorn_config
from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig
from worker.sandbox.connections import takeover_protocol
from worker.sandbox.faults import Faults
from worker.sandbox.state import SandboxState


def _server_settings(state: SandboxState) -> dict[str, Any]:
    """uvicorn settings of a sandbox: connections a hostile fault can take over, found by
    the socket's peer address (never by a forwarded-for header)."""
    return {"http": takeover_protocol(state.connections), "proxy_headers": False}


class SandboxServer:
    """A sandbox served by uvicorn in a daemon thread; a context manager.

    `port=0` binds a free port, known as soon as `start()` returns (see `base_url`).
    `state` is the live state: read `state.stats()`, set `state.faults` directly.
    """

    def __init__(
        self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self.state = SandboxState(self.config)
        self._server = BackgroundServer(
            create_app(self.config, self.state), host, port, "sandbox",
            _server_settings(self.state),
        )

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        """e.g. `http://127.0.0.1:54321`; valid once started."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind, serve in a daemon thread, and return once requests are answered."""
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    host: str = "127.0.0.1",
    port: int = 8900,
    config: SandboxConfig | None = None,
    faults: Faults | None = None,
) -> None:
    """Serve the sandbox in the foreground until interrupted (Ctrl-C), with `faults` on."""
    config = config if config is not None else SandboxConfig()
    state = SandboxState(config)
    if faults is not None:
        state.faults = faults
    settings = {"host": host, "port": port, "log_level": "info", **_server_settings(state)}
    uvicorn.Server(uvicorn_config(create_app(config, state), **settings)).run()
