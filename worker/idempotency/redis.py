"""The Redis backend of the idempotency store, for a fleet of replicas.

One hash per key; the claim is a Lua script so that read-decide-write is one atomic step
on the server. Keys expire after the retention period (``PEXPIRE``).
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.events import ResultEvent
from worker.errors import StoreUnavailable
from worker.idempotency.batch import ScriptBatcher
from worker.idempotency.store import Claimed, ClaimResult, _decide

# Redis away (refused, reset, loading, timed out): the command is held, not failed.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
SOCKET_TIMEOUT_S = 5.0  # a Redis that accepts and never answers counts as away

KEY_PREFIX = "relay:idempotency:"

# Returns {} when the caller took a free key, {'taken', sent, response_id} when it took over
# from a dead holder, else the existing record's fields.
CLAIM_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'owner', 'lease_until', 'event',
                          'sent', 'response_id')
local now = tonumber(ARGV[3])
if record[1] then
  if record[1] ~= ARGV[1] or record[4] or tonumber(record[3]) > now then
    return record
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'owner', ARGV[2],
           'lease_until', tostring(now + tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if record[5] == '1' then  -- the taker inherits what the dead holder may have set going
  redis.call('HSET', KEYS[1], 'sent', '1')
  if record[6] then redis.call('HSET', KEYS[1], 'response_id', record[6]) end
end
if record[1] then return {'taken', record[5] or '0', record[6] or ''} end
return {}
"""

COMPLETE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'event', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
"""

RELEASE_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'owner', 'event')
if record[1] == ARGV[1] and not record[2] then redis.call('DEL', KEYS[1]) end
"""

# ARGV: owner, then field, value pairs: set fields of the claim only while owner holds it
# unfinished; 1 when it did.
SET_IF_HOLDER_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'owner', 'event')
if record[1] == ARGV[1] and not record[2] then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  return 1
end
return 0
"""


class RedisStore:
    def __init__(self, url: str, lease_s: float, retention_s: float) -> None:
        self._redis = Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self._lease_s = lease_s
        self._retention_ms = int(retention_s * 1000)
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._complete = self._redis.register_script(COMPLETE_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._set_if_holder = self._redis.register_script(SET_IF_HOLDER_SCRIPT)
        self._batch = ScriptBatcher(self._redis)

    async def claim(self, key: str, fingerprint: str, owner: str) -> ClaimResult:
        now = time.time()
        record = await self._call(
            self._claim,
            [KEY_PREFIX + key],
            [fingerprint, owner, repr(now), repr(self._lease_s), self._retention_ms],
        )
        fields = [v.decode() if isinstance(v, bytes) else v for v in record]
        if not fields:
            return Claimed()
        if fields[0] == "taken":
            sent = fields[1] == "1"
            return Claimed(after_send=sent, response_id=(fields[2] or None) if sent else None)
        stored_fp, holder, lease_until, event, *_ = fields
        record = (stored_fp, holder, float(lease_until), event, False, None)
        return _decide(record, fingerprint, now)

    async def complete(self, key: str, owner: str, event: ResultEvent) -> None:
        await self._call(
            self._complete, [KEY_PREFIX + key], [event.model_dump_json(), self._retention_ms]
        )

    async def release(self, key: str, owner: str) -> None:
        await self._call(self._release, [KEY_PREFIX + key], [owner])

    async def renew(self, key: str, owner: str) -> None:
        lease_until = repr(time.time() + self._lease_s)
        await self._call(
            self._set_if_holder, [KEY_PREFIX + key], [owner, "lease_until", lease_until]
        )

    async def mark_sent(self, key: str, owner: str) -> bool:
        done = await self._call(self._set_if_holder, [KEY_PREFIX + key], [owner, "sent", "1"])
        return bool(done)

    async def mark_accepted(self, key: str, owner: str, response_id: str) -> bool:
        fields = [owner, "sent", "1", "response_id", response_id]
        done = await self._call(self._set_if_holder, [KEY_PREFIX + key], fields)
        return bool(done)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except UNREACHABLE as error:
            raise StoreUnavailable("idempotency", error) from error

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._batch.call(script, keys, args)
        except UNREACHABLE as error:
            raise StoreUnavailable("idempotency", error) from error

    async def close(self) -> None:
        await self._redis.aclose()

