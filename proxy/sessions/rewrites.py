"""What tether changed in the Responses answers it rewrote, kept for the agent's next turns.

Per answer with tool calls (providers/responses_history.py `Rewrite`): which calls were
denied, the text and the message put in their place. Read on the next request, to
expand references to those messages and answer the denied calls the provider still
holds, and by stored retrieval, to show an answer as the agent got it. Beside them, the
response ids a streamed answer is known by that stand for a later round tether
continued to (server/approvals_continue.py).

Keys (Redis, under `tether:rw:`; the same names in memory), each expiring `ttl_s` after
it is written (default: 30 days, as long as OpenAI keeps a stored response):

    tether:rw:resp:<response id>        the record (JSON)
    tether:rw:item:<msg_tether_... id>  the record holding that replacement message
    tether:rw:conv:<conversation id>    hash: response id -> record, denials still owed
    tether:rw:convall:<conversation id> hash: response id -> record, every answer in it
    tether:rw:alias:<n>.<agent>:<first id>  the last round's response id (n: the name's length)

Two backends, as for budgets: memory (one replica, bounded, least recently used out
first) and Redis (every replica sees the same records, on the budget store's
connection). A Redis failure raises `StoreUnavailable`: on the request side the caller
fails closed; a record that cannot be written is logged by the caller and the answer
still goes (its next turn then fails upstream, as it would without tether's help).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from cachetools import TLRUCache
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..providers.responses_history import Rewrite, dumps, loads
from .redis_store import PREFIX, RedisStore
from .store import Store

TTL_S = 30 * 24 * 3600
MAX_ENTRIES = 200_000
T = TypeVar("T")


def _key(kind: str, *parts: str) -> str:
    return f"{PREFIX}rw:{kind}:" + ":".join(parts)


def _alias(agent: str | None, first: str) -> str:
    """The agent's name with its length first, so no (agent, id) pair spells another's."""
    name = agent or ""
    return _key("alias", f"{len(name)}.{name}", first)


class Rewrites(Protocol):
    async def put(self, record: Rewrite) -> None: ...

    async def response(self, response_id: str) -> Rewrite | None: ...

    async def items(self, ids: Sequence[str]) -> dict[str, Rewrite | None]: ...

    async def owed(self, conversation: str) -> list[Rewrite]: ...

    async def conversation(self, conversation: str) -> list[Rewrite]: ...

    async def settle(self, conversation: str, response_ids: Sequence[str]) -> None: ...

    async def put_alias(self, agent: str | None, first: str, last: str) -> None: ...

    async def alias(self, agent: str | None, first: str) -> str | None: ...


def _read(text: object) -> Rewrite:
    try:
        return loads(str(text))
    except ValueError as e:
        raise StoreUnavailable(str(e)) from e


class _Entry:
    __slots__ = ("value", "expires")

    def __init__(self, value: object, expires: float) -> None:
        self.value, self.expires = value, expires


def _ttu(_key: str, value: _Entry, _now: float) -> float:
    return value.expires


class MemoryRewrites:
    """This replica's memory: bounded by `max_entries` keys and by expiry."""

    def __init__(self, ttl_s: int = TTL_S, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self._map: TLRUCache[str, _Entry] = TLRUCache(max_entries, ttu=_ttu, timer=time.time)

    def _set(self, key: str, value: object) -> None:
        self._map[key] = _Entry(value, time.time() + self.ttl_s)

    def _get(self, key: str) -> object:
        found = self._map.get(key)
        return found.value if found is not None else None

    async def put(self, record: Rewrite) -> None:
        text = dumps(record)
        self._set(_key("resp", record.response_id), text)
        for d in record.denied:
            if isinstance(d.item.get("id"), str):
                self._set(_key("item", str(d.item["id"])), text)
        if record.conversation is not None:
            kinds = ("conv", "convall") if record.denied else ("convall",)
            for kind in kinds:  # updated in place: a long conversation costs no copies
                found = self._get(_key(kind, record.conversation))
                held: dict[str, str] = found if isinstance(found, dict) else {}
                held[record.response_id] = text
                self._set(_key(kind, record.conversation), held)

    async def response(self, response_id: str) -> Rewrite | None:
        text = self._get(_key("resp", response_id))
        return _read(text) if text is not None else None

    async def items(self, ids: Sequence[str]) -> dict[str, Rewrite | None]:
        out: dict[str, Rewrite | None] = {}
        for i in ids:
            text = self._get(_key("item", i))
            out[i] = _read(text) if text is not None else None
        return out

    async def owed(self, conversation: str) -> list[Rewrite]:
        owed = self._get(_key("conv", conversation))
        return [_read(t) for t in owed.values()] if isinstance(owed, dict) else []

    async def conversation(self, conversation: str) -> list[Rewrite]:
        found = self._get(_key("convall", conversation))
        return [_read(t) for t in found.values()] if isinstance(found, dict) else []

    async def settle(self, conversation: str, response_ids: Sequence[str]) -> None:
        owed = self._get(_key("conv", conversation))
        if isinstance(owed, dict):
            for rid in response_ids:
                owed.pop(rid, None)
            if not owed:
                self._map.pop(_key("conv", conversation), None)

    async def put_alias(self, agent: str | None, first: str, last: str) -> None:
        self._set(_alias(agent, first), last)

    async def alias(self, agent: str | None, first: str) -> str | None:
        found = self._get(_alias(agent, first))
        return str(found) if found is not None else None


class RedisRewrites:
    """Shared by every replica, on the budget store's connection."""

    def __init__(self, client: Any, ttl_s: int = TTL_S) -> None:
        self._redis = client
        self.ttl_s = ttl_s

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the session store (Redis) is unavailable while {what}: "
                                   f"{type(e).__name__}") from e

    async def put(self, record: Rewrite) -> None:
        text = dumps(record)

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_key("resp", record.response_id), text, ex=self.ttl_s)
                for d in record.denied:
                    if isinstance(d.item.get("id"), str):
                        pipe.set(_key("item", str(d.item["id"])), text, ex=self.ttl_s)
                if record.conversation is not None:
                    kinds = ("conv", "convall") if record.denied else ("convall",)
                    for kind in kinds:
                        conv = _key(kind, record.conversation)
                        pipe.hset(conv, record.response_id, text)
                        pipe.expire(conv, self.ttl_s)
                await pipe.execute()

        await self._call("recording a rewritten answer", run)

    async def response(self, response_id: str) -> Rewrite | None:
        text = await self._call("reading a rewritten answer",
                                lambda: self._redis.get(_key("resp", response_id)))
        return _read(text) if text is not None else None

    async def items(self, ids: Sequence[str]) -> dict[str, Rewrite | None]:
        if not ids:
            return {}
        texts = await self._call("reading replaced items", lambda: self._redis.mget(
            [_key("item", i) for i in ids]))
        return {i: (_read(t) if t is not None else None) for i, t in zip(ids, texts, strict=True)}

    async def owed(self, conversation: str) -> list[Rewrite]:
        found = await self._call("reading a conversation's denials",
                                 lambda: self._redis.hvals(_key("conv", conversation)))
        return [_read(t) for t in found]

    async def conversation(self, conversation: str) -> list[Rewrite]:
        found = await self._call("reading a conversation's answers",
                                 lambda: self._redis.hvals(_key("convall", conversation)))
        return [_read(t) for t in found]

    async def settle(self, conversation: str, response_ids: Sequence[str]) -> None:
        if response_ids:
            await self._call("settling a conversation's denials", lambda: self._redis.hdel(
                _key("conv", conversation), *response_ids))

    async def put_alias(self, agent: str | None, first: str, last: str) -> None:
        await self._call("recording a continued response", lambda: self._redis.set(
            _alias(agent, first), last, ex=self.ttl_s))

    async def alias(self, agent: str | None, first: str) -> str | None:
        found = await self._call("reading a continued response", lambda: self._redis.get(
            _alias(agent, first)))
        return str(found) if found is not None else None


def rewrites_for(store: Store, ttl_s: int = TTL_S) -> Rewrites:
    """The records beside a budget store: in Redis when the budgets are."""
    if isinstance(store, RedisStore):
        return RedisRewrites(store.client, ttl_s)
    return MemoryRewrites(ttl_s)
