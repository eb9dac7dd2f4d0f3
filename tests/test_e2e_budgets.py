"""Budgets and loop breakers, end to end with the official openai SDK."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam

from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.redis_server import RedisServer, free_port
from tests.test_e2e_openai import MESSAGES, TOOLS, collect

TOKEN = "admin-test-token"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


def budget(session: str, store: str = "memory") -> str:
    return f"store: {store}\nbudgets:\n  session: {{{session}}}\n"


async def session_status(stack: Stack, session: str, agent: str | None = None
                         ) -> dict[str, object]:
    query = f"?agent={agent}" if agent else ""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/v1/sessions/{session}{query}",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            body: dict[str, object] = await resp.json()
            return body


async def fifty_at_once(stack: Stack, session: str) -> tuple[int, list[openai.APIStatusError]]:
    client = stack.client(default_headers={"X-Tether-Session": session})

    async def one() -> openai.APIStatusError | None:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                 max_tokens=100)
        except openai.APIStatusError as e:
            return e
        return None

    results = await asyncio.gather(*(one() for _ in range(50)))
    errors = [r for r in results if r is not None]
    return 50 - len(errors), errors


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_fifty_concurrent_requests_one_budget_slot(make_stack: MakeStack, store: str,
                                                         redis_server: RedisServer) -> None:
    url = redis_server.url if store == "redis" else "memory"
    stack = await make_stack(extra=budget("llm_calls: 1", url))
    session = f"fifty-{store}-{os.getpid()}"
    passed, errors = await fifty_at_once(stack, session)
    assert passed == 1
    assert len(stack.fake.requests) == 1
    assert len(errors) == 49
    for e in errors:
        assert e.status_code == 429
        assert e.response.headers["x-should-retry"] == "false"
        assert isinstance(e.body, dict) and e.body["code"] == "budget_exceeded"
        assert "session llm_calls budget spent" in e.message


async def test_token_budget_covering_exactly_one_worst_case(make_stack: MakeStack) -> None:
    # The worst case of one request is its input estimate + max_tokens (100).
    stack = await make_stack(extra=budget("tokens: 150"))
    passed, errors = await fifty_at_once(stack, "tokens-one")
    assert (passed, len(stack.fake.requests), len(errors)) == (1, 1, 49)
    status = await session_status(stack, "tokens-one")
    spent = status["spent"]
    assert isinstance(spent, dict) and spent["tokens"] == 36  # settled to the real usage


async def test_two_tethers_share_one_redis_budget(make_stack: MakeStack,
                                                  redis_server: RedisServer) -> None:
    fake = FakeOpenAI()
    first = await make_stack(fake=fake, extra=budget("llm_calls: 3", redis_server.url))
    second = await make_stack(fake=fake, extra=budget("llm_calls: 3", redis_server.url))
    session = f"shared-{os.getpid()}"
    clients = [s.client(default_headers={"X-Tether-Session": session}) for s in (first, second)]

    async def one(i: int) -> bool:
        try:
            await clients[i % 2].chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.RateLimitError:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert sum(results) == 3 and len(fake.requests) == 3


async def test_redis_down_fails_closed_and_recovers(make_stack: MakeStack,
                                                    own_redis: RedisServer) -> None:
    stack = await make_stack(extra=budget("llm_calls: 100", own_redis.url))
    client = stack.client(default_headers={"X-Tether-Session": "outage"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    own_redis.stop()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 503
    assert "session store (Redis) is unavailable" in info.value.message
    assert len(stack.fake.requests) == 1
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.admin_url + "/readyz") as resp:
            assert resp.status == 503
    own_redis.start()
    for _ in range(50):  # the client reconnects on its own
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            break
        except openai.APIStatusError:
            await asyncio.sleep(0.1)
    assert len(stack.fake.requests) == 2


async def test_store_failure_may_fail_open_when_configured(make_stack: MakeStack,
                                                           own_redis: RedisServer) -> None:
    stack = await make_stack(extra=budget("llm_calls: 100", own_redis.url)
                             + "defaults: {on_store_error: allow}\n")
    own_redis.stop()
    client = stack.client(default_headers={"X-Tether-Session": "open"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(stack.fake.requests) == 1
    own_redis.start()


async def test_stream_cut_by_the_client_is_charged(make_stack: MakeStack) -> None:
    long = Reply(content="word " * 400)
    fake = FakeOpenAI(delay_s=0.002)
    fake.push(long)
    stack = await make_stack(fake=fake, extra=budget("tokens: 100000"))
    client = stack.client(default_headers={"X-Tether-Session": "cut"})
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                  stream=True)
    seen = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 10:
                break
    await stream.close()
    status = {}
    for _ in range(50):
        status = await session_status(stack, "cut")
        spent = status["spent"]
        assert isinstance(spent, dict)
        if spent.get("output_tokens", 0) < 4096:  # settled from the reservation
            break
        await asyncio.sleep(0.05)
    spent = status["spent"]
    assert isinstance(spent, dict)
    assert 10 <= spent["output_tokens"] < 100
    assert spent["llm_calls"] == 1 and spent["input_tokens"] > 0


async def test_stream_without_include_usage_is_charged_its_real_usage(stack: Stack,
                                                                      make_stack: MakeStack) -> None:
    stack = await make_stack(extra=budget("tokens: 100000"))
    stack.fake.push(Reply(content="hello there"))
    client = stack.client(default_headers={"X-Tether-Session": "usage"})
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                  stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)  # no usage-only chunk reached the client
    assert all(c.usage is None for c in chunks)
    assert stack.fake.requests[-1]["stream_options"] == {"include_usage": True}
    status = await session_status(stack, "usage")
    assert status["spent"] == {"tokens": 36, "input_tokens": 24, "output_tokens": 12,
                               "cost_usd": 11, "llm_calls": 1}


async def test_client_that_asked_for_usage_still_gets_it(make_stack: MakeStack) -> None:
    stack = await make_stack(extra=budget("tokens: 100000"))
    stack.fake.push(Reply(content="hi"))
    stream = await stack.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 36


DESCRIBE = Call("describe_volume", '{"volume_id": "vol-0b2"}')
DESCRIBE_TOOLS: list[ChatCompletionToolParam] = [
    *TOOLS, {"type": "function", "function": {"name": "describe_volume"}}]


@pytest.mark.parametrize("stream", [False, True])
async def test_janitor_repeating_a_call_trips_at_n_plus_one(make_stack: MakeStack,
                                                             stream: bool) -> None:
    fake = FakeOpenAI(script=lambda body: Reply(calls=(DESCRIBE,)))
    stack = await make_stack(fake=fake, extra=budget("repeats: 3"))
    client = stack.client(default_headers={"X-Tether-Session": f"janitor-{stream}"})
    texts = []
    for _ in range(4):
        if stream:
            s = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                     tools=DESCRIBE_TOOLS, stream=True)
            text, calls, _ = await collect(s)
            texts.append((text, [c[1] for c in calls.values()]))
        else:
            r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                     tools=DESCRIBE_TOOLS)
            msg = r.choices[0].message
            texts.append((msg.content or "", [c.function.name for c in msg.tool_calls or []
                                              if c.type == "function"]))
    assert [calls for _, calls in texts] == [["describe_volume"]] * 3 + [[]]
    assert "same arguments 4 times" in texts[3][0] and "tether:loop-repeat" in texts[3][0]
    # The denial is sent to the model (on_deny: continue, the default); this model asks
    # again every time, so the fourth answer ends at the bound (3 continuations), in one
    # answer to the agent, every repeat denied.
    assert "same arguments 7 times" in texts[3][0]
    assert [r["action"] for r in stack.decisions()] == ["allow"] * 3 + ["deny"] * 4
    assert all(r["rules"] == ["tether:loop-repeat"] for r in stack.decisions()[3:])
    assert [r["outcome"] for r in stack.audit() if r["kind"] == "continuation"] \
        == ["sent"] * 3 + ["bound"]
    assert len(fake.requests) == 3 + 4


async def test_loop_with_trip_session_stops_the_session(make_stack: MakeStack) -> None:
    fake = FakeOpenAI(script=lambda body: Reply(calls=(DESCRIBE,)))
    stack = await make_stack(fake=fake, extra=budget("repeats: 1, trip: session"))
    client = stack.client(default_headers={"X-Tether-Session": "trip"})
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                             tools=DESCRIBE_TOOLS)
    with pytest.raises(openai.RateLimitError, match="this session was stopped"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(fake.requests) == 2
    other = stack.client(default_headers={"X-Tether-Session": "another"})
    await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # reset through the admin API lets the session go on
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.admin_url}/v1/sessions/trip/reset",
                             headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_ping_pong_is_denied(make_stack: MakeStack) -> None:
    a = Call("get_weather", '{"city": "Oslo"}')
    b = Call("list_volumes", "{}")
    fake = FakeOpenAI()
    fake.push(*(Reply(calls=(c,)) for c in (a, b, a, b)))
    stack = await make_stack(fake=fake, extra=budget("pingpong: 2"))
    client = stack.client(default_headers={"X-Tether-Session": "pingpong"})
    for _ in range(4):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                             tools=TOOLS)
    assert [(r["tool"], r["action"]) for r in stack.decisions()] == [
        ("get_weather", "allow"), ("list_volumes", "allow"), ("get_weather", "allow"),
        ("list_volumes", "deny")]
    assert stack.decisions()[3]["rules"] == ["tether:loop-pingpong"]


async def test_per_tool_count(make_stack: MakeStack) -> None:
    fake = FakeOpenAI(script=lambda body: Reply(calls=(Call("get_weather", '{"city": "x"}'),)))
    stack = await make_stack(fake=fake, extra=budget("tools: {get_weather: 2}"))
    client = stack.client(default_headers={"X-Tether-Session": "tools"})
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS)
    # The third answer's call is denied, and so is every one the model asks for after
    # reading why (on_deny: continue, the default, up to its bound of 3).
    assert [r["action"] for r in stack.decisions()] == ["allow", "allow"] + ["deny"] * 4
    status = await session_status(stack, "tools")
    assert status["tool_calls"] == {"get_weather": 2}  # the denied calls are not counted


async def test_shadow_mode_counts_but_does_not_enforce(make_stack: MakeStack) -> None:
    stack = await make_stack(extra=budget("llm_calls: 1, mode: shadow"))
    client = stack.client(default_headers={"X-Tether-Session": "shadow"})
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(stack.fake.requests) == 3
    status = await session_status(stack, "shadow")
    assert status["mode"] == "shadow" and status["spent"]["llm_calls"] == 3  # type: ignore[index]
    budget_records = [r for r in stack.audit() if r["kind"] == "budget"]
    assert len(budget_records) == 2 and not budget_records[0]["enforced"]
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.admin_url + "/metrics") as resp:
            text = await resp.text()
    assert 'tether_budget_trips_total{budget="llm_calls",mode="shadow",scope="session"} 2.0' \
        in text


async def test_agent_window_survives_rotating_session_ids(make_stack: MakeStack) -> None:
    stack = await make_stack(extra="budgets:\n  agent: {per: hour, llm_calls: 2}\n")
    for i in range(2):
        client = stack.client(default_headers={"X-Tether-Session": f"rotating-{i}",
                                               "X-Tether-Agent": "janitor"})
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client = stack.client(default_headers={"X-Tether-Session": "rotating-new",
                                           "X-Tether-Agent": "janitor"})
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    retry_after = int(info.value.response.headers["retry-after"])
    assert 0 < retry_after <= 3601
    other = stack.client(default_headers={"X-Tether-Agent": "auditor"})
    await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_cost_budget_uses_the_price_table(make_stack: MakeStack) -> None:
    # gpt-4o-mini: $0.15 in / $0.60 out per 1M tokens. Real usage 24 in, 12 out = 11 micro-USD.
    stack = await make_stack(extra="budgets:\n  session: {cost_usd: 0.00003}\n"
                                   "  max_output_tokens: 20\n")
    client = stack.client(default_headers={"X-Tether-Session": "cost"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError, match="could cost up to"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    status = await session_status(stack, "cost")
    assert status["spent"]["cost_usd"] == 22  # type: ignore[index]


async def test_session_from_user_field_and_from_fingerprint(make_stack: MakeStack) -> None:
    stack = await make_stack(extra=budget("llm_calls: 1"))
    client = stack.client()
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="alice")
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="alice")
    # No header, no user: the conversation's system prompt + first user message.
    convo = [{"role": "system", "content": "You are a janitor."},
             {"role": "user", "content": "clean up"}]
    await client.chat.completions.create(model="gpt-4o-mini", messages=convo)  # type: ignore[arg-type]
    later_turn = [*convo, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "and more"}]
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=later_turn)  # type: ignore[arg-type]
    other = [{"role": "system", "content": "You are a janitor."},
             {"role": "user", "content": "a different task"}]
    await client.chat.completions.create(model="gpt-4o-mini", messages=other)  # type: ignore[arg-type]


async def test_upstream_failure_releases_the_reservation(make_stack: MakeStack) -> None:
    from tests.fakes import RawReply

    stack = await make_stack(extra=budget("llm_calls: 1"))
    stack.fake.push(RawReply(status=500, chunks=(b'{"error": {"message": "boom"}}',)))
    client = stack.client(default_headers={"X-Tether-Session": "release"})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(stack.fake.requests) == 2


async def test_admin_sessions_need_the_token(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/v1/sessions/x") as resp:
            assert resp.status == 401
        async with http.get(f"{stack.admin_url}/v1/sessions/x",
                            headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(f"{stack.proxy_url}/v1/sessions/x",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 404


async def test_admin_disabled_without_a_token(stack: Stack,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_ADMIN_TOKEN")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/v1/sessions/x",
                            headers={"Authorization": "Bearer "}) as resp:
            assert resp.status == 503


def test_two_tether_processes_share_one_redis_budget(
        tmp_path: Path, redis_server: RedisServer,
        fake_upstream: tuple[FakeOpenAI, int]) -> None:
    """Two real `tether serve` processes, one redis-server, one budget of 5 calls."""
    fake, upstream_port = fake_upstream
    config = tmp_path / "tether.yaml"
    # The fake's answer holds a denied call; `rewrite` keeps it one upstream call per request
    # (a continuation is an LLM call too and would take a slot as soon as one answer is back).
    config.write_text(f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n"
                      "defaults: {on_deny: rewrite}\n"
                      + budget("llm_calls: 5", redis_server.url))
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream_port}"}
    ports = [(free_port(), free_port()) for _ in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(p),
         "--admin-port", str(a)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True) for p, a in ports]
    try:
        for proc in procs:
            assert proc.stdout is not None and "proxy on" in proc.stdout.readline()
        session = f"two-procs-{os.getpid()}"

        async def run() -> list[int]:
            async with aiohttp.ClientSession() as http:
                async def one(i: int) -> int:
                    port = ports[i % 2][0]
                    async with http.post(
                            f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                            json={"model": "gpt-4o-mini", "messages": MESSAGES},
                            headers={"X-Tether-Session": session}) as resp:
                        return resp.status
                return list(await asyncio.gather(*(one(i) for i in range(30))))

        statuses = asyncio.run(run())
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
    assert sorted(statuses) == [200] * 5 + [429] * 25
    assert len(fake.requests) == 5


async def test_anthropic_budget_error_has_anthropics_shape(make_stack: MakeStack) -> None:
    import anthropic

    from proxy.demo.fake_anthropic import FakeAnthropic

    stack = await make_stack(extra=budget("llm_calls: 1"),
                             upstreams={"anthropic": FakeAnthropic()})
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0,
                                      default_headers={"X-Tether-Session": "anthropic"})
    try:
        await client.messages.create(model="claude-test", max_tokens=100,
                                     messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(model="claude-test", max_tokens=100,
                                         messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert info.value.response.headers["x-should-retry"] == "false"
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    status = await session_status(stack, "anthropic")
    assert status["spent"]["llm_calls"] == 1  # type: ignore[index]
