"""Approvals in Redis, so every replica of a gateway sees, decides and redeems the same ones.

Each state change is one Lua script, so across replicas the first decision
wins, an approved ticket is redeemed once, and the pending limits hold (two
creates cannot both take the last slot). Whoever makes a change runs the
local listeners (audit, metrics, Slack) and publishes the id; a waiter on
another replica wakes on that message, and polls as well, so a message lost
while the subscription was down delays it by one poll, never past its timeout.

Keys (the same `tether:` prefix as the budgets):

    tether:approval:<id>              hash: the approval, its owner, its Slack message
    tether:approvals:pending          zset: pending ids, scored by expiry
    tether:approvals:decided          zset: ended ids, scored by decision time (for `recent`)
    tether:approvals:binding:<sha256> set: ids bound to one exact call (tickets)
    tether:approvals:events           pub/sub channel: the id of each ended approval

Nothing grows without bound: an approval's hash lives until its timeout plus
`keep_decided_for` (24 h by default; an approved ticket also its validity),
the decided index keeps at most `keep_decided` ids younger than that, and a
binding set expires with the last approval it names.

Scripts touch keys they build from ids, so this needs a single Redis (or a
Sentinel-managed primary), as the budgets do; not Redis Cluster. Expiry uses
the replicas' clocks (keep them in NTP sync). Any Redis failure raises
`StoreUnavailable`; the caller fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..model import Exchange, ToolCall
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
from .settings import ApprovalSettings

log = logging.getLogger("tether.approvals.redis")

ITEM = "tether:approval:"
PENDING = "tether:approvals:pending"
DECIDED = "tether:approvals:decided"
BINDING = "tether:approvals:binding:"
CHANNEL = "tether:approvals:events"
T = TypeVar("T")

CREATE = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')
if #live >= tonumber(ARGV[2]) then return {1, #live} end
local mine = 0
for _, id in ipairs(live) do
  if redis.call('HGET', ARGV[7] .. id, 'owner') == ARGV[4] then mine = mine + 1 end
end
if mine >= tonumber(ARGV[3]) then return {2, mine} end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
local ttl = tonumber(ARGV[6])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[1], ARGV[5], redis.call('HGET', KEYS[2], 'id'))
redis.call('SADD', KEYS[3], redis.call('HGET', KEYS[2], 'id'))
if redis.call('TTL', KEYS[3]) < ttl then redis.call('EXPIRE', KEYS[3], ttl) end
return {0, 0}
"""

# verb: approve | deny | expire. A pending approval past its expiry expires whatever
# the verb; 'expire' on one not yet due changes nothing.
TRANSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, {}} end
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then
  return {1, redis.call('HGETALL', KEYS[1])}
end
local verb = ARGV[2]
if tonumber(redis.call('HGET', KEYS[1], 'expires')) <= tonumber(ARGV[1]) then verb = 'expire'
elseif verb == 'expire' then return {1, redis.call('HGETALL', KEYS[1])} end
local ttl = tonumber(ARGV[8])
if verb == 'expire' then
  redis.call('HSET', KEYS[1], 'state', 'expired', 'decided_by', 'timeout', 'decided_at', ARGV[1])
else
  local state = 'denied'
  if verb == 'approve' then state = 'approved' end
  redis.call('HSET', KEYS[1], 'state', state, 'decided_by', ARGV[3], 'decided_at', ARGV[1])
  if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
  if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'slack_user', ARGV[13]) end
  if verb == 'approve' and redis.call('HGET', KEYS[1], 'mode') == 'ticket' then
    redis.call('HSET', KEYS[1], 'valid_until', ARGV[6])
    ttl = ttl + tonumber(ARGV[11])
  end
end
redis.call('ZREM', KEYS[2], ARGV[9])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[9])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[7]) + 1))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[12])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[10], ARGV[9])
return {2, redis.call('HGETALL', KEYS[1])}
"""

REDEEM = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. id
  local v = redis.call('HMGET', key, 'state', 'mode', 'valid_until')
  if not v[1] then
    redis.call('SREM', KEYS[1], id)
  elseif v[1] == 'approved' and v[2] == 'ticket' and tonumber(v[3]) >= tonumber(ARGV[1]) then
    redis.call('HSET', key, 'state', 'used')
    return redis.call('HGETALL', key)
  end
end
return {}
"""

SET_MESSAGE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'slack_channel', ARGV[1], 'slack_ts', ARGV[2])
end
return 0
"""

CLAIM_MESSAGE = """
local v = redis.call('HMGET', KEYS[1], 'state', 'slack_ts')
if not v[1] or v[1] == 'pending' or not v[2] then return {} end
if redis.call('HSETNX', KEYS[1], 'slack_claimed', '1') == 0 then return {} end
return redis.call('HGETALL', KEYS[1])
"""


def _owner(agent: str | None, session: str | None) -> str:
    return json.dumps([agent, session])


def to_fields(a: Approval) -> dict[str, str]:
    fields = {"id": a.id, "binding": a.binding, "mode": a.mode.value, "tool": a.tool,
              "arguments": a.arguments, "provider": a.provider, "rules": json.dumps(a.rules),
              "message": a.message, "policy_revision": a.policy_revision,
              "approvers": json.dumps(a.approvers), "created": repr(a.created),
              "expires": repr(a.expires), "state": a.state.value,
              "owner": _owner(a.agent, a.session)}
    for key, value in (("session", a.session), ("agent", a.agent),
                       ("decided_by", a.decided_by), ("reason", a.reason)):
        if value is not None:
            fields[key] = value
    for key, number in (("decided_at", a.decided_at), ("valid_until", a.valid_until)):
        if number is not None:
            fields[key] = repr(number)
    return fields


def from_fields(f: Mapping[str, str]) -> Approval:
    def number(key: str) -> float | None:
        return float(f[key]) if key in f else None

    return Approval(
        id=f["id"], binding=f["binding"], mode=Mode(f["mode"]), tool=f["tool"],
        arguments=f["arguments"], session=f.get("session"), agent=f.get("agent"),
        provider=f["provider"], rules=tuple(json.loads(f["rules"])), message=f["message"],
        policy_revision=f["policy_revision"], approvers=tuple(json.loads(f["approvers"])),
        created=float(f["created"]), expires=float(f["expires"]), state=State(f["state"]),
        decided_by=f.get("decided_by"), reason=f.get("reason"), decided_at=number("decided_at"),
        valid_until=number("valid_until"))


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisApprovals:
    """`Approvals` shared by every replica on one Redis."""

    def __init__(self, url: str, *, max_pending: int = 100, max_pending_per_session: int = 5,
                 keep_decided: int = 500, keep_decided_for_s: float = 86400.0,
                 ticket_validity_s: float = 3600.0, poll_s: float = 1.0,
                 timeout_s: float = 0.5) -> None:
        self.url = url
        self.max_pending = max_pending
        self.max_pending_per_session = max_pending_per_session
        self.keep_decided = keep_decided
        self.keep_decided_for_s = keep_decided_for_s
        self.ticket_validity_s = ticket_validity_s
        self.poll_s = poll_s
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            decode_responses=True, health_check_interval=5)
        # The subscription blocks on reads; it gets a connection without a read timeout.
        self._sub: Any = aioredis.from_url(url, socket_connect_timeout=timeout_s,
                                           decode_responses=True)
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
                     approvers: tuple[str, ...], timeout_s: float) -> Approval:
        await self.pending()  # ends what is overdue, so it neither counts nor lingers
        approval = new_approval(call, exchange, mode=mode, rules=rules, message=message,
                                revision=revision, approvers=approvers, timeout_s=timeout_s)
        ttl = math.ceil(timeout_s + self.ticket_validity_s + self.keep_decided_for_s)
        args: list[str | int] = [repr(time.time()), self.max_pending,
                                 self.max_pending_per_session,
                                 _owner(exchange.agent, exchange.session), repr(approval.expires),
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
                   slack_user: str | None = None) -> tuple[Approval | None, bool]:
        """(the approval, whether this call ended it); the listeners run when it did."""
        args = [repr(now), verb, by, reason or "", "1" if reason is not None else "0",
                repr(now + ticket_validity_s), self.keep_decided,
                math.ceil(self.keep_decided_for_s), approval_id, CHANNEL,
                math.ceil(ticket_validity_s), repr(now - self.keep_decided_for_s),
                slack_user or ""]
        code, flat = await self._call("decide", lambda: self._transition(
            keys=[ITEM + approval_id, PENDING, DECIDED], args=args))
        if int(code) == 0:
            return None, False
        approval = from_fields(_pairs(flat))
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

    async def redeem(self, binding: str) -> Approval | None:
        flat = await self._call("redeem", lambda: self._redeem(
            keys=[BINDING + binding], args=[repr(time.time()), ITEM]))
        return from_fields(_pairs(flat)) if flat else None

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
        fields = _pairs(flat)
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
                          ticket_validity_s=settings.ticket_validity_s)
