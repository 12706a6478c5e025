"""Vendor answers are read within a bound: a body past the limit is dropped, not held."""

from __future__ import annotations

import asyncio
import gzip

import httpx

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
