"""The session's history: every tool call tether decided, what flow rules read.

One bounded list per session bucket (agent and session, budgets.session_bucket), oldest
first, the newest `keep` entries kept, expiring `ttl_s` after the last write. It is
written by tether after each decision and read before the next one, so it is what
tether saw, not what the agent sends back: an agent that trims or rewrites its
messages cannot erase a call from it, and an agent cannot read another agent's
history by reusing its session id (the bucket is keyed by both).

Two backends, as for budgets: in memory (one process) and Redis (every replica sees
the same history; the same connection as the budget store). Any failure, an entry
that does not read back included, raises `StoreUnavailable`; the caller fails closed.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cachetools import LRUCache, TLRUCache
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..model import Action, Decision, Effect, PastCall, ToolCall
from ..policy.names import normalize
from ..surrogates import json_text, utf8
from .redis_store import PREFIX, RedisStore
from .store import Store

SUMMARY_CHARS = 200
VALUE_CHARS = 80
ARGS_SHOWN = 3
_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def args_sha256(call: ToolCall) -> str:
    """sha256 of the canonical JSON arguments (sorted keys, no spaces); the raw text
    when they did not parse."""
    if call.arguments is not None:
        text = json_text(call.arguments, sort_keys=True, separators=(",", ":"))
    else:
        text = call.raw_arguments
    return hashlib.sha256(utf8(text)).hexdigest()


def printable(text: str) -> str:
    """Model text shown to a person: controls, bidi and invisible characters escaped."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in _UNSAFE else c
                   for c in text)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def summary(call: ToolCall) -> str:
    """`web_fetch(url='https://example.com/x')`: the first few arguments, clipped before
    they are escaped, so a megabyte argument costs a slice, not a scan."""
    args = call.arguments
    if isinstance(args, Mapping):
        shown = [f"{printable(_clip(str(k), 40))}={printable(_clip(repr(v), VALUE_CHARS))}"
                 for k, v in list(args.items())[:ARGS_SHOWN]]
        if len(args) > ARGS_SHOWN:
            shown.append("...")
        inner = ", ".join(shown)
    else:
        inner = printable(_clip(call.raw_arguments, VALUE_CHARS))
    return _clip(f"{printable(_clip(call.name, 64))}({inner})", SUMMARY_CHARS)


def entry(call: ToolCall, decision: Decision, labels: frozenset[str], *,
          api: str | None = None, now: float | None = None) -> PastCall:
    """The history entry for a call as it was finally decided (a hold as it ended)."""
    return PastCall(decision_id=decision.decision_id, tool=normalize(call.name),
                    effect=decision.effect, action=decision.action, labels=labels,
                    at=time.time() if now is None else now, args_sha256=args_sha256(call),
                    summary=summary(call), call_id=call.id[:200], api=api)


def dumps(p: PastCall) -> str:
    return json.dumps({"d": p.decision_id, "t": p.tool, "e": p.effect.value,
                       "a": p.action.value, "l": sorted(p.labels), "at": p.at,
                       "h": p.args_sha256, "s": p.summary, "c": p.call_id, "api": p.api},
                      separators=(",", ":"))  # ensure_ascii: surrogates stay escapes


def loads(text: str) -> PastCall:
    """Raises StoreUnavailable on anything but an entry tether wrote: a history that
    cannot be read is not an empty one."""
    try:
        raw = json.loads(text)
        api = raw.get("api")
        return PastCall(decision_id=str(raw["d"]), tool=str(raw["t"]), effect=Effect(raw["e"]),
                        action=Action(raw["a"]), labels=frozenset(str(x) for x in raw["l"]),
                        at=float(raw["at"]), args_sha256=str(raw["h"]), summary=str(raw["s"]),
                        call_id=str(raw["c"]), api=str(api) if api is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreUnavailable(f"a session history entry does not read back: "
                               f"{type(e).__name__}") from e


class History(Protocol):
    async def load(self, bucket: str) -> tuple[PastCall, ...]: ...

    async def record(self, bucket: str, entries: Sequence[PastCall]) -> None: ...

    async def delete(self, bucket: str) -> None: ...


class _Entries:
    __slots__ = ("items", "expires")

    def __init__(self, keep: int, expires: float) -> None:
        self.items: deque[PastCall] = deque(maxlen=keep)
        self.expires = expires


def _ttu(_key: str, value: _Entries, _now: float) -> float:
    return value.expires


class MemoryHistory:
    """Bounded by `sessions` buckets (least recently used go first), `keep` entries each,
    and by expiry."""

    def __init__(self, keep: int, ttl_s: int, sessions: int = 100_000) -> None:
        self.keep, self.ttl_s = keep, ttl_s
        self._buckets: TLRUCache[str, _Entries] = TLRUCache(sessions, ttu=_ttu,
                                                            timer=time.time)

    async def load(self, bucket: str) -> tuple[PastCall, ...]:
        found = self._buckets.get(bucket)
        return tuple(found.items) if found else ()

    async def record(self, bucket: str, entries: Sequence[PastCall]) -> None:
        if not entries:
            return
        found = self._buckets.get(bucket)
        if found is None:
            found = _Entries(self.keep, 0.0)
        found.items.extend(entries)
        found.expires = time.time() + self.ttl_s
        self._buckets[bucket] = found

    async def delete(self, bucket: str) -> None:
        self._buckets.pop(bucket, None)


LOAD = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
local have = tonumber(ARGV[1])
local k = n - have
if have < 0 or k < 0 or redis.call('LINDEX', KEYS[1], -k - 1) ~= ARGV[2] then
  return {n, 1, redis.call('LRANGE', KEYS[1], 0, -1)}
end
if k == 0 then return {n, 0, {}} end
return {n, 0, redis.call('LRANGE', KEYS[1], -k, -1)}
"""


class RedisHistory:
    """A Redis list per bucket (`tether:<bucket>:history`), appended, trimmed to `keep`
    and given its expiry in one transaction, so replicas see one history; beside it a
    count of the entries ever appended (`...:history:n`).

    Each replica keeps the entries it has read, by bucket, with that count: a load asks
    Redis (one script) for the entries appended since, so a long history is read once,
    not on every answer. Entries are only ever appended, so a cached prefix plus the new
    tail is the list as Redis holds it, provided the entry just before the tail is the
    last one cached (each holds a unique decision id); when it is not (the session
    expired or was reset and began again, or more was appended than the list keeps), or
    the count went back, the whole list is read again."""

    def __init__(self, client: Any, keep: int, ttl_s: int, cached_entries: int = 200_000
                 ) -> None:
        self._redis = client
        self.keep, self.ttl_s = keep, ttl_s
        self._load = client.register_script(LOAD)
        # bucket -> (entries ever appended, the last entry's text, the entries)
        self._cache: LRUCache[str, tuple[int, str, tuple[PastCall, ...]]] = LRUCache(
            cached_entries, getsizeof=lambda v: len(v[2]) + 1)

    @staticmethod
    def key(bucket: str) -> str:
        return f"{PREFIX}{bucket}:history"

    async def load(self, bucket: str) -> tuple[PastCall, ...]:
        key = self.key(bucket)
        have, last, entries = self._cache.get(bucket, (-1, "", ()))
        try:
            n, full, raw = await self._load(keys=[key, key + ":n"], args=[have, last])
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the session store (Redis) is unavailable while reading "
                                   f"the session history: {type(e).__name__}") from e
        texts = [str(r) for r in raw]
        new = tuple(loads(t) for t in texts)
        entries = new if int(full) else (entries + new)[-self.keep:]
        if entries:
            self._cache[bucket] = (int(n), texts[-1] if texts else last, entries)
        else:
            self._cache.pop(bucket, None)
        return entries

    async def record(self, bucket: str, entries: Sequence[PastCall]) -> None:
        if not entries:
            return
        key = self.key(bucket)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *(dumps(e) for e in entries))
                pipe.ltrim(key, -self.keep, -1)
                pipe.expire(key, self.ttl_s)
                pipe.incrby(key + ":n", len(entries))
                pipe.expire(key + ":n", self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the session store (Redis) is unavailable while recording "
                                   f"the session history: {type(e).__name__}") from e

    async def delete(self, bucket: str) -> None:
        self._cache.pop(bucket, None)
        try:
            await self._redis.delete(self.key(bucket), self.key(bucket) + ":n")
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the session store (Redis) is unavailable: "
                                   f"{type(e).__name__}") from e


def history_for(store: Store, keep: int, ttl_s: int) -> History:
    """The history beside a budget store: in Redis when the budgets are."""
    if isinstance(store, RedisStore):
        return RedisHistory(store.client, keep, ttl_s)
    return MemoryHistory(keep, ttl_s)
