"""The sandbox server's client connections, which an endpoint may take over to send a
hostile answer as raw bytes.

Why a takeover: uvicorn (h11) refuses what real vendors and the boxes in front of them do
send (CR, LF or NUL in a header value, a status line dripped byte by byte, a connection
closed without any answer), and ASGI has no way to say it. So the sandbox's server runs
uvicorn's own HTTP/1.1 protocol, extended only to keep a `RawChannel` per connection,
found by the peer address that is also the request's ASGI `client`. An endpoint that
serves a hostile fault writes its bytes on the channel and closes it; uvicorn then sees
the connection lost and drops the ASGI response the endpoint still returns (its cycle is
`disconnected`). Every other call is served by uvicorn as usual, on the same routes and
state: there is no second listener and no proxy in the path.

Everything here runs on the server's event loop.
"""

import asyncio
import socket
import struct
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

Peer = tuple[str, int]


class RawChannel:
    """One client connection, written to directly once an endpoint takes it over."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._writable = asyncio.Event()
        self._writable.set()
        self._gone = asyncio.Event()
        self._taken = False

    @property
    def lost(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._gone.is_set()

    def write(self, data: bytes) -> None:
        """Queue `data`, as is; the first write takes the connection over from uvicorn."""
        if not self._taken:
            self._taken = True
            # Pause as soon as anything is left unsent, so `drained` means "all on the wire":
            # a reset must not throw away bytes the answer says were sent.
            self._transport.set_write_buffer_limits(high=0)
        self._transport.write(data)

    async def drained(self) -> None:
        """Return once everything written has left (or the connection is gone)."""
        await self._writable.wait()

    async def end(self, *, abortive: bool) -> None:
        """Close the connection after what was written: with FIN, or with RST if `abortive`.

        Returns once the server has seen the connection lost: uvicorn then marks the
        request's cycle disconnected and does not try to send its ASGI response (a write
        on the closed transport would be dropped anyway).
        """
        await self.drained()
        if abortive and not self.lost:
            sock = self._transport.get_extra_info("socket")
            # SO_LINGER on, 0 s: close() sends RST and discards nothing already sent.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.close()
        await self._gone.wait()

    # --- called by the protocol ---

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self) -> None:
        self._gone.set()
        self._writable.set()  # nothing waits for a buffer that will never drain


class Connections:
    """The open connections of one sandbox server, by peer address."""

    def __init__(self) -> None:
        self._by_peer: dict[Peer, RawChannel] = {}

    def channel_for(self, client: Any) -> RawChannel | None:
        """The connection of a request whose ASGI `client` is `client`, if this server holds it."""
        if not isinstance(client, tuple | list) or len(client) != 2:
            return None
        return self._by_peer.get((str(client[0]), int(client[1])))

    def opened(self, peer: Peer | None, channel: RawChannel) -> None:
        if peer is not None:
            self._by_peer[peer] = channel

    def closed(self, peer: Peer | None, channel: RawChannel) -> None:
        if peer is not None and self._by_peer.get(peer) is channel:
            del self._by_peer[peer]


def takeover_protocol(connections: Connections) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, keeping each connection's `RawChannel` in `connections`.

    Pass it as uvicorn's `http`, with `proxy_headers=False` (a forwarded-for header must
    not change the `client` a channel is found by).
    """

    class TakeoverProtocol(H11Protocol):
        _channel: RawChannel

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._channel = RawChannel(transport)
            connections.opened(self.client, self._channel)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.closed(self.client, self._channel)
            self._channel.connection_lost()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            self._channel.pause_writing()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._channel.resume_writing()

    return TakeoverProtocol
