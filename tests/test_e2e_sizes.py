"""Sizes through a running tether, with the official SDKs: a streamed tool call whose
arguments never end is cut at `limits.max_arguments_bytes` and denied at once, while
tether goes on answering everyone else; what is under the limit still passes whole,
and its secrets are still masked in the audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from anthropic.types import ToolParam
from openai.types.chat import ChatCompletionToolParam
from openai.types.responses import FunctionToolParam

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_flood import Flood
from proxy.providers.held import DEFAULT_MAX_ARGUMENTS
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply

TOO_LARGE = "tether:arguments-too-large"
NAMES = ("write_file", "get_weather")
CHAT_TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in NAMES]
RESPONSES_TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": n, "parameters": {"type": "object"}, "strict": False}
    for n in NAMES]
MESSAGES_TOOLS: list[ToolParam] = [ToolParam(name=n, input_schema={"type": "object"})
                                   for n in NAMES]
WEATHER = Call("get_weather", '{"city": "Oslo"}')

type Ask = Callable[[Stack], Coroutine[Any, Any, list[str]]]


async def _chat_stream(stack: Stack) -> list[str]:
    """The streamed chat answer's tool-call names, as the SDK accumulates them."""
    names: list[str] = []
    stream = await stack.client(timeout=60).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}], tools=CHAT_TOOLS,
        stream=True)
    async for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if tc.function and tc.function.name:
                names.append(tc.function.name)
    return names


async def _responses_stream(stack: Stack) -> list[str]:
    names: list[str] = []
    stream = await stack.client(timeout=60).responses.create(
        model="gpt-x", input="go", tools=RESPONSES_TOOLS, stream=True)
    async for event in stream:
        if event.type == "response.output_item.done" and event.item.type == "function_call":
            names.append(event.item.name)
    return names


async def _messages_stream(stack: Stack) -> list[str]:
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0, timeout=60)
    try:
        async with client.messages.stream(model="claude-x", max_tokens=100, tools=MESSAGES_TOOLS,
                                          messages=[{"role": "user", "content": "go"}]) as s:
            message = await s.get_final_message()
        return [b.name for b in message.content if b.type == "tool_use"]
    finally:
        await client.close()


async def _stack(make_stack: MakeStack, provider: str, *turns: Any) -> Stack:
    """A tether whose OpenAI or Anthropic upstream answers `turns`, then the weather."""
    if provider == "anthropic":
        fake_anthropic = FakeAnthropic(script=lambda body: Reply(calls=(WEATHER,)))
        fake_anthropic.push(*turns)
        return await make_stack(upstreams={"anthropic": fake_anthropic})
    fake = FakeOpenAI(script=lambda body: Reply(calls=(WEATHER,)))
    fake.push(*turns)
    return await make_stack(fake=fake)


ASK: dict[str, Ask] = {"chat": _chat_stream, "responses": _responses_stream,
                       "anthropic": _messages_stream}
# What each SDK raises on the error event that ends a cut stream.
ERRORS: dict[str, type[Exception]] = {"chat": openai.APIError, "responses": openai.APIError,
                                      "anthropic": anthropic.APIStatusError}


async def _healthz(stack: Stack) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.admin_url}/healthz") as r:
        return r.status


@pytest.mark.parametrize("provider", sorted(ASK))
async def test_a_flooded_call_is_cut_denied_and_audited_while_tether_serves_others(
        make_stack: MakeStack, provider: str) -> None:
    # 100 MB of arguments; the fake pauses half-way to the limit, with tether holding
    # 2 MB of a call it has not seen the end of.
    flood = Flood(size=100 * 1024 * 1024, pause_at=DEFAULT_MAX_ARGUMENTS // 2)
    stack = await _stack(make_stack, provider, flood)
    ask = ASK[provider]
    flooded = asyncio.create_task(ask(stack))
    await asyncio.wait_for(flood.paused.wait(), 30)

    # Meanwhile: the admin port and an ordinary request (a streamed call that passes).
    status, names = await asyncio.wait_for(asyncio.gather(_healthz(stack), ask(stack)), 30)
    assert status == 200 and names == ["get_weather"]
    assert not flooded.done()

    flood.resume.set()
    with pytest.raises(ERRORS[provider]) as refused:
        await asyncio.wait_for(flooded, 60)
    assert TOO_LARGE in str(refused.value) and "write_file" in str(refused.value)
    # tether stopped reading a little past the limit and closed the upstream.
    await asyncio.wait_for(flood.ended.wait(), 30)
    assert flood.cut and not flood.finished
    assert flood.sent < flood.size // 4

    decisions = {d["tool"]: d for d in stack.decisions()}
    cut = decisions["write_file"]
    assert (cut["action"], cut["rules"], cut["arguments"]) == ("deny", [TOO_LARGE], "")
    assert f"{DEFAULT_MAX_ARGUMENTS}-byte limit" in cut["message"]
    assert decisions["get_weather"]["action"] == "allow"
    [request] = [r for r in stack.audit() if r["kind"] == "request"]
    assert request["code"] == "stream_error" and "max_arguments_bytes" in request["message"]


@pytest.mark.parametrize("provider", sorted(ASK))
async def test_a_call_under_the_limit_still_streams_whole(make_stack: MakeStack,
                                                          provider: str) -> None:
    flood = Flood(size=DEFAULT_MAX_ARGUMENTS - 1024)
    stack = await _stack(make_stack, provider, flood)
    assert await ASK[provider](stack) == ["write_file"]
    assert flood.finished
    [record] = [d for d in stack.decisions() if d["tool"] == "write_file"]
    assert record["action"] == "allow"
    assert record["arguments"] == json.loads(flood.arguments())


async def test_a_whole_answer_over_the_limit_is_denied_and_the_rest_kept(
        make_stack: MakeStack) -> None:
    big = json.dumps({"path": "x", "content": "ab" * 300_000})
    fake = FakeOpenAI()
    fake.push(Reply(calls=(Call("write_file", big), WEATHER)))
    stack = await make_stack(fake=fake, extra="limits: {max_arguments_bytes: 500000}")
    r = await stack.client().chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}], tools=CHAT_TOOLS)
    message = r.choices[0].message
    assert [c.function.name for c in message.tool_calls or [] if c.type == "function"] == [
        "get_weather"]
    assert message.content and TOO_LARGE in message.content
    cut = next(d for d in stack.decisions() if d["tool"] == "write_file")
    assert (cut["action"], cut["rules"], cut["arguments"]) == ("deny", [TOO_LARGE], "")


async def test_megabyte_arguments_pass_and_their_secrets_are_masked(stack: Stack) -> None:
    """A megabyte of hex beside ordinary secrets: the call reaches the agent byte for byte,
    the audit record keeps the blob and masks the secrets (the redaction is linear: the
    quadratic one took hours on a megabyte)."""
    blob = "0123456789abcdef" * 65_536
    raw = json.dumps({"content": blob, "password": "hunter2",
                      "cmd": "deploy --token=s3cr3t -H 'Authorization: Bearer abc.def'",
                      "note": "key sk-abcdefghijklmnopqrstuvwxyz0123"})
    stack.fake.fragment = 4096  # the fake's usual 3 characters would make 350,000 events
    stack.fake.push(Reply(calls=(Call("write_file", raw),)))
    stream = await stack.client(timeout=60).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}], tools=CHAT_TOOLS,
        stream=True)
    arguments = "".join([tc.function.arguments or "" async for chunk in stream
                         for tc in (chunk.choices[0].delta.tool_calls or [] if chunk.choices
                                    else []) if tc.function])
    assert arguments == raw
    text = stack.audit_path.read_text()
    for secret in ("hunter2", "abc.def", "s3cr3t", "sk-abcdefghij"):
        assert secret not in text
    [record] = stack.decisions()
    assert record["arguments"]["content"] == blob
    assert sorted(record["masked"]) == ["arguments.cmd", "arguments.note", "arguments.password"]
