"""Connections to one vendor account, spread over several small httpx clients.

One large pool scales badly: httpcore's bookkeeping for every request walks the whole
pool (encode/httpx#3215), so with 100 connections most of the worker's CPU went there.
Requests are handed to small clients in turn instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import httpx

CONNECTIONS_PER_CLIENT = 10


class ClientPool:
    def __init__(
        self, make_client: Callable[[int], httpx.AsyncClient], connections: int
    ) -> None:
        """``make_client(n)``: a client with at most ``n`` connections."""
        count = max(1, -(-connections // CONNECTIONS_PER_CLIENT))  # ceiling division
        per_client = -(-connections // count)
        self._clients = [make_client(per_client) for _ in range(count)]
        self._next = itertools.cycle(self._clients)

    async def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        return await next(self._next).request(method, url, **options)

    async def post(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("POST", url, **options)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
