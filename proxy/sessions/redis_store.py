"""The Redis store: one budget shared by every tether replica.

Reservation is one Lua script (check every enforced counter, then increment
all of them, or nothing), so concurrent requests on different replicas cannot
all pass before any spend is recorded. Buckets are hashes under `tether:`.
A single Redis (or a Sentinel-managed primary) is assumed: the reserve script
touches several keys, which Redis Cluster would only allow within one slot.

Any Redis failure raises `StoreUnavailable`; the caller fails closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from .budgets import Counter
from .store import Admitted, Reserved

PREFIX = "tether:"
T = TypeVar("T")

RESERVE = """
local n = tonumber(ARGV[1])
local blocked, shadow = {}, {}
for i = 1, n do
  local base = 1 + (i - 1) * 5
  local field, amount = ARGV[base + 1], tonumber(ARGV[base + 2])
  local limit, is_shadow = tonumber(ARGV[base + 3]), ARGV[base + 4]
  if limit >= 0 and amount > 0 then
    local used = tonumber(redis.call('HGET', KEYS[i], field) or '0')
    if used + amount > limit then
      if is_shadow == '1' then table.insert(shadow, i) else table.insert(blocked, i) end
    end
  end
end
if #blocked == 0 then
  for i = 1, n do
    local base = 1 + (i - 1) * 5
    redis.call('HINCRBY', KEYS[i], ARGV[base + 1], tonumber(ARGV[base + 2]))
    local ttl = tonumber(ARGV[base + 5])
    if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
return {blocked, shadow}
"""

# KEYS: the n counters' buckets, then the session's trip key and its bucket.
# ARGV: n, five per counter (as RESERVE), then now, the session ttl, max age (-1: not
# asked), enforce age ('1'/'0'). Returns {trip note or false, first_seen or false,
# reserve's answer or false}.
ADMIT = """
local n = tonumber(ARGV[1])
local note = redis.call('GET', KEYS[n + 1])
if note then return {note, false, false} end
local at = 2 + n * 5
local max_age = tonumber(ARGV[at + 2])
local first = false
if max_age >= 0 then
  local session, ttl = KEYS[n + 2], tonumber(ARGV[at + 1])
  redis.call('HSETNX', session, 'first_seen', ARGV[at])
  if redis.call('TTL', session) < ttl then redis.call('EXPIRE', session, ttl) end
  first = redis.call('HGET', session, 'first_seen')
  if ARGV[at + 3] == '1' and tonumber(ARGV[at]) - tonumber(first) > max_age then
    return {false, first, false}
  end
end
""" + RESERVE.replace("return {blocked, shadow}", "return {false, first, {blocked, shadow}}") \
    + """
"""

OBSERVE = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return {count, redis.call('LRANGE', KEYS[2], 0, -1)}
"""

FIRST_SEEN = """
redis.call('HSETNX', KEYS[1], 'first_seen', ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return redis.call('HGET', KEYS[1], 'first_seen')
"""


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self.url = url
        # `surrogatepass`: a trip message naming a tool whose name holds a lone surrogate
        # (model text) is stored and read back as it was, not an encoding error.
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            decode_responses=True, encoding_errors="surrogatepass", health_check_interval=5)
        self._reserve = self._redis.register_script(RESERVE)
        self._admit = self._redis.register_script(ADMIT)
        self._observe = self._redis.register_script(OBSERVE)
        self._first_seen = self._redis.register_script(FIRST_SEEN)

    @property
    def client(self) -> Any:
        """The connection, shared with the session history (history.py)."""
        return self._redis

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the session store (Redis) is unavailable during {what}: "
                                   f"{type(e).__name__}") from e

    async def admit(self, bucket: str, counters: Sequence[Counter], *, now: float,
                    ttl_s: int, max_age_s: float | None, enforce_age: bool) -> Admitted:
        keys, args = _reservation(counters)
        keys += [PREFIX + bucket + ":trip", PREFIX + bucket]
        args += [int(now), ttl_s, -1 if max_age_s is None else max_age_s,
                 1 if enforce_age else 0]
        note, first, reserved = await self._call(
            "admission", lambda: self._admit(keys=keys, args=args))
        return Admitted(None if note is None else str(note),
                        None if first is None else float(first),
                        None if reserved is None else _reserved(counters, *reserved))

    async def reserve(self, counters: Sequence[Counter]) -> Reserved:
        keys, args = _reservation(counters)
        blocked, shadow = await self._call("reserve", lambda: self._reserve(keys=keys, args=args))
        return _reserved(counters, blocked, shadow)

    async def adjust(self, counters: Sequence[Counter]) -> None:
        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for c in counters:
                    if c.amount:
                        pipe.hincrby(PREFIX + c.bucket, c.field, c.amount)
                        pipe.expire(PREFIX + c.bucket, c.ttl_s, gt=True)
                await pipe.execute()

        await self._call("settle", run)

    async def first_seen(self, bucket: str, now: float, ttl_s: int) -> float:
        value = await self._call("session age", lambda: self._first_seen(
            keys=[PREFIX + bucket], args=[int(now), ttl_s]))
        return float(value)

    async def observe(self, bucket: str, signature: str, keep: int, ttl_s: int
                      ) -> tuple[int, list[str]]:
        count, recent = await self._call("loop check", lambda: self._observe(
            keys=[PREFIX + bucket, PREFIX + bucket + ":recent"], args=[signature, keep, ttl_s]))
        return int(count), [str(r) for r in recent]

    async def trip(self, bucket: str, reason: str, ttl_s: int) -> None:
        await self._call("trip", lambda: self._redis.set(PREFIX + bucket + ":trip", reason,
                                                         ex=ttl_s))

    async def tripped(self, bucket: str) -> str | None:
        value = await self._call("trip check", lambda: self._redis.get(PREFIX + bucket + ":trip"))
        return str(value) if value is not None else None

    async def read(self, bucket: str) -> dict[str, int]:
        raw = await self._call("read", lambda: self._redis.hgetall(PREFIX + bucket))
        return {str(k): int(v) for k, v in raw.items()}

    async def delete(self, buckets: Sequence[str]) -> None:
        keys = [PREFIX + b + suffix for b in buckets for suffix in ("", ":recent", ":trip")]
        if keys:
            await self._call("reset", lambda: self._redis.delete(*keys))

    async def ping(self) -> None:
        await self._call("ping", lambda: self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


def _reservation(counters: Sequence[Counter]) -> tuple[list[str], list[str | int | float]]:
    """RESERVE's keys and arguments for `counters`."""
    keys = [PREFIX + c.bucket for c in counters]
    args: list[str | int | float] = [len(counters)]
    for c in counters:
        args += [c.field, c.amount, -1 if c.limit is None else c.limit,
                 1 if c.shadow else 0, c.ttl_s]
    return keys, args


def _reserved(counters: Sequence[Counter], blocked: Sequence[Any], shadow: Sequence[Any]
              ) -> Reserved:
    return Reserved(tuple(counters[int(i) - 1] for i in blocked),
                    tuple(counters[int(i) - 1] for i in shadow))
