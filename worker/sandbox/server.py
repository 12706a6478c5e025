"""Running the sandbox: in a background thread for tests, or in the foreground for a CLI."""

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn

from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig
from worker.sandbox.state import SandboxState

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


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
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """e.g. `http://127.0.0.1:54321`; valid once started."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind, serve in a daemon thread, and return once requests are answered."""
        if self._server is not None:
            raise RuntimeError("sandbox server already started")
        # Binding here, not in uvicorn, tells us the port picked for port 0 before serving.
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # without it Nagle + delayed ACKs hold each response ~40 ms (about 20 requests/s).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(create_app(self.config, self.state)))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="sandbox", daemon=True
        )
        self._thread.start()
        self._wait_started()

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(_STOP_TIMEOUT_S)
        self._server = self._thread = None

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

    def _wait_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        # uvicorn offers no "started" callback; polling a flag it sets is the supported way.
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("sandbox server did not start")
            time.sleep(0.005)


def _uvicorn_config(app: object, **overrides: object) -> uvicorn.Config:
    settings: dict[str, object] = {
        "log_level": "warning",
        "access_log": False,  # at >1000 requests/s an access log costs more than the app
        "lifespan": "off",
        "timeout_graceful_shutdown": 1,
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)  # type: ignore[arg-type]


def serve(host: str = "127.0.0.1", port: int = 8900, config: SandboxConfig | None = None) -> None:
    """Serve the sandbox in the foreground until interrupted (Ctrl-C)."""
    app = create_app(config if config is not None else SandboxConfig())
    uvicorn.Server(_uvicorn_config(app, host=host, port=port, log_level="info")).run()
