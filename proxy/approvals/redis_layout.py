"""How an approval lives in Redis: the keys, the hash fields, and the Lua scripts
that change it, each in one step (so across replicas the first decision wins, a ticket
is redeemed once and the pending limits hold). redis_queue.py runs them.

Keys (the same `tether:` prefix as the budgets):

    tether:approval:<id>              hash: the approval, its owner, its Slack message
    tether:approvals:pending          zset: pending ids, scored by expiry
    tether:approvals:decided          zset: ended ids, scored by decision time (for `recent`)
    tether:approvals:binding:<sha256> set: ids bound to one exact call (tickets)
    tether:approvals:events           pub/sub channel: the id of each ended approval
    tether:approvals:lease:<instance> string with a TTL: the replica is alive (its heartbeat)

A `wait` approval names its `waiter`, the replica whose request waits on it. That
replica renews its lease every third of `approvals.lease`; once the lease has
lapsed (the replica was killed, or lost Redis for that long), any replica's sweep
ends the approval `abandoned` (the `orphan` verb: only while the lease is missing,
checked in the same script), so no one approves a call whose caller is gone.

Nothing grows without bound: an approval's hash lives until its timeout plus
`keep_decided_for` (24 h by default; an approved ticket also its validity),
the decided index keeps at most `keep_decided` ids younger than that, and a
binding set expires with the last approval it names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .context import HoldContext
from .queue import Approval, Mode, State

ITEM = "tether:approval:"
PENDING = "tether:approvals:pending"
DECIDED = "tether:approvals:decided"
BINDING = "tether:approvals:binding:"
CHANNEL = "tether:approvals:events"
LEASE = "tether:approvals:lease:"

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

# verb: approve | deny | expire | abandon | orphan. A pending approval past its expiry
# expires whatever the verb; 'expire' on one not yet due changes nothing; 'orphan' is
# 'abandon' only while the lease key KEYS[4] (its waiter's) does not exist.
TRANSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, {}} end
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then
  return {1, redis.call('HGETALL', KEYS[1])}
end
local verb = ARGV[2]
if verb == 'orphan' then
  if redis.call('EXISTS', KEYS[4]) == 1 then return {1, redis.call('HGETALL', KEYS[1])} end
  verb = 'abandon'
end
if tonumber(redis.call('HGET', KEYS[1], 'expires')) <= tonumber(ARGV[1]) then verb = 'expire'
elseif verb == 'expire' then return {1, redis.call('HGETALL', KEYS[1])} end
local ttl = tonumber(ARGV[8])
if verb == 'expire' then
  redis.call('HSET', KEYS[1], 'state', 'expired', 'decided_by', 'timeout', 'decided_at', ARGV[1])
else
  local state = 'denied'
  if verb == 'approve' then state = 'approved' elseif verb == 'abandon' then state = 'abandoned' end
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


def owner(agent: str | None, session: str | None) -> str:
    return json.dumps([agent, session])


def to_fields(a: Approval) -> dict[str, str]:
    fields = {"id": a.id, "binding": a.binding, "mode": a.mode.value, "tool": a.tool,
              "arguments": a.arguments, "provider": a.provider, "rules": json.dumps(a.rules),
              "message": a.message, "policy_revision": a.policy_revision,
              "approvers": json.dumps(a.approvers), "created": repr(a.created),
              "expires": repr(a.expires), "state": a.state.value,
              "owner": owner(a.agent, a.session)}
    for key, value in (("session", a.session), ("agent", a.agent),
                       ("decided_by", a.decided_by), ("reason", a.reason),
                       ("waiter", a.waiter)):
        if value is not None:
            fields[key] = value
    for key, number in (("decided_at", a.decided_at), ("valid_until", a.valid_until)):
        if number is not None:
            fields[key] = repr(number)
    if a.context is not None:  # masked and bounded (approvals/context.py): a few KB at most
        fields["context"] = json.dumps(a.context.as_json(), ensure_ascii=False)
    return fields


def _context(text: str | None) -> HoldContext | None:
    """A record written before holds had a context, or one that does not read: unknown."""
    if text is None:
        return None
    try:
        return HoldContext.from_json(json.loads(text))
    except (ValueError, RecursionError):
        return None


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
        valid_until=number("valid_until"), waiter=f.get("waiter"),
        context=_context(f.get("context")))


def pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
