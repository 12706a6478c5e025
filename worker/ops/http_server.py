"""An ASGI app served by uvicorn on a background thread (the sandbox, the health port)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def uvicorn_config(app: Any, **overrides: Any) -> uvicorn.Config:
    settings: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,  # at >1000 requests/s an access log costs more than the app
        "lifespan": "off",
        "timeout_graceful_shutdown": 1,
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


class BackgroundServer:
    """``port=0`` binds a free port, known as soon as :meth:`start` returns.

    ``config`` holds uvicorn settings that differ from :func:`uvicorn_config`'s.
    """

    def __init__(
        self, app: Any, host: str, port: int, name: str, config: dict[str, Any] | None = None
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self._config = config or {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind, serve in a daemon thread, and return once requests are answered."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} server already started")
        # Binding here, not in uvicorn, tells us the port picked for port 0 before serving.
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # without it Nagle + delayed ACKs hold each response ~40 ms (about 20 requests/s).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn_config(self.app, **self._config))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        self._wait_started()

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        self._server = self._thread = None

    def _wait_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        # uvicorn offers no "started" callback; polling a flag it sets is the supported way.
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} server did not start")
            time.sleep(0.005)
