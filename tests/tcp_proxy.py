"""A TCP proxy a test can cut: the network between one client and its server, failing.

    with TcpProxy("127.0.0.1", redis_port) as proxy:
        client_url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.cut()      # every connection closed, new ones refused
        proxy.restore()  # connections accepted again, on the same port

The proxy runs an asyncio loop on a thread of its own, so the test (and the worker under
test, in its own thread or process) go on meanwhile. Only what goes through the proxy is
cut: other clients of the same server still reach it, which is what a partition or a
broken route does to one replica.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bench.rig.procs import HOST, free_port

CHUNK_BYTES = 64 * 1024
CALL_TIMEOUT_S = 10.0
T = TypeVar("T")


class TcpProxy:
    """Forwards connections on ``port`` (a free one, kept across a cut) to the target."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()  # one task per connection
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def cut_off(self) -> bool:
        return self._server is None

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Close every connection and refuse new ones (the port is not listened on)."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._call(self._listen())

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT_S)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, HOST, self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections: they are refused from now on
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as when a route goes away mid-stream
        await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        assert this is not None
        self.connections += 1
        self._connections.add(this)
        self._writers.add(writer)
        try:
            await self._forward(reader, writer)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._connections.discard(this)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            return
        self._writers.add(upstream_writer)
        pipes = [
            asyncio.ensure_future(_pipe(reader, upstream_writer)),
            asyncio.ensure_future(_pipe(upstream_reader, writer)),
        ]
        try:
            # Either side closing (or a cut resetting both) ends the connection for both.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            upstream_writer.transport.abort()
            self._writers.discard(upstream_writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass  # the other side went away: the connection ends

