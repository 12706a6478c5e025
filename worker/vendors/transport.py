"""The HTTP client every vendor account uses: the httpx API over aiohttp's connection pool.

httpx's own async transport (httpcore on anyio) costs about 1 ms of CPU per request on a
2-core machine, most of it in cancel scopes, locks and a pool walk per request
(encode/httpx#3215). The same requests through aiohttp's pool, via httpx-aiohttp, cost
about 0.45 ms, and that CPU is what limits commands per second. Requests, responses,
timeouts and errors stay httpx's, so the rest of the worker does not know the difference.
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

USER_AGENT = "command-relay/0.1"


def vendor_client(
    connections: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A client for one vendor account; ``transport`` lets tests swap the network."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        timeout=timeout_s,
        limits=limits,
        headers={"User-Agent": USER_AGENT, "3rd-integration": "command-relay"},
        # The aiohttp session is made on first use, inside the handler loop.
        transport=transport or AiohttpTransport(limits=limits, trust_env=False),
        follow_redirects=False,  # a redirect could lead to a host no setting named
        trust_env=False,  # proxies and CA bundles come from settings, not the environment
    )
