"""The HTTP client of one vendor account: httpx requests and responses, sent straight to
a transport over aiohttp's connection pool.

``httpx.AsyncClient`` on its own transport (httpcore on anyio) spends most of a request's
CPU in cancel scopes, locks and a walk of the whole pool per request (encode/httpx#3215);
aiohttp's pool costs a fraction of that, and sending straight to it skips the client's
layers (cookie jar, auth and redirect flows, URL merging), none of which a vendor call
uses: auth is ours, redirects are refused and no vendor sets cookies. That CPU is what
bounds commands per second; the figures, and the command that measures them
(``python -m bench.http_clients``), are in ``bench/README.md``.

TLS: a vendor's certificate and host name are checked with certifi's CAs, or only with
those of ``RELAY_VENDOR_TLS_CA_FILE``; with ``RELAY_VENDOR_PROXY_URL`` calls go through
that proxy (a CONNECT tunnel, so TLS still ends at the vendor); no proxy or CA is taken
from the environment. A refused certificate fails the call for good
(:func:`transport_failure`): retrying would meet the same certificate.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from functools import lru_cache
from typing import Any

import aiohttp
import httpx
from aiohttp import ClientSession
from aiohttp.http_exceptions import HttpProcessingError
from httpx_aiohttp import AiohttpTransport

from schemas.events import ErrorCode
from worker.errors import (
    PermanentFailure,
    RelayError,
    TransientFailure,
    certificate_reason,
    refused_certificate,
)
from worker.settings import TlsSettings

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
        tls: TlsSettings | None = None,
    ) -> None:
        """``transport`` lets tests swap the network; the aiohttp session behind the
        default one is made on first use, inside the handler loop. An answer's body is
        kept up to ``max_body_bytes`` (decoded); a larger one is dropped, and the answer
        carries the ``x-relay-body-too-large`` header instead. ``tls`` (``Settings.tls``):
        the CAs vendor certificates are checked with and the proxy calls go through;
        None: certifi's CAs, no proxy."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._transport = transport or OneTryTransport(
            verify=_verify(tls), proxy=_proxy(tls), limits=limits, trust_env=False
        )
        self._timeout = httpx.Timeout(timeout_s).as_dict()
        self._timeout_s = timeout_s
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
        try:
            # The whole exchange, not each read: a vendor dripping its headers or body a
            # byte at a time would otherwise hold the call (and the command) for ever.
            async with asyncio.timeout(self._timeout_s):
                response = await self._transport.handle_async_request(request)
                try:
                    return await self._bounded(request, response)
                finally:
                    await response.aclose()
        except httpx.ConnectTimeout as error:
            if isinstance(error.__cause__, aiohttp.ServerDisconnectedError):
                # httpx-aiohttp calls a connection closed before the answer a connect
                # timeout; it is not: the request may have reached the vendor.
                raise httpx.RemoteProtocolError(
                    "the vendor closed the connection before answering", request=request
                ) from error
            raise
        except TimeoutError as error:
            raise httpx.ReadTimeout(
                f"no whole answer within {self._timeout_s:g}s", request=request
            ) from error
        except (aiohttp.ClientError, HttpProcessingError, OSError, ValueError) as error:
            # An answer aiohttp could not read (a 64 KB header, 2,000 headers, a broken
            # status line), or a request it refused to write: the exchange failed, as a
            # reset would have (httpx-aiohttp maps only some of these).
            raise httpx.RemoteProtocolError(
                f"{type(error).__name__}: the exchange failed", request=request
            ) from error

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


class OneTryTransport(AiohttpTransport):
    """httpx-aiohttp's transport on a session that never sends a request again by itself.
    aiohttp resends a GET or a PUT (Spaaza's update) once when a kept-alive connection
    closes before the answer: a call the vendor may have acted on, uncounted and past
    the claim's gate. The worker's own retry policy is the only one."""

    def get_client(self) -> ClientSession:
        session = super().get_client()
        session._retry_connection = False  # aiohttp 3 has no public switch for it
        return session


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError, httpx.UnsupportedProtocol)


def transport_failure(where: str, error: httpx.TransportError) -> RelayError:
    """What an exchange that got no answer means: a refused certificate fails for good
    (with what to fix), anything else (refused, reset, timed out) may pass. The message
    says whether the request can have reached the vendor."""
    refusal = refused_certificate(error)
    if refusal is not None:
        return PermanentFailure(
            ErrorCode.VENDOR_UNAVAILABLE,
            f"{where} presented a TLS certificate that was refused "
            f"({certificate_reason(refusal)}); if a private CA (or a TLS-inspecting proxy) "
            "signs it, set RELAY_VENDOR_TLS_CA_FILE to that CA's PEM file, else check the "
            "tenant's host",
        )
    if isinstance(error, NOT_SENT):
        what = f"{where} could not be reached ({type(error).__name__})"
    else:
        what = (f"no whole answer came back from {where} ({type(error).__name__}); the "
                "request may have reached it")
    return TransientFailure(ErrorCode.VENDOR_UNAVAILABLE, what)


def _verify(tls: TlsSettings | None) -> ssl.SSLContext | bool:
    """True: httpx's default (certifi's CAs, names checked); else a context with only the
    configured CAs (names checked as well)."""
    if tls is None or tls.vendor_ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(tls.vendor_ca_file))


def _proxy(tls: TlsSettings | None) -> httpx.Proxy | None:
    """The proxy, the credentials of its URL sent as a ``Proxy-Authorization`` header
    (aiohttp deprecates its ``proxy_auth``, which httpx-aiohttp would use for them)."""
    if tls is None or tls.vendor_proxy_url is None:
        return None
    url = httpx.URL(tls.vendor_proxy_url.get_secret_value())
    if not (url.username or url.password):
        return httpx.Proxy(url)
    credentials = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
    return httpx.Proxy(
        url.copy_with(username=None, password=None),
        headers={"Proxy-Authorization": f"Basic {credentials}"},
    )


@lru_cache(maxsize=1024)
def _parsed(url: str) -> httpx.URL:
    """Parsing a URL is half the cost of building a request; an account calls few URLs
    (httpx.URL is immutable, so one parsed copy serves every request)."""
    return httpx.URL(url)
