"""Script calls batched into pipelines, against a real Redis: each call gets its own
answer or error, scripts Redis has forgotten are loaded again, and one loop turn's calls
go out together."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from worker.idempotency.batch import ScriptBatcher

ECHO_OR_FAIL = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


Scenario = Callable[[Redis, ScriptBatcher, AsyncScript], Awaitable[None]]


def run_with_redis(redis_url: str, scenario: Scenario) -> None:
    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            # A script of its own (the comment changes its SHA), which Redis has never seen.
            source = f"-- {uuid.uuid4()}\n{ECHO_OR_FAIL}"
            await scenario(redis, ScriptBatcher(redis), redis.register_script(source))
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_concurrent_calls_each_get_their_own_answer_in_one_pipeline(redis_url: str) -> None:
    prefix = f"test-batch-{uuid.uuid4()}"

    async def scenario(redis: Redis, batcher: ScriptBatcher, script: AsyncScript) -> None:
        pipelines = 0
        real_pipeline = redis.pipeline

        def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
            nonlocal pipelines
            pipelines += 1
            return real_pipeline(*args, **kwargs)

        redis.pipeline = counting_pipeline  # type: ignore[method-assign]
        answers = await asyncio.gather(
            *(batcher.call(script, [f"{prefix}:{n}"], [f"value-{n}"]) for n in range(50))
        )
        assert answers == [f"value-{n}".encode() for n in range(50)]
        assert await redis.get(f"{prefix}:49") == b"value-49"
        # The first pipeline met unknown scripts and was resent after loading them.
        assert pipelines == 2
        await asyncio.gather(*(batcher.call(script, [f"{prefix}:x{n}"], ["v"]) for n in range(50)))
        assert pipelines == 3
        await redis.delete(*(f"{prefix}:{n}" for n in range(50)))
        await redis.delete(*(f"{prefix}:x{n}" for n in range(50)))

    run_with_redis(redis_url, scenario)


def test_an_error_reaches_only_the_call_that_caused_it(redis_url: str) -> None:
    key = f"test-batch-{uuid.uuid4()}"

    async def scenario(redis: Redis, batcher: ScriptBatcher, script: AsyncScript) -> None:
        good, bad = await asyncio.gather(
            batcher.call(script, [key], ["fine"]),
            batcher.call(script, [key], ["fail"]),
            return_exceptions=True,
        )
        assert good == b"fine"
        assert isinstance(bad, ResponseError) and "asked to fail" in str(bad)
        await redis.delete(key)

    run_with_redis(redis_url, scenario)


def test_scripts_flushed_from_redis_are_loaded_again(redis_url: str) -> None:
    key = f"test-batch-{uuid.uuid4()}"

    async def scenario(redis: Redis, batcher: ScriptBatcher, script: AsyncScript) -> None:
        assert await batcher.call(script, [key], ["before"]) == b"before"
        await redis.script_flush()  # what a Redis restart does to loaded scripts
        assert await batcher.call(script, [key], ["after"]) == b"after"
        await redis.delete(key)

    run_with_redis(redis_url, scenario)


def test_a_lost_connection_fails_every_call_of_the_batch() -> None:
    async def scenario() -> None:
        redis = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
        batcher = ScriptBatcher(redis)
        script = redis.register_script(ECHO_OR_FAIL)
        results = await asyncio.gather(
            *(batcher.call(script, ["k"], ["v"]) for _ in range(3)), return_exceptions=True
        )
        assert len(results) == 3
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        await redis.aclose()

    asyncio.run(scenario())
