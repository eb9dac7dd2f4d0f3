"""The ledger of decided calls: LLM tool calls allowed or approved, waiting for the API
request that carries them out (docs/linked-calls.md).

An entry is filed under the digest of (agent, API operation, canonical API arguments)
and holds the LLM-side decision id, the session, who approved it and when it expires.
`take` finds one unexpired entry under a key (of the given session, when one is named)
and removes it in the same step, so an entry is redeemed at most once, whichever
replica asks: in memory because nothing awaits between the find and the removal; in
Redis because one Lua script does both. Expiry is Redis's own clock there (TIME), so
replicas whose clocks differ agree on it.

A key holds at most `MAX_PER_KEY` entries (the newest); the oldest drop, which can
only cost a redemption, never grant one. Any Redis failure raises `StoreUnavailable`:
the caller redeems nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from cachetools import TLRUCache
from redis.exceptions import RedisError

from ..errors import StoreUnavailable

PREFIX = "tether:ledger:"
MAX_PER_KEY = 32
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry:
    """One allowed or approved tool call whose API request has not been seen yet.
    `approved_by`: the human who approved it (None: the policy allowed it)."""

    key: str
    decision_id: str
    agent: str | None
    session: str | None
    tool: str
    operation: str
    arguments: str                 # the start of their canonical JSON (the key holds all of it)
    approved_by: str | None
    expires: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        raw = json.loads(text)
        return cls(**raw)


def session_tag(session: str | None) -> str:
    """What the store compares sessions by: a digest (never the text as sent)."""
    if session is None:
        return "-"
    return hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Ledger(Protocol):
    async def put(self, entry: Entry, ttl_s: float) -> None: ...

    async def take(self, key: str, session: str | None) -> Entry | None:
        """One unexpired entry under `key` (of `session`, unless None), removed."""
        ...

    async def close(self) -> None: ...


def _ttu(_key: str, value: list[Entry], _now: float) -> float:
    return max((e.expires for e in value), default=0.0)


class MemoryLedger:
    """One process. Bounded by `maxsize` keys (least recently used go first) and expiry."""

    def __init__(self, maxsize: int = 100_000) -> None:
        self._keys: TLRUCache[str, list[Entry]] = TLRUCache(maxsize, ttu=_ttu, timer=time.time)

    async def put(self, entry: Entry, ttl_s: float) -> None:
        now = time.time()
        found = [e for e in self._keys.get(entry.key, []) if e.expires > now]
        found.append(entry)
        self._keys[entry.key] = found[-MAX_PER_KEY:]

    async def take(self, key: str, session: str | None) -> Entry | None:
        now = time.time()
        found = self._keys.get(key)
        if not found:
            return None
        live = [e for e in found if e.expires > now]
        for i, entry in enumerate(live):
            if session is None or entry.session == session:
                del live[i]
                if live:
                    self._keys[key] = live
                else:
                    self._keys.pop(key, None)
                return entry
        return None

    async def close(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


# Items are "<expires>|<session tag>|<entry JSON>": the script never decodes JSON.
PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
redis.call('RPUSH', KEYS[1], string.format('%.6f', now + ttl) .. '|' .. ARGV[2] .. '|' .. ARGV[3])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
local left = redis.call('PTTL', KEYS[1])
local want = math.ceil(ttl * 1000) + 1000
if left < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
"""

TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, item in ipairs(items) do
  local expires, session, entry = string.match(item, '^([^|]+)|([^|]+)|(.*)$')
  if expires == nil or tonumber(expires) <= now then
    redis.call('LREM', KEYS[1], 1, item)
  elseif ARGV[1] == '' or session == ARGV[1] then
    redis.call('LREM', KEYS[1], 1, item)
    return entry
  end
end
return false
"""


class RedisLedger:
    """Shared by every replica; `client` is the session store's (one connection pool)."""

    def __init__(self, client: Any) -> None:
        self._redis = client
        self._put = client.register_script(PUT)
        self._take = client.register_script(TAKE)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the ledger of decided calls (Redis) is unavailable during "
                                   f"{what}: {type(e).__name__}") from e

    async def put(self, entry: Entry, ttl_s: float) -> None:
        await self._call("record", lambda: self._put(
            keys=[PREFIX + entry.key],
            args=[f"{ttl_s:.3f}", session_tag(entry.session), entry.to_json(), MAX_PER_KEY]))

    async def take(self, key: str, session: str | None) -> Entry | None:
        raw = await self._call("redeem", lambda: self._take(
            keys=[PREFIX + key], args=["" if session is None else session_tag(session)]))
        if not raw:
            return None
        return Entry.from_json(str(raw))

    async def close(self) -> None:
        return None  # the session store owns the connection
