"""Approvals in Redis, so every replica of a gateway sees, decides and redeems the same ones.

Each state change is one Lua script, so across replicas the first decision
wins, an approved ticket is redeemed once, and the pending limits hold (two
creates cannot both take the last slot). Whoever makes a change runs the
local listeners (audit, metrics, Slack) and publishes the id; a waiter on
another replica wakes on that message, and polls as well, so a message lost
while the subscription was down delays it by one poll, never past its timeout.

Keys, fields and scripts: redis_layout.py.

A waiting replica holds a lease (redis_lease.py); when it dies, any replica's
sweep ends what it waited on `abandoned` within about the lease plus a third, so
nothing whose caller is gone stays approvable.

Scripts touch keys they build from ids, so this needs a single Redis (or a
Sentinel-managed primary), as the budgets do; not Redis Cluster. Expiry uses
the replicas' clocks (keep them in NTP sync). Any Redis failure raises
`StoreUnavailable`; the caller fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..model import Exchange, ToolCall
from .context import HoldContext
from .queue import (
    Approval,
    ApprovalQueue,
    Approvals,
    Listener,
    Message,
    Mode,
    State,
    TooManyPending,
    new_approval,
)
from .redis_layout import (
    BINDING,
    CHANNEL,
    CLAIM_MESSAGE,
    CREATE,
    DECIDED,
    ITEM,
    LEASE,
    PENDING,
    REDEEM,
    SET_MESSAGE,
    TRANSITION,
    from_fields,
    owner,
    pairs,
    to_fields,
)
from .redis_lease import Lease
from .settings import ApprovalSettings

log = logging.getLogger("tether.approvals.redis")

T = TypeVar("T")


class RedisApprovals:
    """`Approvals` shared by every replica on one Redis."""

    def __init__(self, url: str, *, max_pending: int = 100, max_pending_per_session: int = 5,
                 keep_decided: int = 500, keep_decided_for_s: float = 86400.0,
                 ticket_validity_s: float = 3600.0, poll_s: float = 1.0,
                 timeout_s: float = 0.5, lease_s: float = 15.0,
                 instance: str | None = None) -> None:
        self.url = url
        # Who waits: unique per process, readable (the pod name when it is set).
        self.instance = instance or (f"{os.environ.get('POD_NAME') or socket.gethostname()}"
                                     f"-{os.getpid()}-{secrets.token_hex(3)}")
        self.lease_s = lease_s
        self.max_pending = max_pending
        self.max_pending_per_session = max_pending_per_session
        self.keep_decided = keep_decided
        self.keep_decided_for_s = keep_decided_for_s
        self.ticket_validity_s = ticket_validity_s
        self.poll_s = poll_s
        # `surrogatepass`: a tool name or arguments holding a lone surrogate (agent text)
        # is stored and read back as the same str (proxy/surrogates.py).
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            decode_responses=True, encoding_errors="surrogatepass", health_check_interval=5)
        # The subscription blocks on reads; it gets a connection without a read timeout.
        self._sub: Any = aioredis.from_url(url, socket_connect_timeout=timeout_s,
                                           decode_responses=True,
                                           encoding_errors="surrogatepass")
        self._create = self._redis.register_script(CREATE)
        self._transition = self._redis.register_script(TRANSITION)
        self._redeem = self._redis.register_script(REDEEM)
        self._set_message = self._redis.register_script(SET_MESSAGE)
        self._claim_message = self._redis.register_script(CLAIM_MESSAGE)
        self._created: list[Listener] = []
        self._decided: list[Listener] = []
        self._watched: dict[str, asyncio.Event] = {}   # ids this process waits on
        self._outcomes: dict[str, Approval] = {}       # ... that this process ended
        self._listener: asyncio.Task[None] | None = None
        self._lease = Lease(self._redis, self.instance, lease_s, self._call, self.sweep)
        self._closed = False

    def on_created(self, listener: Listener) -> None:
        self._created.append(listener)

    def on_decided(self, listener: Listener) -> None:
        self._decided.append(listener)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"the approval store (Redis) is unavailable during {what}: "
                                   f"{type(e).__name__}") from e

    # -- reading -----------------------------------------------------------------------

    async def _load(self, ids: list[str], what: str) -> list[tuple[str, Approval | None]]:
        async def run() -> list[dict[str, str]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hgetall(ITEM + i)
                return list(await pipe.execute())

        raw = await self._call(what, run) if ids else []
        return [(i, from_fields(f) if f else None) for i, f in zip(ids, raw, strict=True)]

    async def _current(self, approval: Approval, now: float) -> Approval:
        """The approval, expired first when it is due (the first to see that ends it)."""
        if approval.state is State.PENDING and approval.expires <= now:
            ended, _ = await self._end(approval.id, "expire", now=now)
            if ended is not None:
                return ended
        return approval

    async def pending(self) -> list[Approval]:
        ids = [str(i) for i in await self._call("pending", lambda: self._redis.zrange(
            PENDING, 0, -1))]
        now, out, gone = time.time(), [], []
        for approval_id, approval in await self._load(ids, "pending"):
            if approval is None:
                gone.append(approval_id)
                continue
            approval = await self._current(approval, now)
            if approval.state is State.PENDING:
                out.append(approval)
        if gone:
            await self._call("pending", lambda: self._redis.zrem(PENDING, *gone))
        return sorted(out, key=lambda a: a.created)

    async def recent(self, limit: int = 50) -> list[Approval]:
        ids = [str(i) for i in await self._call("recent", lambda: self._redis.zrevrange(
            DECIDED, 0, limit - 1))]
        return [a for _, a in await self._load(ids, "recent") if a is not None]

    async def get(self, approval_id: str) -> Approval | None:
        raw = await self._call("get", lambda: self._redis.hgetall(ITEM + approval_id))
        return await self._current(from_fields(raw), time.time()) if raw else None

    async def waiting_for(self, binding: str) -> Approval | None:
        ids = sorted(str(i) for i in await self._call("lookup", lambda: self._redis.smembers(
            BINDING + binding)))
        for _, approval in await self._load(ids, "lookup"):
            if approval is not None and approval.binding == binding:
                approval = await self._current(approval, time.time())
                if approval.state is State.PENDING:
                    return approval
        return None

    # -- changing ----------------------------------------------------------------------

    async def create(self, call: ToolCall, exchange: Exchange, *, mode: Mode,
                     rules: tuple[str, ...], message: str, revision: str,
                     approvers: tuple[str, ...], timeout_s: float,
                     context: HoldContext | None = None) -> Approval:
        await self.pending()  # ends what is overdue, so it neither counts nor lingers
        approval = new_approval(call, exchange, mode=mode, rules=rules, message=message,
                                revision=revision, approvers=approvers, timeout_s=timeout_s,
                                context=context)
        if mode is Mode.WAIT:  # this replica's request waits on it: its lease covers it
            await self.start()
            approval = replace(approval, waiter=self.instance)
        ttl = math.ceil(timeout_s + self.ticket_validity_s + self.keep_decided_for_s)
        args: list[str | int] = [repr(time.time()), self.max_pending,
                                 self.max_pending_per_session,
                                 owner(exchange.agent, exchange.session), repr(approval.expires),
                                 ttl, ITEM]
        for key, value in to_fields(approval).items():
            args += [key, value]
        code, count = await self._call("create", lambda: self._create(
            keys=[PENDING, ITEM + approval.id, BINDING + approval.binding], args=args))
        if int(code) == 1:
            raise TooManyPending(f"{count} approvals are already pending (at most "
                                 f"{self.max_pending})")
        if int(code) == 2:
            raise TooManyPending(f"this session already has {count} pending approvals "
                                 f"(at most {self.max_pending_per_session})")
        for listener in self._created:
            listener(approval)
        return approval

    async def _end(self, approval_id: str, verb: str, *, now: float, by: str = "",
                   reason: str | None = None, ticket_validity_s: float = 0.0,
                   slack_user: str | None = None, lease: str = ""
                   ) -> tuple[Approval | None, bool]:
        """(the approval, whether this call ended it); the listeners run when it did.
        `lease`: the waiter's lease key, for the `orphan` verb."""
        args = [repr(now), verb, by, reason or "", "1" if reason is not None else "0",
                repr(now + ticket_validity_s), self.keep_decided,
                math.ceil(self.keep_decided_for_s), approval_id, CHANNEL,
                math.ceil(ticket_validity_s), repr(now - self.keep_decided_for_s),
                slack_user or ""]
        keys = [ITEM + approval_id, PENDING, DECIDED] + ([lease] if lease else [])
        code, flat = await self._call("decide", lambda: self._transition(keys=keys, args=args))
        if int(code) == 0:
            return None, False
        approval = from_fields(pairs(flat))
        if int(code) == 2:
            event = self._watched.get(approval_id)
            if event is not None:
                self._outcomes[approval_id] = approval
                event.set()
            for listener in self._decided:
                listener(approval)
        return approval, int(code) == 2

    async def decide(self, approval_id: str, *, approve: bool, by: str,
                     reason: str | None = None, ticket_validity_s: float = 3600,
                     slack_user: str | None = None) -> tuple[Approval | None, bool]:
        approval, ended = await self._end(approval_id, "approve" if approve else "deny",
                                          now=time.time(), by=by, reason=reason,
                                          ticket_validity_s=ticket_validity_s,
                                          slack_user=slack_user)
        # Ended here, but by its expiry: that is not the decision asked for.
        return approval, ended and approval is not None and approval.state is not State.EXPIRED

    async def abandon(self, approval_id: str, *, reason: str) -> tuple[Approval | None, bool]:
        approval, ended = await self._end(approval_id, "abandon", now=time.time(), by="tether",
                                          reason=reason)
        return approval, ended and approval is not None and approval.state is State.ABANDONED

    async def redeem(self, binding: str) -> Approval | None:
        flat = await self._call("redeem", lambda: self._redeem(
            keys=[BINDING + binding], args=[repr(time.time()), ITEM]))
        return from_fields(pairs(flat)) if flat else None

    # -- waiting -----------------------------------------------------------------------

    async def wait(self, approval_id: str) -> Approval:
        """Wakes on the published id (or a local decision), and polls every `poll_s` in
        case a message was lost. Raises StoreUnavailable only when the outcome cannot be
        read once the approval is due."""
        self._listen()
        event = self._watched.setdefault(approval_id, asyncio.Event())
        try:
            approval = await self.get(approval_id)
            if approval is None:
                raise StoreUnavailable(f"approval {approval_id} is no longer in the approval "
                                       f"store (Redis restarted or lost it)")
            while approval.state is State.PENDING:
                remaining = approval.expires - time.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(0.0, min(self.poll_s, remaining)))
                event.clear()
                if approval_id in self._outcomes:   # ended here: no need to ask Redis
                    return self._outcomes[approval_id]
                try:
                    found = await self.get(approval_id)
                except StoreUnavailable:
                    if time.time() < approval.expires and not self._closed:
                        continue  # a blip: keep waiting; past the expiry it is a deny
                    raise
                if found is None:
                    raise StoreUnavailable(f"approval {approval_id} is no longer in the "
                                           f"approval store (Redis restarted or lost it)")
                approval = found
            return approval
        finally:
            self._outcomes.pop(approval_id, None)
            if self._watched.get(approval_id) is event:
                del self._watched[approval_id]

    def _listen(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._subscribe(), name="approvals-subscription")

    async def _subscribe(self) -> None:
        while not self._closed:
            pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                for event in list(self._watched.values()):
                    event.set()  # anything may have ended while we were not subscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        woken = self._watched.get(str(message["data"]))
                        if woken is not None:
                            woken.set()
            except (RedisError, OSError, TimeoutError) as e:
                log.warning("approvals: the Redis subscription failed (%s); polling until it "
                            "is back", type(e).__name__)
                await asyncio.sleep(self.poll_s)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()

    # -- the lease -----------------------------------------------------------------------

    async def start(self) -> None:
        if not self._closed:
            await self._lease.start()

    async def sweep(self) -> list[Approval]:
        """Pending `wait` approvals whose waiter's lease lapsed, ended `abandoned` here
        (one script each: only while that lease is still missing)."""
        ended = []
        for approval in await self.pending():
            if approval.waiter is None or approval.waiter == self.instance:
                continue
            lease = LEASE + approval.waiter
            if await self._call("sweep", lambda k=lease: self._redis.exists(k)):  # type: ignore[misc]
                continue
            reason = (f"the replica waiting on it ({approval.waiter}) stopped renewing its "
                      f"lease: it died, so its caller is gone")
            done, changed = await self._end(approval.id, "orphan", now=time.time(), by="tether",
                                            reason=reason, lease=lease)
            if changed and done is not None and done.state is State.ABANDONED:
                log.warning("approvals: %s abandoned: %s", done.id, reason)
                ended.append(done)
        return ended

    async def orphans(self) -> list[Approval]:
        """What this process waits on: its requests end with it. Tickets, and approvals
        other replicas wait on, stay for whoever decides them."""
        found = await self._load(sorted(self._watched), "shutdown")
        return [a for _, a in found if a is not None and a.state is State.PENDING]

    # -- the Slack message -------------------------------------------------------------

    async def set_message(self, approval_id: str, channel: str, ts: str) -> None:
        await self._call("slack message", lambda: self._set_message(
            keys=[ITEM + approval_id], args=[channel, ts]))

    async def claim_message(self, approval_id: str) -> Message | None:
        flat = await self._call("slack message", lambda: self._claim_message(
            keys=[ITEM + approval_id]))
        if not flat:
            return None
        fields = pairs(flat)
        return Message(from_fields(fields), fields["slack_channel"], fields["slack_ts"],
                       fields.get("slack_user"))

    async def ping(self) -> None:
        await self._call("ping", lambda: self._redis.ping())

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        # What this replica waited on has ended (Holds.stop): its lease can go at once.
        await self._lease.stop()
        await self._redis.aclose()
        await self._sub.aclose()


def make_approvals(store_url: str, settings: ApprovalSettings) -> Approvals:
    """Where approvals live follows `store:`: memory, or the Redis the budgets use."""
    if store_url == "memory":
        return ApprovalQueue(settings.max_pending, settings.max_pending_per_session,
                             settings.keep_decided)
    return RedisApprovals(store_url, max_pending=settings.max_pending,
                          max_pending_per_session=settings.max_pending_per_session,
                          keep_decided=settings.keep_decided,
                          keep_decided_for_s=settings.keep_decided_for_s,
                          ticket_validity_s=settings.ticket_validity_s,
                          lease_s=settings.lease_s)
