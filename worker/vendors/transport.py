"""The HTTP client of one vendor account: httpx requests and responses, sent straight to
a transport over aiohttp's connection pool.

``httpx.AsyncClient`` on its own transport (httpcore on anyio) spends most of a request's
CPU in cancel scopes, locks and a walk of the whole pool per request (encode/httpx#3215);
aiohttp's pool costs a fraction of that, and sending straight to it skips the client's
layers (cookie jar, auth and redirect flows, URL merging), none of which a vendor call
uses: auth is ours, redirects are refused and no vendor sets cookies. That CPU is what
bounds commands per second; the figures, and the command that measures them
(``python -m bench.http_clients``), are in ``bench/README.md``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport

USER_AGENT = "command-relay/0.1"
# Uncompressed answers: a compressed one could inflate far past the body limit in one read.
BASE_HEADERS = {
    "User-Agent": USER_AGENT,
    "3rd-integration": "command-relay",
    "Accept-Encoding": "identity",
}
TOO_LARGE_HEADER = "x-relay-body-too-large"  # set on an answer whose body was dropped
# Headers that describe the body as it came over the wire, not as it is kept.
WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class VendorClient:
    """Sends one request and reads the whole answer; a redirect is returned, not followed
    (it could lead to a host no setting named)."""

    def __init__(
        self,
        connections: int,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None,
        max_body_bytes: int,
    ) -> None:
        """``transport`` lets tests swap the network; the aiohttp session behind the
        default one is made on first use, inside the handler loop. An answer's body is
        kept up to ``max_body_bytes`` (decoded); a larger one is dropped, and the answer
        carries the ``x-relay-body-too-large`` header instead."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._transport = transport or AiohttpTransport(limits=limits, trust_env=False)
        self._timeout = httpx.Timeout(timeout_s).as_dict()
        self._max_body_bytes = max_body_bytes

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        request = httpx.Request(
            method,
            _parsed(url),
            json=json,
            data=data,
            headers={**BASE_HEADERS, **(headers or {})},
            extensions={"timeout": self._timeout},
        )
        response = await self._transport.handle_async_request(request)
        try:
            return await self._bounded(request, response)
        finally:
            await response.aclose()

    async def _bounded(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        """The answer with its body read, but never more than the limit of it."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self._max_body_bytes:
                break
            chunks.append(chunk)
        if size <= self._max_body_bytes and not response.headers.get("content-encoding"):
            response._content = b"".join(chunks)  # what aread() would have set
            return response
        headers = [(k, v) for k, v in response.headers.multi_items() if k not in WIRE_HEADERS]
        if size > self._max_body_bytes:
            headers.append((TOO_LARGE_HEADER, str(self._max_body_bytes)))
            chunks = []
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=b"".join(chunks),
            request=request,
            extensions=response.extensions,
        )

    async def post(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("POST", url, **options)

    async def aclose(self) -> None:
        await self._transport.aclose()


@lru_cache(maxsize=1024)
def _parsed(url: str) -> httpx.URL:
    """Parsing a URL is half the cost of building a request; an account calls few URLs
    (httpx.URL is immutable, so one parsed copy serves every request)."""
    return httpx.URL(url)
