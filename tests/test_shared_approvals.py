"""Two real tethers on one redis-server, as two gateway replicas: a call held on one is
decided through the other (REST or a signed Slack click), and tickets, races and a
Redis outage behave as one tether would, failing closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.approvals.slack.messages import APPROVE, DENY
from proxy.demo.fake_slack import FakeSlack
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.redis_server import RedisServer
from tests.test_e2e_openai import MESSAGES, TOOLS
from tests.test_slack import BOT_TOKEN, CHANNEL, SECRET, section_texts, sign

TOKEN = "shared-approvals-token"
ARGS = '{"volume_id": "vol-7", "size_gb": 50}'
HELD = Call("resize_volume", ARGS)
TICKET = Call("delete_volume", '{"volume_id": "vol-1"}')
POLICY = """
rules:
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 30s
    message: Resizing needs a human
  - id: tickets
    match: {tool: delete_volume}
    action: hold
    mode: ticket
    timeout: 30s
  - id: quick
    match: {tool: list_volumes}
    action: hold
    timeout: 600ms
approvals: {keepalive: 100ms}
"""
ALICE = "U0ALICE"


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("TETHER_TEST_SLACK_BOT", BOT_TOKEN)
    monkeypatch.setenv("TETHER_TEST_SLACK_SECRET", SECRET)


@pytest.fixture
async def slack() -> AsyncIterator[tuple[FakeSlack, str]]:
    fake = FakeSlack(token=BOT_TOKEN)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}/api"
    await runner.cleanup()


async def replicas(make_stack: MakeStack, redis: RedisServer, slack_api: str | None = None,
                   more: str = "") -> tuple[Stack, Stack]:
    extra = f"store: {redis.url}\n{more}"
    if slack_api is not None:
        extra += (f"slack:\n  channel: {CHANNEL}\n  approvers: [{ALICE}]\n"
                  f"  bot_token_env: TETHER_TEST_SLACK_BOT\n"
                  f"  signing_secret_env: TETHER_TEST_SLACK_SECRET\n  api_url: {slack_api}\n")
    fake = FakeOpenAI()   # one model behind both, as one upstream behind two replicas
    a = await make_stack(policy=POLICY, fake=fake, extra=extra)
    b = await make_stack(policy=POLICY, fake=fake, extra=extra)
    return a, b


async def admin(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None
                ) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.admin_url + path, json=body,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            return resp.status, await resp.json()


async def pending(stack: Stack, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(250):
        _, body = await admin(stack, "GET", "/v1/approvals")
        if len(body["pending"]) >= count:
            return list(body["pending"])
        await asyncio.sleep(0.02)
    raise AssertionError("no approval appeared")


def ask(stack: Stack, call: Call, session: str = "s-1"
        ) -> asyncio.Task[tuple[str, list[tuple[str, str]]]]:
    stack.fake.push(Reply(content="On it.", calls=(call,)))
    client = stack.client(default_headers={"X-Tether-Session": session})

    async def run() -> tuple[str, list[tuple[str, str]]]:
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        m = r.choices[0].message
        return m.content or "", [(c.function.name, c.function.arguments)
                                 for c in m.tool_calls or [] if c.type == "function"]

    return asyncio.create_task(run())


def approval_events(stack: Stack) -> list[tuple[str, str | None]]:
    return [(r["event"], r.get("decided_by")) for r in stack.audit() if r["kind"] == "approval"]


@pytest.mark.parametrize("approve", [True, False])
async def test_held_on_a_decided_through_b_rest(make_stack: MakeStack, own_redis: RedisServer,
                                                approve: bool) -> None:
    a, b = await replicas(make_stack, own_redis)
    agent = ask(a, HELD)
    [approval] = await pending(b)          # B lists what A holds
    assert approval["tool"] == "resize_volume" and approval["state"] == "pending"
    started = time.monotonic()
    status, body = await admin(b, "POST", f"/v1/approvals/{approval['id']}/"
                               f"{'approve' if approve else 'deny'}", {"by": "alice",
                                                                        "reason": "planned"})
    assert status == 200 and body["decided_by"] == "alice"
    text, calls = await asyncio.wait_for(agent, 10)
    assert time.monotonic() - started < 1.0   # woken by B's message, not a poll
    if approve:
        assert calls == [("resize_volume", ARGS)] and text == "On it."
    else:
        assert calls == [] and "denied by alice (approval" in text and "planned" in text
    [decision] = a.decisions()
    assert (decision["tool"], decision["action"]) == ("resize_volume", "hold")
    # Each replica audits what it did: A opened it, B decided it.
    assert approval_events(a) == [("created", None)]
    assert approval_events(b) == [("approved" if approve else "denied", "alice")]
    status, again = await admin(a, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "z"})
    assert status == 409 and again["approval"]["decided_by"] == "alice"


@pytest.mark.parametrize("action", [APPROVE, DENY])
async def test_held_on_a_decided_by_a_slack_click_on_b(
        make_stack: MakeStack, own_redis: RedisServer, slack: tuple[FakeSlack, str],
        action: str) -> None:
    fake, api = slack
    a, b = await replicas(make_stack, own_redis, api)
    agent = ask(a, HELD)
    [post] = await fake.wait_for("chat.postMessage")
    [(channel, ts)] = list(fake.messages)
    assert post.body["channel"] == CHANNEL
    body = fake.click_body(channel, ts, action, user=ALICE, username="alice")
    stamp = str(int(time.time()))
    async with aiohttp.ClientSession() as http, http.post(
            b.admin_url + "/slack/interactions", data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "X-Slack-Request-Timestamp": stamp,
                     "X-Slack-Signature": sign(body, stamp)}) as resp:
        assert resp.status == 200
        reply = await resp.json()
    assert reply["text"].startswith("Approved" if action == APPROVE else "Denied")
    text, calls = await asyncio.wait_for(agent, 10)
    if action == APPROVE:
        assert calls == [("resize_volume", ARGS)]
    else:
        assert calls == [] and "denied by slack:U0ALICE (alice)" in text
    # B edits the message A posted, once, with the clicker as a mention.
    [update] = await fake.wait_for("chat.update")
    assert (update.body["channel"], update.body["ts"]) == (channel, ts)
    verdict = ":white_check_mark: *Approved*" if action == APPROVE else ":no_entry: *Denied*"
    assert section_texts(update.body)[-1].startswith(f"{verdict} by <@{ALICE}>")
    await asyncio.sleep(0.3)
    assert len(fake.of("chat.update")) == 1 and len(fake.of("chat.postMessage")) == 1


async def test_a_rest_decision_on_b_edits_the_slack_message_posted_by_a(
        make_stack: MakeStack, own_redis: RedisServer, slack: tuple[FakeSlack, str]) -> None:
    fake, api = slack
    a, b = await replicas(make_stack, own_redis, api)
    agent = ask(a, HELD)
    await fake.wait_for("chat.postMessage")
    [approval] = await pending(b)
    await admin(b, "POST", f"/v1/approvals/{approval['id']}/deny", {"by": "oncall"})
    await asyncio.wait_for(agent, 10)
    [update] = await fake.wait_for("chat.update")
    assert section_texts(update.body)[-1].startswith(":no_entry: *Denied* by `oncall`")


async def test_a_ticket_approved_on_b_is_redeemed_once_across_replicas(
        make_stack: MakeStack, own_redis: RedisServer) -> None:
    a, b = await replicas(make_stack, own_redis)
    # A ticket binds the policy revision; these two configs differ in their audit paths,
    # which are not policy, so the revisions agree.
    assert b.tether.holds.revision == a.tether.holds.revision
    text, calls = await asyncio.wait_for(ask(a, TICKET, "tickets"), 10)
    assert calls == []
    [ticket] = await pending(b)
    assert ticket["mode"] == "ticket" and ticket["id"] in text
    _, calls = await asyncio.wait_for(ask(b, TICKET, "tickets"), 10)   # same ticket, on B
    assert calls == [] and len(await pending(a)) == 1
    status, _ = await admin(b, "POST", f"/v1/approvals/{ticket['id']}/approve", {"by": "erin"})
    assert status == 200
    results = await asyncio.wait_for(asyncio.gather(
        *(ask(stack, TICKET, "tickets") for stack in (a, b, a, b))), 10)
    allowed = [calls for _, calls in results if calls]
    assert allowed == [[("delete_volume", TICKET.arguments)]]
    used = [e for s in (a, b) for e in approval_events(s) if e[0] == "used"]
    assert used == [("used", "erin")]


async def test_concurrent_decisions_on_a_and_b_one_wins(make_stack: MakeStack,
                                                         own_redis: RedisServer) -> None:
    a, b = await replicas(make_stack, own_redis)
    agent = ask(a, HELD)
    [approval] = await pending(a)
    path = f"/v1/approvals/{approval['id']}"
    results = await asyncio.gather(
        *(admin(stack, "POST", f"{path}/{verb}", {"by": f"{verb}-{i}"})
          for i, (stack, verb) in enumerate([(a, "approve"), (b, "deny")] * 4)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [409] * 7
    [(_, won)] = [(s, body) for s, body in results if s == 200]
    assert all(body["approval"]["decided_by"] == won["decided_by"]
               for s, body in results if s == 409)
    _, calls = await asyncio.wait_for(agent, 10)
    assert (calls == [("resize_volume", ARGS)]) == (won["state"] == "approved")
    decided = [e for s in (a, b) for e in approval_events(s) if e[0] != "created"]
    assert decided == [(won["state"], won["decided_by"])]


async def test_redis_down_a_hold_is_denied_fail_closed(make_stack: MakeStack,
                                                      own_redis: RedisServer) -> None:
    # Budgets may be set to fail open without Redis; a hold never is. (With the default,
    # the session guard already refuses the request with a 503 before any hold.)
    a, _ = await replicas(make_stack, own_redis, more="defaults: {on_store_error: allow}\n")
    own_redis.stop()
    text, calls = await asyncio.wait_for(ask(a, HELD), 10)
    assert calls == []
    assert "approval store (Redis) is unavailable" in text and "so it is denied" in text
    [record] = [r for r in a.audit() if r["kind"] == "approval"]
    assert record["event"] == "store_unavailable" and record["tool"] == "resize_volume"
    [decision] = a.decisions()
    assert decision["action"] == "hold"
    async with aiohttp.ClientSession() as http:
        async with http.get(a.admin_url + "/metrics") as resp:
            assert 'tether_approvals_decided_total{outcome="unavailable"} 1.0' in await resp.text()
        async with http.get(a.admin_url + "/readyz") as resp:
            assert resp.status == 503
    status, body = await admin(a, "GET", "/v1/approvals")
    assert status == 503 and "Redis" in body["error"]["message"]


async def test_redis_lost_while_waiting_ends_denied(make_stack: MakeStack,
                                                    own_redis: RedisServer) -> None:
    a, _ = await replicas(make_stack, own_redis)
    agent = ask(a, Call("list_volumes", "{}"))
    await pending(a)
    own_redis.stop()
    text, calls = await asyncio.wait_for(agent, 10)
    assert calls == [] and "approval store (Redis) is unavailable" in text


async def test_stopping_a_replica_ends_only_its_own_waits(make_stack: MakeStack,
                                                          own_redis: RedisServer) -> None:
    a, b = await replicas(make_stack, own_redis)
    on_a = ask(a, HELD, "sa")   # one at a time: both replicas share the fake's replies
    await pending(a, 1)
    on_b = ask(b, HELD, "sb")
    await pending(a, 2)
    await asyncio.wait_for(ask(b, TICKET, "sb"), 10)   # a ticket opened through B
    listed = await pending(a, 3)
    await a.tether.close()
    _, calls = await asyncio.wait_for(on_a, 10)
    assert calls == []
    mine = {x["session"]: x["id"] for x in listed if x["mode"] == "wait"}
    status, ended = await admin(b, "GET", f"/v1/approvals/{mine['sa']}")
    assert ended["state"] == "abandoned" and ended["decided_by"] == "tether"
    still = {x["id"] for x in await pending(b, 2)}
    assert mine["sb"] in still and len(still) == 2   # B's wait and the ticket live on
    await admin(b, "POST", f"/v1/approvals/{mine['sb']}/approve", {"by": "bob"})
    _, calls = await asyncio.wait_for(on_b, 10)
    assert calls == [("resize_volume", ARGS)]
