"""A replica's lease in Redis: proof that the requests it waits on still have a caller.

The replica whose request waits on an approval (its `waiter`) renews
`tether:approvals:lease:<instance>` every third of `approvals.lease`; after each
renewal it sweeps, ending `abandoned` what dead replicas waited on
(RedisApprovals.sweep). A replica that is killed, or loses Redis for longer than
the lease, stops renewing, and any other replica's sweep ends its approvals within
about the lease plus a third. The task is owned here: `start` makes it once,
`stop` cancels it and deletes the lease at once (what it waited on has ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from .redis_layout import LEASE

log = logging.getLogger("tether.approvals.redis")

Call = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


class Lease:
    def __init__(self, redis: Any, instance: str, lease_s: float, call: Call,
                 sweep: Callable[[], Awaitable[object]]) -> None:
        self._redis = redis
        self.key = LEASE + instance
        self.lease_s = lease_s
        self._call = call
        self._sweep = sweep
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._beat(),
                                                                name="approvals-lease")
            with contextlib.suppress(StoreUnavailable):
                await self._renew()  # before the first wait is created, not a third later

    async def _renew(self) -> None:
        await self._call("lease", lambda: self._redis.set(
            self.key, "1", px=max(1, int(self.lease_s * 1000))))

    async def _beat(self) -> None:
        """Renew this replica's lease, then end what dead replicas waited on."""
        while not self._stopped:
            try:
                await self._renew()
                await self._sweep()
            except StoreUnavailable as e:
                log.warning("approvals: lease or sweep failed: %s", e.message)
            except Exception:  # noqa: BLE001 - the lease must outlive one bad record
                log.exception("approvals: the lease and sweep hit an error; going on")
            await asyncio.sleep(self.lease_s / 3)

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._redis.delete(self.key)
