"""``command-relay check --probe``: ask everything the configuration names whether it
answers: the broker (and the depth of the command and dead-letter queues), the stores,
and each vendor account's token endpoint (a token is fetched and thrown away).

Each probe gives one line; a failed one says what to fix. Nothing is sent to a vendor but
a token request, and no token, password or secret is printed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from kombu import Connection

from worker.admin import UserError
from worker.admin.config import Problem, env_name, safe_url
from worker.admin.mistakes import broker_mistake
from worker.broker.connection import connect
from worker.errors import PermanentFailure, RelayError
from worker.idempotency import REDIS_SCHEMES, open_store
from worker.settings import EsetAccount, FylrAccount, Settings, TlsFiles
from worker.vendors import eset, fylr
from worker.vendors.auth import OAuthToken
from worker.vendors.transport import VendorClient

PROBE_TIMEOUT_S = 10.0


def probe(settings: Settings) -> list[Problem]:
    """One line per thing probed: ``ok`` when it answered, else an error with its fix."""
    return [_probe_broker(settings), *asyncio.run(_probe_async(settings))]


def _probe_broker(settings: Settings) -> Problem:
    name = "RELAY_BROKER_URL"
    url = settings.broker_url
    try:
        with connect(url, heartbeat_s=0, tls=settings.tls.broker) as connection:
            connection.connect()
            depths = [
                _depth(connection, queue)
                for queue in (settings.command_queue, settings.dead_letter_queue)
            ]
    except Exception as error:
        mistake = broker_mistake(error, url)
        if mistake is None:
            raise
        return Problem("error", name, mistake.problem, mistake.fix)
    return Problem("ok", name, f"{safe_url(url)} answers; {'; '.join(depths)}", "")


def _depth(connection: Connection, queue: str) -> str:
    channel = connection.channel()
    try:
        count = channel.queue_declare(queue=queue, passive=True).message_count
    except connection.channel_errors:
        return f"{queue}: not declared yet (the worker declares it when it starts)"
    finally:
        channel.close()
    return f"{queue}: {count} message(s)"


async def _probe_async(settings: Settings) -> list[Problem]:
    results = [await _probe_store(settings)]
    if settings.rate_limit_url.startswith(REDIS_SCHEMES):
        results.append(await _probe_redis(
            "RELAY_RATE_LIMIT_URL", settings.rate_limit_url, settings.tls.redis
        ))
    timeout_s = min(settings.http_timeout_s, PROBE_TIMEOUT_S)
    client = VendorClient(1, timeout_s, None, settings.max_response_bytes, settings.tls)
    try:
        for tenant_name, tenant in sorted(settings.tenants.items()):
            if tenant.eset is not None:
                results.append(await _probe_token(
                    env_name(("tenants", tenant_name, "eset")),
                    _eset_token(client, settings, tenant.eset),
                ))
            if tenant.fylr is not None:
                results.append(await _probe_token(
                    env_name(("tenants", tenant_name, "fylr")),
                    _fylr_token(client, settings, tenant.fylr),
                ))
            if tenant.spaaza is not None:
                results.append(Problem(
                    "ok", env_name(("tenants", tenant_name, "spaaza")),
                    "not probed: Spaaza's token is sent as configured, there is no token "
                    "endpoint to ask", "",
                ))
    finally:
        await client.aclose()
    return results


async def _probe_store(settings: Settings) -> Problem:
    name = "RELAY_IDEMPOTENCY_URL"
    url = settings.idempotency_url
    try:
        store = open_store(
            url, settings.claim_lease_s, settings.idempotency_retention_s, settings.tls.redis
        )
        try:
            await asyncio.wait_for(store.ping(), PROBE_TIMEOUT_S)
        finally:
            await store.close()
    except Exception as error:  # whatever the store raised: it did not answer
        return Problem(
            "error", name, f"{safe_url(url)} does not answer ({_reason(error)})",
            f"start it, or fix {name}",
        )
    return Problem("ok", name, f"{safe_url(url)} answers", "")


async def _probe_redis(name: str, url: str, tls: TlsFiles) -> Problem:
    from redis.asyncio import Redis  # the redis extra, there when the URL is Redis's

    from worker.idempotency.redis import tls_options

    redis = Redis.from_url(url, socket_timeout=PROBE_TIMEOUT_S,
                           socket_connect_timeout=PROBE_TIMEOUT_S, **tls_options(url, tls))
    try:
        await redis.ping()
    except Exception as error:
        return Problem(
            "error", name, f"{safe_url(url)} does not answer ({_reason(error)})",
            f"start it, or fix {name}",
        )
    finally:
        await redis.aclose()
    return Problem("ok", name, f"{safe_url(url)} answers", "")


def _eset_token(client: VendorClient, settings: Settings, account: EsetAccount) -> OAuthToken:
    return OAuthToken(
        client,
        eset.token_url(settings.eset_host_template, account),
        {"grant_type": "password", "username": account.username, "password": account.password},
        vendor="eset",
    )


def _fylr_token(client: VendorClient, settings: Settings, account: FylrAccount) -> OAuthToken:
    return OAuthToken(
        client, fylr.token_url(account), fylr.grant(account), vendor="fylr",
        client_fields=fylr.client(account),
    )


async def _probe_token(name: str, token: OAuthToken) -> Problem:
    fetch: Callable[[], Awaitable[str]] = token.authorization
    try:
        await asyncio.wait_for(fetch(), PROBE_TIMEOUT_S)
    except PermanentFailure as error:
        return Problem("error", name, error.message, "check the account's user and secrets")
    except Exception as error:  # unreachable, timed out, an answer without a token
        return Problem(
            "error", name, f"no token ({_reason(error)})",
            "check the account's host and that it is reachable from here",
        )
    return Problem("ok", name, "a token was issued", "")


def _reason(error: BaseException) -> str:
    if isinstance(error, UserError):
        return error.problem
    if isinstance(error, RelayError):
        return error.message
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:120]
