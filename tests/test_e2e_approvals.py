"""Holds end to end: the official SDKs wait while a human decides over the REST API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import aiohttp
import anthropic
import pytest

from proxy.demo.fake_anthropic import FakeAnthropic
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_openai import MESSAGES, TOOLS, collect

TOKEN = "approvals-test-token"
ARGS = '{ "volume_id": "vol-7",  "size_gb": 50, "note": "caf\\u00e9" }'
HELD = Call("resize_volume", ARGS)
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
approvals: {keepalive: 100ms, max_pending_per_session: 2}
"""


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


async def admin(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None
                ) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.admin_url + path, json=body,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            return resp.status, await resp.json()


async def pending(stack: Stack, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(200):
        _, body = await admin(stack, "GET", "/v1/approvals")
        if len(body["pending"]) >= count:
            return list(body["pending"])
        await asyncio.sleep(0.02)
    raise AssertionError("no approval appeared")


@pytest.fixture
async def held(make_stack: MakeStack) -> Stack:
    return await make_stack(policy=POLICY)


@pytest.mark.parametrize("stream", [False, True])
async def test_approved_call_is_released_unchanged(held: Stack, stream: bool) -> None:
    held.fake.push(Reply(content="Resizing.", calls=(HELD, Call("get_weather", "{}"))))
    client = held.client()

    async def ask() -> tuple[str, list[tuple[str, str]]]:
        if stream:
            s = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                     stream=True)
            text, calls, _ = await collect(s)
            return text, [(c[1], c[2]) for c in calls.values()]
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        m = r.choices[0].message
        return m.content or "", [(c.function.name, c.function.arguments)
                                 for c in m.tool_calls or [] if c.type == "function"]

    task = asyncio.create_task(ask())
    [approval] = await pending(held)
    assert approval["tool"] == "resize_volume" and approval["rules"] == ["resize-needs-approval"]
    assert json.loads(approval["arguments"]) == json.loads(ARGS)
    assert not task.done()
    status, body = await admin(held, "POST", f"/v1/approvals/{approval['id']}/approve",
                               {"by": "alice", "reason": "planned"})
    assert status == 200 and body["state"] == "approved" and body["decided_by"] == "alice"
    text, calls = await asyncio.wait_for(task, 10)
    assert calls == [("resize_volume", ARGS), ("get_weather", "{}")]
    assert text == "Resizing."
    events = [(r["event"], r.get("decided_by")) for r in held.audit() if r["kind"] == "approval"]
    assert events == [("created", None), ("approved", "alice")]


async def test_stream_gets_keepalives_while_it_waits(held: Stack) -> None:
    held.fake.push(Reply(content="Resizing.", calls=(HELD,)))
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "stream": True}
    received = bytearray()

    async def read() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(held.base_url + "/chat/completions", json=body) as resp:
                async for chunk in resp.content.iter_any():
                    received.extend(chunk)

    task = asyncio.create_task(read())
    [approval] = await pending(held)
    await asyncio.sleep(0.35)
    assert b"Resi" in received and b"zing" in received  # text before the call: delivered
    assert received.count(b": tether: waiting for approval " + approval["id"].encode()) >= 2
    assert b"resize_volume" not in received    # the call itself was not
    await admin(held, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "bob"})
    await asyncio.wait_for(task, 10)
    assert b"resize_volume" in received and received.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_is_explained(held: Stack, stream: bool) -> None:
    held.fake.push(Reply(calls=(HELD,)))
    client = held.client()

    async def ask() -> tuple[str, int]:
        if stream:
            s = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                     stream=True)
            text, calls, _ = await collect(s)
            return text, len(calls)
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        return r.choices[0].message.content or "", len(r.choices[0].message.tool_calls or [])

    task = asyncio.create_task(ask())
    [approval] = await pending(held)
    await admin(held, "POST", f"/v1/approvals/{approval['id']}/deny",
                {"by": "carol", "reason": "not during the freeze"})
    text, count = await asyncio.wait_for(task, 10)
    assert count == 0
    assert "denied by carol" in text and "not during the freeze" in text
    assert "Resizing needs a human" in text


async def test_timeout_is_a_deny_and_a_late_click_does_nothing(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=POLICY.replace("timeout: 30s", "timeout: 200ms"))
    stack.fake.push(Reply(calls=(HELD,)))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None
    assert "no one approved it within 0.2 s" in (r.choices[0].message.content or "")
    _, body = await admin(stack, "GET", "/v1/approvals")
    [expired] = body["recent"]
    status, late = await admin(stack, "POST", f"/v1/approvals/{expired['id']}/approve",
                               {"by": "late"})
    assert status == 409 and late["approval"]["state"] == "expired"


async def test_anthropic_held_call_approved(make_stack: MakeStack) -> None:
    fake = FakeAnthropic()
    stack = await make_stack(policy=POLICY, upstreams={"anthropic": fake})
    fake.push(Reply(content="Resizing.", calls=(HELD,)))
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    tools: list[anthropic.types.ToolParam] = [
        {"name": "resize_volume", "input_schema": {"type": "object"}}]
    try:
        async def ask() -> anthropic.types.Message:
            async with client.messages.stream(model="claude-test", max_tokens=100, tools=tools,
                                              messages=[{"role": "user", "content": "go"}]) as s:
                return await s.get_final_message()

        task = asyncio.create_task(ask())
        [approval] = await pending(stack)
        await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "dave"})
        message = await asyncio.wait_for(task, 10)
    finally:
        await client.close()
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("resize_volume", json.loads(ARGS))]
    assert message.stop_reason == "tool_use"


DELETE = Call("delete_volume", '{"volume_id": "vol-1"}')
DELETE_OTHER = Call("delete_volume", '{"volume_id": "vol-2"}')


async def test_ticket_mode(held: Stack) -> None:
    client = held.client(default_headers={"X-Tether-Session": "ticket"})

    async def ask(call: Call) -> tuple[str, list[str]]:
        held.fake.push(Reply(calls=(call,)))
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        m = r.choices[0].message
        return m.content or "", [c.function.arguments for c in m.tool_calls or []
                                 if c.type == "function"]

    text, calls = await ask(DELETE)          # answered at once, with the ticket
    assert calls == []
    [ticket] = (await admin(held, "GET", "/v1/approvals"))[1]["pending"]
    assert ticket["mode"] == "ticket" and ticket["id"] in text
    text, calls = await ask(DELETE)          # re-issued before approval: the same ticket
    assert calls == [] and ticket["id"] in text
    assert len((await admin(held, "GET", "/v1/approvals"))[1]["pending"]) == 1
    await admin(held, "POST", f"/v1/approvals/{ticket['id']}/approve", {"by": "erin"})
    text, calls = await ask(DELETE_OTHER)    # other arguments: not covered, held anew
    assert calls == [] and ticket["id"] not in text
    text, calls = await ask(DELETE)          # the approved call: allowed, once
    assert calls == [DELETE.arguments]
    text, calls = await ask(DELETE)          # used up: held again
    assert calls == []
    other = held.client(default_headers={"X-Tether-Session": "another-session"})
    held.fake.push(Reply(calls=(DELETE,)))
    r = await other.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None  # a ticket binds its session


async def test_pending_limit_per_session(held: Stack) -> None:
    client = held.client(default_headers={"X-Tether-Session": "flood"})
    held.fake.push(*(Reply(calls=(Call("resize_volume", f'{{"n": {i}}}'),)) for i in range(3)))
    tasks = [asyncio.create_task(client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS)) for _ in range(2)]
    waiting = await pending(held, 2)
    r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert "already has 2 pending approvals" in (r.choices[0].message.content or "")
    assert held.decisions()[-1]["tool"] == "resize_volume"
    for a in waiting:
        await admin(held, "POST", f"/v1/approvals/{a['id']}/deny", {"by": "x"})
    await asyncio.gather(*tasks)


async def test_the_agent_cannot_approve_on_the_proxy_port(held: Stack) -> None:
    held.fake.push(Reply(calls=(HELD,)))
    task = asyncio.create_task(held.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    [approval] = await pending(held)
    async with aiohttp.ClientSession() as http:
        for path in (f"/v1/approvals/{approval['id']}/approve",
                     f"/openai/v1/approvals/{approval['id']}/approve",
                     f"/anthropic/v1/approvals/{approval['id']}/approve"):
            async with http.post(held.proxy_url + path, json={"by": "agent"},
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status != 200 or path.startswith("/openai/")
    status, current = await admin(held, "GET", f"/v1/approvals/{approval['id']}")
    assert status == 200 and current["state"] == "pending"
    await admin(held, "POST", f"/v1/approvals/{approval['id']}/deny", {"by": "x"})
    await task


async def test_approval_api_needs_the_token(held: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(held.admin_url + "/v1/approvals") as resp:
            assert resp.status == 401
        async with http.post(held.admin_url + "/v1/approvals/apv_x/approve") as resp:
            assert resp.status == 401


async def test_a_disconnected_agent_abandons_its_pending_approval(held: Stack) -> None:
    held.fake.push(Reply(content="x", calls=(HELD,)))
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "stream": True}

    async def read() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(held.base_url + "/chat/completions", json=body) as resp:
                await resp.content.read(10)

    task = asyncio.create_task(read())
    [approval] = await pending(held)
    await task  # the client has gone
    for _ in range(100):
        _, current = await admin(held, "GET", f"/v1/approvals/{approval['id']}")
        if current["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert current["state"] == "abandoned" and current["decided_by"] == "tether"


async def test_stopping_tether_denies_what_is_pending(held: Stack) -> None:
    held.fake.push(Reply(calls=(HELD,)))
    task = asyncio.create_task(held.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    await pending(held)
    await held.tether.close()
    r = await asyncio.wait_for(task, 10)
    assert r.choices[0].message.tool_calls is None
    records = [r for r in held.audit() if r["kind"] == "approval"]
    assert records[-1]["event"] == "abandoned" and records[-1]["decided_by"] == "tether"
    assert "tether is restarting" in records[-1]["reason"]


async def test_cli_lists_and_approves(held: Stack) -> None:
    held.fake.push(Reply(calls=(HELD,)))
    task = asyncio.create_task(held.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    [approval] = await pending(held)
    env = {**os.environ, "TETHER_ADMIN_TOKEN": TOKEN}

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "approvals", *args,
                             "--admin-url", held.admin_url], capture_output=True, text=True,
            env=env, timeout=30)

    listed = await cli("list")
    assert listed.returncode == 0 and approval["id"] in listed.stdout
    assert "resize_volume" in listed.stdout
    approved = await cli("approve", approval["id"], "--by", "frank")
    assert approved.returncode == 0, approved.stderr
    r = await asyncio.wait_for(task, 10)
    assert [c.function.name for c in r.choices[0].message.tool_calls or []
            if c.type == "function"] == ["resize_volume"]
    again = await cli("deny", approval["id"], "--reason", "too late")
    assert again.returncode == 1 and "already approved" in again.stderr
