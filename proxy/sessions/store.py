"""Where budget counters live: in memory (one process) or in Redis (many replicas).

Both stores apply a reservation atomically: either every enforced counter has
room and every counter is incremented, or nothing changes. In memory that holds
because the operations run on the event loop without awaiting in between; in
Redis because one Lua script does the check and the increments.

Counters are grouped in buckets (one per session, per agent window, per global
window), each a small map of fields with an expiry, so 100k sessions cost a few
tens of megabytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cachetools import TLRUCache

from .budgets import Counter


@dataclass(frozen=True, slots=True)
class Reserved:
    blocked: tuple[Counter, ...]     # enforced counters without room: nothing was applied
    shadow: tuple[Counter, ...]      # shadow counters now over their limit (applied anyway)

    @property
    def ok(self) -> bool:
        return not self.blocked


@dataclass(frozen=True, slots=True)
class Admitted:
    """What one admission found, read and applied in one step (one Redis round trip)."""
    tripped: str | None        # the session was stopped: nothing was reserved
    first_seen: float | None   # when the session began (asked for: `max_age_s` is set)
    reserved: Reserved | None  # None: nothing was tried (tripped, or older than max_age)


class Store(Protocol):
    async def admit(self, bucket: str, counters: Sequence[Counter], *, now: float,
                    ttl_s: int, max_age_s: float | None, enforce_age: bool) -> Admitted:
        """In one atomic step: the session's trip note; when `max_age_s` is set, its first
        sighting (recorded now if new); then, unless it is tripped or (`enforce_age`) older
        than `max_age_s`, the reservation of `counters`."""
        ...

    async def reserve(self, counters: Sequence[Counter]) -> Reserved: ...

    async def adjust(self, counters: Sequence[Counter]) -> None: ...

    async def first_seen(self, bucket: str, now: float, ttl_s: int) -> float: ...

    async def observe(self, bucket: str, signature: str, keep: int, ttl_s: int
                      ) -> tuple[int, list[str]]: ...

    async def trip(self, bucket: str, reason: str, ttl_s: int) -> None: ...

    async def tripped(self, bucket: str) -> str | None: ...

    async def read(self, bucket: str) -> dict[str, int]: ...

    async def delete(self, buckets: Sequence[str]) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class _Bucket:
    __slots__ = ("fields", "expires", "recent", "note")

    def __init__(self, expires: float) -> None:
        self.fields: dict[str, int] = {}
        self.expires = expires
        self.recent: list[str] | None = None
        self.note: str | None = None


def _ttu(_key: str, value: _Bucket, _now: float) -> float:
    return value.expires


class MemoryStore:
    """Bounded by `maxsize` buckets (least recently used go first) and by expiry."""

    def __init__(self, maxsize: int = 1_000_000) -> None:
        self._buckets: TLRUCache[str, _Bucket] = TLRUCache(maxsize, ttu=_ttu, timer=time.time)

    def _get(self, bucket: str, ttl_s: int) -> _Bucket:
        """The bucket, created if absent. Its expiry is pushed out lazily (re-inserting
        into the cache is the expensive part): a bucket idle for `ttl_s` is gone, one
        in use is refreshed whenever less than half its time is left."""
        found = self._buckets.get(bucket)
        now = time.time()
        if found is None or found.expires - now < ttl_s / 2:
            if found is None:
                found = _Bucket(now + ttl_s)
            found.expires = max(found.expires, now + ttl_s)
            self._buckets[bucket] = found
        return found

    def _apply(self, counters: Sequence[Counter]) -> None:
        current: _Bucket | None = None
        name = ""
        for c in counters:  # counters come grouped by bucket
            if not c.amount:
                continue
            if current is None or c.bucket != name:
                current, name = self._get(c.bucket, c.ttl_s), c.bucket
            current.fields[c.field] = current.fields.get(c.field, 0) + c.amount

    async def admit(self, bucket: str, counters: Sequence[Counter], *, now: float,
                    ttl_s: int, max_age_s: float | None, enforce_age: bool) -> Admitted:
        found = self._buckets.get(bucket)
        if found is not None and found.note is not None:
            return Admitted(found.note, None, None)
        first: float | None = None
        if max_age_s is not None:
            first = await self.first_seen(bucket, now, ttl_s)
            if enforce_age and now - first > max_age_s:
                return Admitted(None, first, None)
        return Admitted(None, first, await self.reserve(counters))

    async def reserve(self, counters: Sequence[Counter]) -> Reserved:
        blocked: list[Counter] = []
        shadow: list[Counter] = []
        found: _Bucket | None = None
        name: str | None = None
        for c in counters:
            if c.limit is None or c.amount <= 0:
                continue
            if c.bucket != name:
                found, name = self._buckets.get(c.bucket), c.bucket
            used = found.fields.get(c.field, 0) if found else 0
            if used + c.amount > c.limit:
                (shadow if c.shadow else blocked).append(c)
        if not blocked:
            self._apply(counters)
        return Reserved(tuple(blocked), tuple(shadow))

    async def adjust(self, counters: Sequence[Counter]) -> None:
        self._apply(counters)

    async def first_seen(self, bucket: str, now: float, ttl_s: int) -> float:
        b = self._get(bucket, ttl_s)
        return float(b.fields.setdefault("first_seen", int(now)))

    async def observe(self, bucket: str, signature: str, keep: int, ttl_s: int
                      ) -> tuple[int, list[str]]:
        b = self._get(bucket, ttl_s)
        count = b.fields.get(signature, 0) + 1
        b.fields[signature] = count
        recent = [signature, *(b.recent or [])][:keep]
        b.recent = recent
        return count, list(recent)

    async def trip(self, bucket: str, reason: str, ttl_s: int) -> None:
        self._get(bucket, ttl_s).note = reason

    async def tripped(self, bucket: str) -> str | None:
        found = self._buckets.get(bucket)
        return found.note if found else None

    async def read(self, bucket: str) -> dict[str, int]:
        found = self._buckets.get(bucket)
        return dict(found.fields) if found else {}

    async def delete(self, buckets: Sequence[str]) -> None:
        for bucket in buckets:
            self._buckets.pop(bucket, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
