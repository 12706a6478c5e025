"""CPU per vendor request of three HTTP client set-ups, against the sandbox in a process of
its own (what led to ``worker/vendors/transport.py``):

    python -m bench.http_clients [--requests 5000] [--concurrency 32]

- ``httpx.AsyncClient``: httpx's own async transport (httpcore on anyio);
- ``httpx.AsyncClient`` over httpx-aiohttp's transport;
- the worker's ``VendorClient``: httpx requests straight to that transport.

All on the loop the worker uses (uvloop where installed); POSTs of the ESET batch delete.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from httpx_aiohttp import AiohttpTransport

from bench.rig.procs import Procs
from bench.rig.sandbox import SandboxProcess
from bench.vendor import batch_delete_url, eset_authorization
from worker.runtime import new_event_loop
from worker.settings import Settings
from worker.vendors.transport import VendorClient

BODY = {"objectUuids": ["8f5c2f3e-0000-4000-8000-000000000001"]}
Send = Callable[[str], Awaitable[int]]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, send: Send, url: str, requests: int, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}

    async def one() -> None:
        async with slots:
            status = await send(url)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(min(300, requests))))  # warm the pools
    statuses.clear()
    cpu_before, started = cpu_s(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    cpu_ms = (cpu_s() - cpu_before) * 1000 / requests
    rate = requests / (time.perf_counter() - started)
    print(f"{name:40s} {rate:7.0f} requests/s  {cpu_ms:.3f} ms CPU per request  {statuses}")


async def run(url: str, headers: dict[str, str], requests: int, concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    plain = httpx.AsyncClient(limits=limits, timeout=10)
    over_aiohttp = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=10)
    vendor = VendorClient(concurrency, 10, None, Settings().max_response_bytes)

    async def with_client(client: httpx.AsyncClient, target: str) -> int:
        return (await client.post(target, json=BODY, headers=headers)).status_code

    async def with_vendor_client(target: str) -> int:
        return (await vendor.post(target, json=BODY, headers=headers)).status_code

    await measure("httpx.AsyncClient (httpcore)", lambda t: with_client(plain, t), url,
                  requests, concurrency)
    await measure("httpx.AsyncClient over AiohttpTransport", lambda t: with_client(over_aiohttp, t),
                  url, requests, concurrency)
    await measure("VendorClient (the worker's)", with_vendor_client, url, requests, concurrency)
    for closing in (plain.aclose(), over_aiohttp.aclose(), vendor.aclose()):
        await closing


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs, Procs(Path(logs)) as procs:
        base_url = SandboxProcess(procs, rate_limited=False).base_url
        with httpx.Client() as client:
            headers = eset_authorization(client, base_url)
        loop = new_event_loop()
        try:
            loop.run_until_complete(
                run(batch_delete_url(base_url), headers, args.requests, args.concurrency)
            )
        finally:
            loop.close()


if __name__ == "__main__":
    main()
