"""The Redis backend of the idempotency store, for a fleet of replicas.

One hash per key; the claim is a Lua script so that read-decide-write is one atomic step
on the server. Keys expire after the retention period (``PEXPIRE``), and so does the key
of each command id (a string under ``relay:command-id:``), set by the same scripts. The
note of a key waiting for a delayed retry is a string under ``relay:retry-note:``, kept
for the retention period and deleted with the script that stores the key's result.
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
from worker.idempotency.store import Claimed, ClaimResult, RetryNote, StoredRecord, _decide
from worker.settings import TlsFiles

# Redis away (refused, reset, loading, timed out): the command is held, not failed.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
SOCKET_TIMEOUT_S = 5.0  # a Redis that accepts and never answers counts as away
TLS_SCHEME = "rediss://"

KEY_PREFIX = "relay:idempotency:"
COMMAND_ID_PREFIX = "relay:command-id:"  # -> the key the command claimed or completed
RETRY_NOTE_PREFIX = "relay:retry-note:"  # -> the key's RetryNote, as JSON
FIELDS = ("fingerprint", "owner", "lease_until", "event", "sent", "response_id")

# Returns {} when the caller took a free key, {'taken', sent, response_id} when it took over
# from a dead holder, else the existing record's fields. With KEYS[2] (the command id's
# entry) the key is recorded as that command's, unless the key is another work's.
CLAIM_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'owner', 'lease_until', 'event',
                          'sent', 'response_id')
local now = tonumber(ARGV[3])
if KEYS[2] and (not record[1] or record[1] == ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[5])
end
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

# ARGV[4] '1': the command's entry (KEYS[2]) points to this key whatever it held; '0': only
# if it held nothing (a rejection must not hide the work of the id it names).
# KEYS[3]: the key's retry note, done with once its result is stored.
COMPLETE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'event', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  else
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2], 'NX')
  end
end
redis.call('DEL', KEYS[3])
"""

# ARGV: the event id: forget the key's result only while it is that event; 1 when it did.
DISCARD_SCRIPT = """
local event = redis.call('HGET', KEYS[1], 'event')
if event and cjson.decode(event)['id'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
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


def tls_options(url: str, tls: TlsFiles | None) -> dict[str, Any]:
    """redis-py's TLS arguments for ``url``: none but for ``rediss://``, where the server's
    certificate is required and must name the URL's host whatever redis-py's defaults
    (before redis-py 6 it checked no name). ``tls`` (``Settings.tls.redis``) adds a CA
    file, trusted besides the system's CAs, and a client certificate and key."""
    if not url.startswith(TLS_SCHEME):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if tls is not None:
        files = {
            "ssl_ca_certs": tls.ca_file, "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file
        }
        options.update({name: str(path) for name, path in files.items() if path is not None})
    return options


class RedisStore:
    def __init__(
        self, url: str, lease_s: float, retention_s: float, tls: TlsFiles | None = None
    ) -> None:
        self._redis = Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
            **tls_options(url, tls),
        )
        self._lease_s = lease_s
        self._retention_ms = int(retention_s * 1000)
        self._claim = self._redis.register_script(CLAIM_SCRIPT)
        self._complete = self._redis.register_script(COMPLETE_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._set_if_holder = self._redis.register_script(SET_IF_HOLDER_SCRIPT)
        self._discard = self._redis.register_script(DISCARD_SCRIPT)
        self._batch = ScriptBatcher(self._redis)

    async def claim(
        self, key: str, fingerprint: str, owner: str, command_ref: str | None = None
    ) -> ClaimResult:
        now = time.time()
        keys = [KEY_PREFIX + key]
        if command_ref is not None:
            keys.append(COMMAND_ID_PREFIX + command_ref)
        record = await self._call(
            self._claim,
            keys,
            [fingerprint, owner, repr(now), repr(self._lease_s), self._retention_ms, key],
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

    async def complete(
        self, key: str, owner: str, event: ResultEvent, command_ref: str,
        replace_ref: bool = True,
    ) -> None:
        await self._call(
            self._complete,
            [KEY_PREFIX + key, COMMAND_ID_PREFIX + command_ref, RETRY_NOTE_PREFIX + key],
            [event.model_dump_json(), self._retention_ms, key, "1" if replace_ref else "0"],
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

    async def note_retry(self, key: str, note: RetryNote) -> None:
        try:
            await self._redis.set(RETRY_NOTE_PREFIX + key, note.to_json(),
                                  px=self._retention_ms)
        except UNREACHABLE as error:
            raise StoreUnavailable("idempotency", error) from error

    async def find(self, key: str) -> StoredRecord | None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(KEY_PREFIX + key, FIELDS)
                pipe.get(RETRY_NOTE_PREFIX + key)
                values, noted = await pipe.execute()
        except UNREACHABLE as error:
            raise StoreUnavailable("idempotency", error) from error
        fields = dict(zip(FIELDS, (_text(v) for v in values), strict=True))
        retry = RetryNote.from_json(noted)
        if fields["fingerprint"] is None:
            return None if retry is None else StoredRecord.waiting(key, retry)
        event = fields["event"]
        return StoredRecord(
            key=key,
            event=ResultEvent.model_validate_json(event) if event is not None else None,
            holder=fields["owner"] or "",
            lease_left_s=float(fields["lease_until"] or 0) - time.time(),
            sent=fields["sent"] == "1",
            response_id=fields["response_id"],
            retry=retry,
        )

    async def key_of(self, command_ref: str) -> str | None:
        try:
            return _text(await self._redis.get(COMMAND_ID_PREFIX + command_ref))
        except UNREACHABLE as error:
            raise StoreUnavailable("idempotency", error) from error

    async def discard(self, key: str, event_id: str) -> bool:
        return bool(await self._call(self._discard, [KEY_PREFIX + key], [event_id]))

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


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)
