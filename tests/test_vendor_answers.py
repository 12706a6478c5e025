"""Vendor answers are read within a bound: a body past the limit is dropped, not held."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest

from worker.redaction import Redactor
from worker.vendors.sender import read_reply
from worker.vendors.transport import TOO_LARGE_HEADER, VendorClient


def answer_with(response: httpx.Response, limit: int) -> httpx.Response:
    async def main() -> httpx.Response:
        client = VendorClient(1, 5.0, httpx.MockTransport(lambda request: response), limit)
        try:
            return await client.request("GET", "https://vendor.example/x")
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_body_within_the_limit_is_kept() -> None:
    response = answer_with(httpx.Response(200, json={"ok": True}), limit=1024)
    assert read_reply("eset", response, None, Redactor()).body == {"ok": True}


def test_a_body_over_the_limit_is_dropped_and_the_answer_says_so() -> None:
    response = answer_with(httpx.Response(200, content=b"x" * 5000), limit=1024)
    assert response.headers[TOO_LARGE_HEADER] == "1024"
    assert response.status_code == 200
    assert "over 1024 bytes" in read_reply("eset", response, None, Redactor()).body


def test_a_compressed_body_is_bounded_by_its_decoded_size() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)  # about 50 KB that inflate to 50 MB
    response = answer_with(
        httpx.Response(200, content=bomb, headers={"content-encoding": "gzip"}), limit=4096
    )
    assert TOO_LARGE_HEADER in response.headers
    assert len(response.content) == 0


async def serve_then_hang_up(requests: list[bytes]) -> asyncio.Server:
    """A vendor that answers its first request and closes the (kept-alive) connection on
    the second without answering; any later request is answered again."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            requests.append(head)
            if len(requests) == 2:
                break  # hang up: no answer to this one
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(client, "127.0.0.1", 0)


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_a_request_whose_connection_closed_unanswered_is_not_sent_again_by_the_client(
    method: str,
) -> None:
    """aiohttp would resend a GET or PUT on its own; each send must be one the worker
    counted and gated (its retry policy decides)."""
    requests: list[bytes] = []

    async def main() -> type[Exception]:
        server = await serve_then_hang_up(requests)
        port = server.sockets[0].getsockname()[1]
        client = VendorClient(1, 5.0, None, 1024)
        try:
            await client.request(method, f"http://127.0.0.1:{port}/x")
            with pytest.raises(httpx.TransportError) as lost:
                await client.request(method, f"http://127.0.0.1:{port}/x")
            return type(lost.value)
        finally:
            await client.aclose()
            server.close()

    assert asyncio.run(main()) is httpx.RemoteProtocolError
    assert len(requests) == 2
