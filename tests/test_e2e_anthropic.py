"""The official anthropic SDK, through a real tether, against the fake Anthropic upstream."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam, ToolUnionParam, WebSearchTool20250305Param
from yarl import URL

from proxy.demo.fake_anthropic import (
    Call,
    FakeAnthropic,
    Message,
    RawReply,
    Reply,
    ServerCall,
    Thinking,
    stream_events,
)
from tests.conftest import MakeStack, Stack

MODEL = "claude-test"
TOOLS: list[ToolUnionParam] = [
    *(ToolParam(name=n, input_schema={"type": "object"})
      for n in ("get_weather", "delete_volume", "drop_database", "resize_volume", "list_volumes")),
    WebSearchTool20250305Param(type="web_search_20250305", name="web_search"),
]
MESSAGES: list[MessageParam] = [{"role": "user", "content": "clean up"}]
# Argument text with odd spacing, escapes and non-ASCII: it must arrive as sent.
ODD_ARGS = '{ "city":"Zürich",\n  "note": "tab\\there \\u00e9 \\"q\\" 漢字", "n": 1.50e2 }'
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')
DROP = Call("drop_database", '{"name": "prod"}')

type Mode = Literal["whole", "helper", "raw"]
MODES: list[Mode] = ["whole", "helper", "raw"]


@dataclass
class Env:
    stack: Stack
    fake: FakeAnthropic
    client: anthropic.AsyncAnthropic


async def _env(make_stack: MakeStack, extra: str = "") -> Env:
    fake = FakeAnthropic()
    stack = await make_stack(upstreams={"anthropic": fake}, extra=extra)
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    return Env(stack, fake, client)


@pytest.fixture
async def env(make_stack: MakeStack) -> AsyncIterator[Env]:
    made = await _env(make_stack)
    yield made
    await made.client.close()


@dataclass
class Answer:
    """What an agent ends up with: the content blocks (as dicts) and the stop reason."""

    content: list[dict[str, Any]]
    stop_reason: str | None
    raw_inputs: dict[int, str]  # tool_use index -> argument text as streamed (raw mode)


async def ask(env: Env, mode: Mode, **kw: Any) -> Answer:
    """One request the way agents make it: whole, via the stream helper, or raw events."""
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 1024, "messages": MESSAGES,
                              "tools": TOOLS, **kw}
    if mode == "whole":
        m = await env.client.messages.create(**params)
        return Answer([b.to_dict() for b in m.content], m.stop_reason, {})
    if mode == "helper":
        async with env.client.messages.stream(**params) as s:
            async for _ in s:
                pass
            final = await s.get_final_message()
        return Answer([b.to_dict() for b in final.content], final.stop_reason, {})
    blocks: dict[int, dict[str, Any]] = {}
    raw: dict[int, list[str]] = {}
    stop: str | None = None
    stream = await env.client.messages.create(stream=True, **params)
    async for event in stream:
        if event.type == "content_block_start":
            blocks[event.index] = event.content_block.to_dict()
        elif event.type == "content_block_delta":
            if event.delta.type == "text_delta":
                blocks[event.index]["text"] += event.delta.text
            elif event.delta.type == "thinking_delta":
                blocks[event.index]["thinking"] += event.delta.thinking
            elif event.delta.type == "input_json_delta":
                raw.setdefault(event.index, []).append(event.delta.partial_json)
        elif event.type == "message_delta":
            stop = event.delta.stop_reason
    for index, pieces in raw.items():
        blocks[index]["input"] = json.loads("".join(pieces) or "{}")
    return Answer([blocks[i] for i in sorted(blocks)], stop,
                  {i: "".join(p) for i, p in raw.items()})


def tool_uses(answer: Answer) -> list[tuple[str, object]]:
    return [(b["name"], b["input"]) for b in answer.content if b["type"] == "tool_use"]


def text(answer: Answer) -> str:
    return "".join(b["text"] for b in answer.content if b["type"] == "text")


@pytest.mark.parametrize("mode", MODES)
async def test_single_allowed_call(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [("get_weather", json.loads(ODD_ARGS))]
    assert text(answer) == "Let me check."
    assert answer.stop_reason == "tool_use"
    if mode == "raw":
        assert answer.raw_inputs == {1: ODD_ARGS}  # byte-identical, in one piece
    [record] = env.stack.decisions()
    assert (record["provider"], record["model"], record["action"]) == ("anthropic", MODEL, "allow")
    assert record["arguments"]["city"] == "Zürich" and record["stream"] == (mode != "whole")


@pytest.mark.parametrize("mode", MODES)
async def test_parallel_calls_all_allowed(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),
                               Call("get_weather", '{"city": "Lima"}'),
                               Call("list_volumes", "{}"))))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [("get_weather", {"city": "Oslo"}),
                                 ("get_weather", {"city": "Lima"}), ("list_volumes", {})]
    assert [b["id"] for b in answer.content] == [f"toolu_{n:024d}" for n in range(3)]


@pytest.mark.parametrize("mode", MODES)
async def test_denied_call_replaced_and_allowed_call_kept(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(content="Cleaning up.", calls=(Call("get_weather", ODD_ARGS),
                                                       PROD_DELETE, Call("list_volumes", "{}"))))
    answer = await ask(env, mode)
    assert [b["type"] for b in answer.content] == ["text", "tool_use", "text", "tool_use"]
    assert tool_uses(answer) == [("get_weather", json.loads(ODD_ARGS)), ("list_volumes", {})]
    denial = answer.content[2]["text"]
    assert "'delete_volume' was denied by no-prod-deletes" in denial
    assert "Deleting production resources is not allowed" in denial
    assert answer.stop_reason == "tool_use"
    if mode == "raw":
        assert answer.raw_inputs == {1: ODD_ARGS, 3: "{}"}
    actions = [(r["tool"], r["action"], r["rules"]) for r in env.stack.decisions()]
    assert actions == [("get_weather", "allow", []),
                       ("delete_volume", "deny", ["no-prod-deletes"]),
                       ("list_volumes", "allow", [])]


@pytest.mark.parametrize("mode", MODES)
async def test_only_call_denied_ends_the_turn(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(calls=(PROD_DELETE,)))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [] and "denied" in text(answer)
    assert answer.stop_reason == "end_turn"


async def test_on_deny_error_is_a_403_permission_error(env: Env) -> None:
    env.fake.push(Reply(calls=(DROP,)))
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        await ask(env, "whole")
    err = info.value
    assert err.status_code == 403 and err.type == "permission_error"
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    assert "Dropping databases is never allowed" in (err.api_message or "")
    assert err.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("mode", ["helper", "raw"])
async def test_on_deny_error_in_a_stream_raises_in_the_sdk(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(content="ok", calls=(DROP,)))
    with pytest.raises(anthropic.APIStatusError) as info:
        await ask(env, mode)
    assert info.value.type == "permission_error"
    assert "Dropping databases is never allowed" in (info.value.api_message or "")


@pytest.mark.parametrize("mode", MODES)
async def test_hold_nobody_approves_is_a_deny(env: Env, mode: Mode) -> None:
    env.fake.push(Reply(calls=(Call("resize_volume", '{"size": 10}'),)))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [] and "approval" in text(answer)
    [record] = env.stack.decisions()
    assert (record["action"], record["policy_action"]) == ("hold", "hold")
    events = [(r["event"], r["tool"]) for r in env.stack.audit() if r["kind"] == "approval"]
    assert events == [("created", "resize_volume"), ("expired", "resize_volume")]


@pytest.mark.parametrize("mode", MODES)
async def test_server_tools_and_thinking_pass_untouched(env: Env, mode: Mode) -> None:
    env.fake.push(Message((Thinking("Search first."), ServerCall("web_search", '{"query": "x"}'),
                           "Found.", PROD_DELETE)), Reply(content="Left it."))
    answer = await ask(env, mode)
    # The model's text, tether's denial, then the model's answer after reading the denial
    # (on_deny: continue, the default).
    assert [b["type"] for b in answer.content] == [
        "thinking", "server_tool_use", "web_search_tool_result", "text", "text", "text"]
    assert "no-prod-deletes" in answer.content[4]["text"]
    assert answer.content[5]["text"] == "Left it."
    assert answer.content[0]["thinking"] == "Search first."
    assert answer.content[1]["input"] == {"query": "x"}
    assert answer.content[2]["content"][0]["url"] == "https://example.com/"
    # server tools run at Anthropic: only the agent's own tool was decided
    assert [r["tool"] for r in env.stack.decisions()] == ["delete_volume"]


@pytest.mark.parametrize("mode", MODES)
async def test_max_tokens_cutting_a_call_denies_it(env: Env, mode: Mode) -> None:
    env.fake.push(Message(("Checking.", Call("get_weather", '{"city": "Oslo"}'),
                           Call("list_volumes", '{"region": "eu"}')), stop_reason="max_tokens"))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [("get_weather", {"city": "Oslo"})]
    assert "cut off (stop_reason max_tokens)" in answer.content[2]["text"]
    assert answer.stop_reason == "max_tokens"
    actions = [(r["tool"], r["action"], r["rules"]) for r in env.stack.decisions()]
    assert actions == [("get_weather", "allow", []),
                       ("list_volumes", "deny", ["tether:malformed-call"])]


@pytest.mark.parametrize("mode", MODES)
async def test_duplicate_keys_in_a_tool_input_are_denied(env: Env, mode: Mode) -> None:
    raw = '{"volume_id": "vol-1", "tags": {"env": "dev", "env": "production"}}'
    env.fake.push(Reply(calls=(Call("delete_volume", raw), Call("list_volumes", "{}"))))
    answer = await ask(env, mode)
    assert tool_uses(answer) == [("list_volumes", {})]
    assert "duplicate key 'env'" in text(answer)
    first = env.stack.decisions()[0]
    assert first["action"] == "deny" and first["rules"] == ["tether:malformed-call"]


async def test_count_tokens_and_models_pass_through(env: Env) -> None:
    count = await env.client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert count.input_tokens == 7
    models = await env.client.models.list()
    assert [m.id for m in models.data] == ["claude-fake"]
    assert env.stack.decisions() == []


async def test_batches_that_declare_tools_are_refused_not_passed(env: Env) -> None:
    # More in tests/test_batches.py: tool-less batches pass, `batches: refuse` refuses all.
    with pytest.raises(anthropic.APIStatusError) as info:
        await env.client.messages.batches.create(requests=[{
            "custom_id": "a", "params": {"model": MODEL, "max_tokens": 10,
                                         "messages": MESSAGES, "tools": TOOLS}}])
    assert info.value.status_code == 501 and info.value.type == "api_error"
    assert "declare tools" in (info.value.api_message or "")
    assert env.fake.requests == []


async def test_identity_and_credentials(env: Env) -> None:
    env.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    await ask(env, "whole", metadata={"user_id": "user-7"},
              extra_headers={"X-Tether-Agent": "janitor"})
    [record] = env.stack.decisions()
    assert (record["session"], record["agent"]) == ("user-7", "janitor")
    sent = {k.lower(): v for k, v in env.fake.headers[-1].items()}
    # the agent's own key never goes upstream (agent_credentials: strip, the default)
    assert "authorization" not in sent and "x-api-key" not in sent and "anthropic-version" in sent
    assert "x-tether-agent" not in sent


async def test_upstream_key_replaces_the_agents_key(make_stack: MakeStack,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_ANTHROPIC_KEY", "sk-ant-real")
    made = await _env(make_stack, extra="upstreams:\n  anthropic: {url: 'http://unused', "
                                         "api_key_env: TETHER_TEST_ANTHROPIC_KEY}\n")
    try:
        made.fake.push(Reply(content="hi"))
        await ask(made, "whole")
    finally:
        await made.client.close()
    sent = {k.lower(): v for k, v in made.fake.headers[-1].items()}
    assert sent["x-api-key"] == "sk-ant-real" and "authorization" not in sent


# --- bad input --------------------------------------------------------------------------


async def post(env: Env, body: bytes, path: str = "/anthropic/v1/messages"
               ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        url = URL(env.stack.proxy_url + path, encoded=True)
        async with http.post(url, data=io.BytesIO(body),
                             headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()


def rejected(env: Env) -> list[dict[str, Any]]:
    return [r for r in env.stack.audit() if r["kind"] == "request"]


@pytest.mark.parametrize("body, needle", [
    (b'{"model": "claude-test", "messages": [', "not valid JSON"),
    (b'"just a string"', "must be a JSON object"),
    (b'{"model": "claude-test", "stream": "true", "messages": []}', "'stream' must be a boolean"),
    (b'{"model": "m", "model": "n", "messages": []}', "duplicate key"),
    (b'{"model": "claude-test", "tools": {"name": "x"}, "messages": []}', "must be an array"),
])
async def test_malformed_request_is_400_in_anthropics_shape(env: Env, body: bytes,
                                                            needle: str) -> None:
    status, error = await post(env, body)
    assert status == 400
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]
    assert env.fake.requests == []
    [record] = rejected(env)
    assert record["status"] == 400 and record["code"] == "invalid_request"


async def test_sdk_sees_a_bad_request_error(env: Env) -> None:
    with pytest.raises(anthropic.BadRequestError, match="'metadata' must be an object"):
        await ask(env, "whole", extra_body={"metadata": "user-7"})


async def test_body_over_the_limit_is_413(make_stack: MakeStack) -> None:
    made = await _env(make_stack, extra="limits: {max_body_bytes: 4096}\n")
    try:
        with pytest.raises(anthropic.APIStatusError) as info:
            await made.client.messages.create(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x" * 5000}])
    finally:
        await made.client.close()
    # Anthropic's type for 413 (the SDK's ErrorType literal does not list it)
    assert info.value.status_code == 413
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("path, status", [
    ("/anthropic/v1/messages/", 404),
    ("/anthropic/v1/Messages", 404),
    ("/anthropic/v2/messages", 404),
    ("/anthropic/messages", 404),
    ("/anthropic/v1/beta/messages", 404),
    ("/anthropic/v1/messages/batches", 400),  # a batch body without 'requests'
    ("/anthropic/v1/messages/batches/", 404),
    ("/anthropic/v1/Messages/Batches", 404),
    ("/anthropic/v1/messages/batches/msgbatch_1/results", 404),  # results are GET
    ("/anthropic/v1/mess%61ges", 400),
    ("/anthropic/v1/messages%2f", 400),
    ("/anthropic/v1/models/../messages", 400),
])
async def test_routes_that_are_refused(env: Env, path: str, status: int) -> None:
    got, error = await post(env, b'{"model": "claude-test", "messages": []}', path)
    assert got == status
    assert error["type"] == "error" and error["error"]["message"]
    assert env.fake.requests == []


async def test_stream_cut_mid_tool_call(env: Env) -> None:
    turn = Reply(content="Deleting.", calls=(
        Call("get_weather", '{"city": "Oslo"}'),
        Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "temporary"}}')))
    events = stream_events(turn, MODEL)
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 3
    env.fake.push(RawReply(content_type="text/event-stream", chunks=tuple(events[:cut]),
                           cut=True))
    seen: list[str] = []
    stream = await env.client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES,
                                              tools=TOOLS, stream=True)
    with pytest.raises(anthropic.APIStatusError,
                       match="ended before the response was complete") as info:
        async for event in stream:
            if event.type == "content_block_start" and event.content_block.type == "tool_use":
                seen.append(event.content_block.name)
    assert info.value.type == "api_error"
    assert seen == ["get_weather"]  # the complete call was released, the cut one never was
    decisions = [(r["tool"], r["action"], r["rules"]) for r in env.stack.decisions()]
    assert decisions == [("get_weather", "allow", []),
                         ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(r["code"] == "stream_error" for r in rejected(env))


async def test_error_event_inside_a_200_is_passed_and_the_open_call_denied(env: Env) -> None:
    events = stream_events(Reply(calls=(PROD_DELETE,)), MODEL)
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 2
    error = (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
             b'"message": "Overloaded"}}\n\n')
    env.fake.push(RawReply(content_type="text/event-stream", chunks=(*events[:cut], error)))
    with pytest.raises(anthropic.APIStatusError) as info:
        await ask(env, "helper")
    assert info.value.type == "overloaded_error" and info.value.api_message == "Overloaded"
    [record] = env.stack.decisions()
    assert (record["tool"], record["action"]) == ("delete_volume", "deny")


@pytest.mark.parametrize("status", [200, 502])
async def test_html_from_upstream_is_a_502(env: Env, status: int) -> None:
    env.fake.push(RawReply(status=status, content_type="text/html",
                           chunks=(b"<html><body>Bad Gateway</body></html>",)))
    with pytest.raises(anthropic.InternalServerError) as info:
        await ask(env, "whole")
    assert info.value.status_code == 502 and info.value.type == "api_error"
    assert "text/html" in (info.value.api_message or "")
    assert rejected(env)[0]["status"] == 502


async def test_unreadable_json_from_upstream_is_a_502(env: Env) -> None:
    env.fake.push(RawReply(chunks=(b'{"type": "message", "role": "assistant"}',)))
    with pytest.raises(anthropic.InternalServerError, match="no 'content' array"):
        await ask(env, "whole")


async def test_json_error_from_upstream_passes_through(env: Env) -> None:
    body = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    env.fake.push(RawReply(status=529, chunks=(body,)))
    with pytest.raises(anthropic.OverloadedError) as info:
        await ask(env, "whole")
    assert info.value.body == json.loads(body)
    assert rejected(env)[0]["status"] == 529


async def test_the_beta_messages_endpoint_is_governed_too(env: Env) -> None:
    env.fake.push(Reply(calls=(PROD_DELETE, Call("get_weather", ODD_ARGS))))
    m = await env.client.beta.messages.create(model=MODEL, max_tokens=1024,
                                              messages=[{"role": "user", "content": "go"}],
                                              tools=[{"name": "get_weather",
                                                      "input_schema": {"type": "object"}},
                                                     {"name": "delete_volume",
                                                      "input_schema": {"type": "object"}}])
    assert [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[1].type == "tool_use" and m.content[1].input == json.loads(ODD_ARGS)
    assert [r["endpoint"] for r in env.stack.decisions()] == ["v1/messages", "v1/messages"]
