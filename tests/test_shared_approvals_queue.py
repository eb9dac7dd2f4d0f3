"""The approvals contract, run on both implementations: memory, and Redis shared by two
replicas (two `RedisApprovals` on one real redis-server, as two tethers would hold)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from proxy.approvals.queue import Approval, ApprovalQueue, Approvals, Mode, State, TooManyPending
from proxy.approvals.redis_layout import DECIDED, ITEM, PENDING
from proxy.approvals.redis_queue import RedisApprovals
from proxy.errors import StoreUnavailable
from proxy.model import Exchange, ToolCall
from tests.redis_server import RedisServer


@dataclass
class Pair:
    """Two replicas' views of one store (for memory: the same queue twice)."""

    a: Approvals
    b: Approvals
    url: str | None = None
    created: list[str] = field(default_factory=list)
    decided: list[tuple[str, str]] = field(default_factory=list)

    def listen(self) -> None:
        for q in {id(self.a): self.a, id(self.b): self.b}.values():
            q.on_created(lambda a: self.created.append(a.id))
            q.on_decided(lambda a: self.decided.append((a.id, a.state.value)))


def call(n: int = 0) -> ToolCall:
    return ToolCall("c", "resize_volume", f'{{"n":{n}}}', {"n": n})


def exchange(session: str = "s1") -> Exchange:
    return Exchange(provider="openai", model="m", session=session, agent="bot")


async def create(q: Approvals, n: int = 0, *, session: str = "s1", mode: Mode = Mode.WAIT,
                 timeout_s: float = 30) -> Approval:
    return await q.create(call(n), exchange(session), mode=mode, rules=("r",), message="m",
                          revision="rev", approvers=(), timeout_s=timeout_s)


@pytest.fixture(params=["memory", "redis"])
async def pair(request: pytest.FixtureRequest, own_redis: RedisServer) -> AsyncIterator[Pair]:
    if request.param == "memory":
        q = ApprovalQueue(max_pending=4, max_pending_per_session=3, keep_decided=3)
        made = Pair(q, q)
    else:
        def replica() -> RedisApprovals:
            return RedisApprovals(own_redis.url, max_pending=4, max_pending_per_session=3,
                                  keep_decided=3, keep_decided_for_s=600, poll_s=30)
        made = Pair(replica(), replica(), own_redis.url)
    made.listen()
    yield made
    await made.a.close()
    if made.b is not made.a:
        await made.b.close()


async def test_an_approval_made_on_one_replica_is_seen_on_the_other(pair: Pair) -> None:
    approval = await create(pair.a)
    assert await pair.b.get(approval.id) == approval
    assert [a.id for a in await pair.b.pending()] == [approval.id]
    assert pair.created == [approval.id]


async def test_concurrent_decisions_exactly_one_wins(pair: Pair) -> None:
    approval = await create(pair.a)
    results = await asyncio.gather(*(
        q.decide(approval.id, approve=i % 2 == 0, by=f"user{i}", reason=f"r{i}")
        for i, q in enumerate([pair.a, pair.b] * 10)))
    winners = [(a, i) for i, (a, changed) in enumerate(results) if changed]
    assert len(winners) == 1
    [(won, i)] = winners
    assert won is not None and won.decided_by == f"user{i}" and won.reason == f"r{i}"
    final = await pair.b.get(approval.id)
    assert final is not None and (final.state, final.decided_by) == (won.state, f"user{i}")
    assert all(a is not None and a.state is won.state for a, _ in results)
    assert pair.decided == [(approval.id, won.state.value)]   # listeners ran once, in all


async def test_an_approved_ticket_is_redeemed_exactly_once(pair: Pair) -> None:
    ticket = await create(pair.a, mode=Mode.TICKET)
    assert await pair.b.redeem(ticket.binding) is None      # not approved yet
    decided, changed = await pair.b.decide(ticket.id, approve=True, by="erin",
                                           ticket_validity_s=60)
    assert changed and decided is not None and decided.valid_until is not None
    results = await asyncio.gather(*(q.redeem(ticket.binding) for q in [pair.a, pair.b] * 10))
    used = [r for r in results if r is not None]
    assert len(used) == 1 and used[0].id == ticket.id and used[0].state is State.USED
    assert await pair.a.redeem(ticket.binding) is None
    final = await pair.a.get(ticket.id)
    assert final is not None and final.state is State.USED


async def test_limits_hold_across_replicas_under_concurrency(pair: Pair) -> None:
    results = await asyncio.gather(*(create(q, i, session=f"s{i % 2}")
                                     for i, q in enumerate([pair.a, pair.b] * 4)),
                                   return_exceptions=True)
    made = [r for r in results if isinstance(r, Approval)]
    refused = [r for r in results if isinstance(r, TooManyPending)]
    assert len(made) == 4 and len(refused) == 4
    per_session = {s: sum(1 for a in made if a.session == s) for s in ("s0", "s1")}
    assert all(n <= 3 for n in per_session.values())
    assert len(await pair.b.pending()) == 4


async def test_per_session_limit(pair: Pair) -> None:
    for n in range(3):
        await create(pair.a if n % 2 else pair.b, n)
    with pytest.raises(TooManyPending, match="this session already has 3 pending"):
        await create(pair.a, 9)
    await create(pair.b, 9, session="other")   # another session still may


async def test_expiry_is_a_final_state_decided_once(pair: Pair) -> None:
    approval = await create(pair.a, timeout_s=0.2)
    await asyncio.sleep(0.3)
    results = await asyncio.gather(pair.a.get(approval.id), pair.b.get(approval.id),
                                   pair.b.decide(approval.id, approve=True, by="late"))
    decided, changed = results[2]
    assert not changed and decided is not None and decided.state is State.EXPIRED
    assert all(a is not None and a.state is State.EXPIRED and a.decided_by == "timeout"
               for a in results[:2])
    assert pair.decided == [(approval.id, "expired")]
    assert await pair.a.pending() == []
    assert [a.id for a in await pair.b.recent()] == [approval.id]


async def test_a_waiter_wakes_when_the_other_replica_decides(pair: Pair) -> None:
    approval = await create(pair.a)
    waiter = asyncio.create_task(pair.a.wait(approval.id))
    await asyncio.sleep(0.2)   # subscribed, and waiting
    started = time.monotonic()
    await pair.b.decide(approval.id, approve=True, by="bob")
    final = await asyncio.wait_for(waiter, 5)
    assert final.state is State.APPROVED and final.decided_by == "bob"
    assert time.monotonic() - started < 1.0   # pub/sub, not the 30 s poll


async def test_a_waiter_wakes_at_its_timeout(pair: Pair) -> None:
    approval = await create(pair.a, timeout_s=0.3)
    final = await asyncio.wait_for(pair.a.wait(approval.id), 5)
    assert final.state is State.EXPIRED


async def test_the_slack_message_is_claimed_once_after_the_end(pair: Pair) -> None:
    approval = await create(pair.a)
    await pair.a.set_message(approval.id, "C1", "1.0001")
    assert await pair.b.claim_message(approval.id) is None      # still pending
    await pair.b.decide(approval.id, approve=False, by="x")
    claims = await asyncio.gather(*(q.claim_message(approval.id) for q in [pair.a, pair.b] * 5))
    [claim] = [c for c in claims if c is not None]
    assert (claim.channel, claim.ts, claim.approval.state) == ("C1", "1.0001", State.DENIED)


async def test_recent_keeps_a_bounded_number(pair: Pair) -> None:
    for n in range(5):
        approval = await create(pair.a, n, session=f"s{n}")
        await pair.b.decide(approval.id, approve=False, by="x")
    await create(pair.a, 9)   # the memory queue trims when it adds
    assert len(await pair.a.recent()) == 3


# -- Redis only --------------------------------------------------------------------------

@pytest.fixture
async def replicas(own_redis: RedisServer) -> AsyncIterator[tuple[RedisApprovals, ...]]:
    made = [RedisApprovals(own_redis.url, keep_decided_for_s=600, poll_s=0.2)
            for _ in range(2)]
    yield tuple(made)
    for q in made:
        await q.close()


async def test_a_lost_message_is_caught_by_polling(replicas: tuple[RedisApprovals, ...],
                                                   own_redis: RedisServer) -> None:
    a, _ = replicas
    approval = await create(a)
    waiter = asyncio.create_task(a.wait(approval.id))
    await asyncio.sleep(0.1)
    raw = aioredis.from_url(own_redis.url, decode_responses=True)
    try:   # decided behind the queue's back: no message is published
        await raw.hset(ITEM + approval.id, mapping={"state": "approved", "decided_by": "ops",
                                                    "decided_at": repr(time.time())})
    finally:
        await raw.aclose()
    final = await asyncio.wait_for(waiter, 2)
    assert final.state is State.APPROVED and final.decided_by == "ops"


async def test_keys_expire_and_indexes_stay_bounded(replicas: tuple[RedisApprovals, ...],
                                                    own_redis: RedisServer) -> None:
    a, b = replicas
    approval = await create(a, timeout_s=30)
    ticket = await create(a, 1, mode=Mode.TICKET, timeout_s=30)
    raw = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        ttl = await raw.ttl(ITEM + approval.id)
        assert 30 + 3600 + 600 - 5 <= ttl <= 30 + 3600 + 600
        await b.decide(approval.id, approve=False, by="x")
        await b.decide(ticket.id, approve=True, by="x", ticket_validity_s=60)
        assert 590 <= await raw.ttl(ITEM + approval.id) <= 600            # keep_decided_for
        assert 650 <= await raw.ttl(ITEM + ticket.id) <= 660              # + its validity
        assert await raw.zcard(PENDING) == 0 and await raw.zcard(DECIDED) == 2
        assert 0 < await raw.ttl("tether:approvals:binding:" + ticket.binding)
    finally:
        await raw.aclose()


async def test_redis_down_raises_store_unavailable(own_redis: RedisServer) -> None:
    q = RedisApprovals(own_redis.url, poll_s=0.1)
    try:
        approval = await create(q, timeout_s=0.5)
        waiter = asyncio.create_task(q.wait(approval.id))
        await asyncio.sleep(0.1)
        own_redis.stop()
        with pytest.raises(StoreUnavailable, match="approval store"):
            await create(q, 1)
        with pytest.raises(StoreUnavailable):   # the outcome cannot be read: not a pass
            await asyncio.wait_for(waiter, 5)
    finally:
        await q.close()
