"""The official openai SDK, through a real tether, against the fake OpenAI upstream."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionToolParam

from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply, stream_events

TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume", "drop_database", "resize_volume", "list_volumes")
]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "clean up"}]
# Arguments with odd spacing, escapes and non-ASCII text: they must arrive as sent.
ODD_ARGS = '{ "city":"Zürich",\n  "note": "tab\\there \\u00e9 \\"q\\" 漢字", "n": 1.50e2 }'
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')


async def collect(stream: openai.AsyncStream[openai.types.chat.ChatCompletionChunk]
                  ) -> tuple[str, dict[int, tuple[str, str, str]], list[str]]:
    """Accumulate a streamed answer the way agents do: text, calls by index, finish reasons."""
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    finishes: list[str] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, ["", "", ""])
                slot[0] = tc.id or slot[0]
                if tc.function is not None:
                    slot[1] += tc.function.name or ""
                    slot[2] += tc.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return "".join(text), {i: (c[0], c[1], c[2]) for i, c in calls.items()}, finishes


async def test_single_allowed_call_non_streaming(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", ODD_ARGS),)))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    calls = r.choices[0].message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == ODD_ARGS
    assert r.choices[0].finish_reason == "tool_calls"
    [record] = stack.decisions()
    assert record["action"] == "allow" and record["arguments"]["city"] == "Zürich"


async def test_single_allowed_call_streaming(stack: Stack) -> None:
    stack.fake.push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    stream = await stack.client().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True)
    text, calls, finishes = await collect(stream)
    assert text == "Let me check."
    assert calls == {0: ("call_000000000000000000000000", "get_weather", ODD_ARGS)}
    assert finishes == ["tool_calls"]


async def test_parallel_calls_all_allowed(stack: Stack) -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),
                        Call("get_weather", '{"city": "Lima"}'),
                        Call("list_volumes", "{}")))
    stack.fake.push(turn, turn)
    client = stack.client()
    r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert [c.function.arguments for c in r.choices[0].message.tool_calls or []
            if c.type == "function"] == ['{"city": "Oslo"}', '{"city": "Lima"}', "{}"]
    stream = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                  stream=True)
    _, calls, _ = await collect(stream)
    assert [(c[1], c[2]) for _, c in sorted(calls.items())] == [
        ("get_weather", '{"city": "Oslo"}'), ("get_weather", '{"city": "Lima"}'),
        ("list_volumes", "{}")]


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_removed_and_allowed_call_kept(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(content="Cleaning up.", calls=(Call("get_weather", ODD_ARGS),
                                                         PROD_DELETE, Call("list_volumes", "{}"))))
    client = stack.client()
    if stream:
        s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                 stream=True)
        text, by_index, finishes = await collect(s)
        calls = [(name, args) for _, name, args in (by_index[i] for i in sorted(by_index))]
        finish = finishes[-1]
    else:
        r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        message = r.choices[0].message
        text = message.content or ""
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []
                 if c.type == "function"]
        finish = r.choices[0].finish_reason
    assert calls == [("get_weather", ODD_ARGS), ("list_volumes", "{}")]
    assert text.startswith("Cleaning up.")
    assert "'delete_volume' was denied by no-prod-deletes" in text
    assert "Deleting production resources is not allowed" in text
    assert finish == "tool_calls"
    actions = [(r["tool"], r["action"], r["rules"], r["stream"]) for r in stack.decisions()]
    assert actions == [("get_weather", "allow", [], stream),
                       ("delete_volume", "deny", ["no-prod-deletes"], stream),
                       ("list_volumes", "allow", [], stream)]


@pytest.mark.parametrize("stream", [False, True])
async def test_only_call_denied_finishes_with_stop(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(calls=(PROD_DELETE,)))
    client = stack.client()
    if stream:
        s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                 stream=True)
        text, calls, finishes = await collect(s)
        assert calls == {} and finishes == ["stop"]
    else:
        r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content or ""
    assert "denied" in text


async def test_on_deny_error_is_a_403_in_openai_shape(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("drop_database", '{"name": "prod"}'),)))
    with pytest.raises(openai.PermissionDeniedError) as info:
        await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                     tools=TOOLS)
    assert info.value.status_code == 403
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "tool_call_denied"
    assert "Dropping databases is never allowed" in info.value.message


async def test_on_deny_error_in_a_stream_raises_in_the_sdk(stack: Stack) -> None:
    stack.fake.push(Reply(content="ok", calls=(Call("drop_database", '{"name": "prod"}'),)))
    stream = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                          tools=TOOLS, stream=True)
    with pytest.raises(openai.APIError, match="Dropping databases is never allowed"):
        await collect(stream)


@pytest.mark.parametrize("stream", [False, True])
async def test_hold_nobody_approves_is_a_deny(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(calls=(Call("resize_volume", '{"size": 10}'),)))
    client = stack.client()
    if stream:
        s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                 stream=True)
        text, calls, _ = await collect(s)
    else:
        r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        text, calls = r.choices[0].message.content or "", {}
        assert r.choices[0].message.tool_calls is None
    assert calls == {} and "approval" in text
    [record] = stack.decisions()
    assert (record["action"], record["policy_action"]) == ("hold", "hold")
    events = [(r["event"], r["tool"]) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", "resize_volume"), ("expired", "resize_volume")]


@pytest.mark.parametrize("name", ["Delete_Volume", " delete_volume", "delete\u200b_volume"])
async def test_name_variant_of_a_denied_tool_does_not_slip_past(stack: Stack, name: str) -> None:
    args = '{"volume_id": "vol-9", "tags": {"env": "production"}}'
    stack.fake.push(Reply(calls=(Call(name, args),)))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None
    [record] = stack.decisions()
    assert record["action"] == "deny"
    # the variant is both undeclared and, normalised, the denied tool
    assert set(record["rules"]) == {"tether:undeclared-tool", "no-prod-deletes"}


async def test_legacy_function_call(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(PROD_DELETE,), legacy_function_call=True))
    r = await stack.client().chat.completions.create(
        model="gpt-x", messages=MESSAGES,
        functions=[{"name": "delete_volume", "parameters": {"type": "object"}}])
    assert r.choices[0].message.function_call is None
    assert "denied" in (r.choices[0].message.content or "")


async def test_n_greater_than_one(stack: Stack) -> None:
    stack.fake.push((Reply(calls=(PROD_DELETE,)), Reply(calls=(Call("get_weather", "{}"),))))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                     tools=TOOLS, n=2)
    assert r.choices[0].message.tool_calls is None
    assert [c.function.name for c in r.choices[1].message.tool_calls or []
            if c.type == "function"] == ["get_weather"]


async def test_text_only_answers_pass_untouched(stack: Stack) -> None:
    stack.fake.push(Reply(content="Hello ✓"), Reply(content="Hello ✓"))
    client = stack.client()
    r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello ✓"
    s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True})
    text, calls, finishes = await collect(s)
    assert (text, calls, finishes) == ("Hello ✓", {}, ["stop"])
    assert stack.decisions() == []


async def test_other_paths_pass_through(stack: Stack) -> None:
    models = await stack.client().models.list()
    assert [m.id for m in models.data] == ["gpt-fake"]


async def test_session_and_agent_headers_reach_the_audit_not_the_upstream(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    client = stack.client(default_headers={"X-Tether-Session": "s-1", "X-Tether-Agent": "janitor"})
    await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    [record] = stack.decisions()
    assert (record["session"], record["agent"]) == ("s-1", "janitor")
    sent = {k.lower() for k in stack.fake.headers[-1]}
    assert "x-tether-session" not in sent and "x-tether-agent" not in sent
    assert "authorization" not in sent  # the agent's own key never goes upstream (strip)


async def test_upstream_key_replaces_the_agents_key(make_stack: MakeStack,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_OPENAI_KEY", "sk-real-upstream")
    stack = await make_stack(extra="upstreams:\n  openai: {url: 'http://unused', "
                                   "api_key_env: TETHER_TEST_OPENAI_KEY}\n")
    stack.fake.push(Reply(content="hi"))
    await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert stack.fake.headers[-1]["Authorization"] == "Bearer sk-real-upstream"


async def test_admin_port_health_and_metrics(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(PROD_DELETE,)))
    await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(stack.admin_url + path) as resp:
                assert resp.status == 200
        async with http.get(stack.admin_url + "/metrics") as resp:
            text = await resp.text()
        # The proxy port serves no admin route.
        async with http.get(stack.proxy_url + "/metrics") as resp:
            assert resp.status == 404
    assert ('tether_tool_decisions_total{action="deny",provider="openai",'
            'rule="no-prod-deletes",tool="other"} 1.0') in text


async def test_many_concurrent_streams(make_stack: MakeStack) -> None:
    fake = FakeOpenAI(script=lambda body: Reply(
        content="ok", calls=(Call("get_weather", body["messages"][0]["content"]), PROD_DELETE)))
    stack = await make_stack(fake=fake)
    client = stack.client()

    async def one(i: int) -> None:
        args = f'{{"city": "c{i}"}}'
        s = await client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": args}], tools=TOOLS, stream=True)
        text, calls, _ = await collect(s)
        assert [c[1:] for c in calls.values()] == [("get_weather", args)]
        assert "denied" in text

    import asyncio
    await asyncio.gather(*(one(i) for i in range(40)))
    assert len(stack.decisions()) == 80


class _SlowFirstToken:
    """An upstream that sends its headers at once and its first event only when told,
    as a model that thinks a while before its first token does."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await self.go.wait()
            options = body.get("stream_options") or {}
            for event in stream_events(Reply(content="Hello there."), body["model"],
                                       include_usage=bool(options.get("include_usage"))):
                await out.write(event)
            await out.write_eof()
            return out

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


async def test_stream_headers_reach_the_agent_before_the_first_token(
        make_stack: MakeStack) -> None:
    """tether sends a stream's headers with its first bytes when they came together, but
    not later than the upstream sent its own: a client that times out waiting for the
    headers must not time out through tether where it would not directly."""
    slow = _SlowFirstToken()
    made = await make_stack(upstreams={"openai": slow})
    stream = await asyncio.wait_for(made.client().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True), 10)
    slow.go.set()
    text, calls, finishes = await collect(stream)
    assert (text, calls, finishes) == ("Hello there.", {}, ["stop"])
