"""A denied call, then the agent's next two turns, per provider, with the official SDKs,
streamed and not, against fakes that enforce each provider's history rules (a tool
result without its call, a call without its result: 400). The agent sends its history
back as it got it from tether: the answer with the denied call replaced, and a result
for each call it ran.

"beside-allowed": the denied call shares its answer with an allowed one (no mode continues
such an answer). "only-call": the denied call is the answer's only one, in `on_deny:
rewrite` mode, where the answer ends at tether's text and the agent sends another turn; the
default (`continue`) goes on with the model's next answer in the same response instead
(test_e2e_continuations, which also runs the agent's next turns)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from google.genai import types

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_bedrock import FakeBedrock
from proxy.demo.fake_gemini import FakeGemini
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_bedrock import EXTRA, TETHER_KEY, TETHER_SECRET, TOOL_CONFIG, assemble, client
from tests.test_e2e_bedrock import tether_credentials as tether_credentials  # noqa: F401
from tests.test_e2e_gemini import CONFIG, sdk_client

PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}',
                   id="call_del")
LIST = Call("list_volumes", "{}", id="call_list")
DENIAL = "'delete_volume' was denied by no-prod-deletes"


def policy(only: bool) -> str:
    """The only-call cases run in rewrite mode (see the module's docstring)."""
    return ("defaults: {on_deny: rewrite}\n" if only else "") + POLICY


def first_reply(only: bool) -> Reply:
    """The first answer: the denied call beside an allowed one, or alone."""
    return Reply(content="Cleaning up.", calls=(PROD_DELETE,) if only else (LIST, PROD_DELETE))


pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning")


# --- Chat Completions ----------------------------------------------------------------------


CHAT_TOOLS: list[Any] = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object"}}} for n in ("list_volumes", "delete_volume")]


async def chat(stack: Stack, stream: bool, messages: list[Any]) -> dict[str, Any]:
    client = stack.client()
    if not stream:
        r = await client.chat.completions.create(model="gpt-x", messages=messages,
                                                 tools=CHAT_TOOLS)
        return r.choices[0].message.to_dict()
    async with client.chat.completions.stream(model="gpt-x", messages=messages,
                                              tools=CHAT_TOOLS) as s:
        async for _ in s:
            pass
        final = await s.get_final_completion()
    message: dict[str, Any] = final.choices[0].message.to_dict()
    message.pop("parsed", None)
    for c in message.get("tool_calls") or []:
        c["function"].pop("parsed_arguments", None)
    return message


@pytest.mark.parametrize("only", [False, True], ids=["beside-allowed", "only-call"])
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_completions(make_stack: MakeStack, stream: bool, only: bool) -> None:
    stack = await make_stack(policy=policy(only))
    stack.fake.push(first_reply(only), Reply(content="Skipped the delete."), Reply(content="Bye."))
    history: list[Any] = [{"role": "user", "content": "clean up"}]
    first = await chat(stack, stream, history)
    assert [c["id"] for c in first.get("tool_calls") or []] == ([] if only else ["call_list"])
    assert DENIAL in first["content"]
    history += [first, *([{"role": "user", "content": "go on"}] if only else [
        {"role": "tool", "tool_call_id": "call_list", "content": "[vol-9]"}])]
    second = await chat(stack, stream, history)
    assert second["content"] == "Skipped the delete."
    history += [second, {"role": "user", "content": "thanks"}]
    third = await chat(stack, stream, history)
    assert third["content"] == "Bye."
    assert len(stack.fake.requests) == 3


# --- Anthropic -----------------------------------------------------------------------------


ANTHROPIC_TOOLS: list[Any] = [{"name": n, "input_schema": {"type": "object"}}
                              for n in ("list_volumes", "delete_volume")]


@pytest.fixture
async def claude(make_stack: MakeStack, request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[Stack, FakeAnthropic, anthropic.AsyncAnthropic]]:
    """Parametrized indirectly by the test's `only`."""
    fake = FakeAnthropic()
    stack = await make_stack(policy=policy(request.param), upstreams={"anthropic": fake})
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    yield stack, fake, client
    await client.close()


async def claude_turn(client: anthropic.AsyncAnthropic, stream: bool, messages: list[Any]
                      ) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"model": "claude-test", "max_tokens": 512, "messages": messages,
                              "tools": ANTHROPIC_TOOLS}
    if not stream:
        m = await client.messages.create(**params)
        return [b.to_dict() for b in m.content]
    async with client.messages.stream(**params) as s:
        async for _ in s:
            pass
        final = await s.get_final_message()
    return [b.to_dict() for b in final.content]


@pytest.mark.parametrize(("claude", "only"), [(False, False), (True, True)],
                         ids=["beside-allowed", "only-call"], indirect=["claude"])
@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic(claude: tuple[Stack, FakeAnthropic, anthropic.AsyncAnthropic],
                         stream: bool, only: bool) -> None:
    _, fake, client = claude
    fake.push(first_reply(only), Reply(content="Skipped the delete."), Reply(content="Bye."))
    history: list[Any] = [{"role": "user", "content": "clean up"}]
    first = await claude_turn(client, stream, history)
    uses = [b for b in first if b["type"] == "tool_use"]
    assert [b["name"] for b in uses] == ([] if only else ["list_volumes"])
    assert any(DENIAL in b.get("text", "") for b in first)
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": "go on" if only else [
                    {"type": "tool_result", "tool_use_id": uses[0]["id"], "content": "[vol-9]"}]}]
    second = await claude_turn(client, stream, history)
    assert second[0]["text"] == "Skipped the delete."
    history += [{"role": "assistant", "content": second}, {"role": "user", "content": "thanks"}]
    third = await claude_turn(client, stream, history)
    assert third[0]["text"] == "Bye."
    assert len(fake.requests) == 3


# --- Bedrock Converse ----------------------------------------------------------------------


def bedrock_turn(stack: Stack, stream: bool, messages: list[Any]) -> list[dict[str, Any]]:
    runtime = client(stack)
    if not stream:
        r = runtime.converse(modelId="anthropic.claude-test", messages=messages,
                             toolConfig=TOOL_CONFIG)
        return list(r["output"]["message"]["content"])
    response = runtime.converse_stream(modelId="anthropic.claude-test", messages=messages,
                                       toolConfig=TOOL_CONFIG)
    events = list(response["stream"])
    content, _ = assemble(events)
    for block in content:
        if "toolUse" in block:
            block["toolUse"]["input"] = json.loads(block["toolUse"]["input"] or "{}")
    return content


@pytest.mark.parametrize("only", [False, True], ids=["beside-allowed", "only-call"])
@pytest.mark.parametrize("stream", [False, True])
async def test_bedrock(make_stack: MakeStack, stream: bool, only: bool) -> None:
    fake = FakeBedrock(TETHER_KEY, TETHER_SECRET)
    stack = await make_stack(policy=policy(only), upstreams={"bedrock": fake}, extra=EXTRA)
    fake.push(first_reply(only), Reply(content="Skipped the delete."), Reply(content="Bye."))
    history: list[Any] = [{"role": "user", "content": [{"text": "clean up"}]}]
    first = await asyncio.to_thread(bedrock_turn, stack, stream, history)
    uses = [b["toolUse"] for b in first if "toolUse" in b]
    assert [u["name"] for u in uses] == ([] if only else ["list_volumes"])
    assert any(DENIAL in b.get("text", "") for b in first)
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": [{"text": "go on"}] if only else [{"toolResult": {
                    "toolUseId": uses[0]["toolUseId"], "content": [{"text": "[vol-9]"}]}}]}]
    second = await asyncio.to_thread(bedrock_turn, stack, stream, history)
    assert second[0]["text"] == "Skipped the delete."
    history += [{"role": "assistant", "content": second},
                {"role": "user", "content": [{"text": "thanks"}]}]
    third = await asyncio.to_thread(bedrock_turn, stack, stream, history)
    assert third[0]["text"] == "Bye."
    assert len(fake.requests) == 3


# --- Gemini --------------------------------------------------------------------------------


async def gemini_turn(stack: Stack, stream: bool, contents: list[types.Content]
                      ) -> types.Content:
    sdk = sdk_client(stack)
    try:
        if not stream:
            r = await sdk.aio.models.generate_content(model="gemini-2.5-flash",
                                                      contents=contents, config=CONFIG)
            assert r.candidates and r.candidates[0].content
            return r.candidates[0].content
        parts: list[types.Part] = []
        async for chunk in await sdk.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents=contents, config=CONFIG):
            if chunk.candidates and chunk.candidates[0].content:
                parts += chunk.candidates[0].content.parts or []
        return types.Content(role="model", parts=parts)
    finally:
        await sdk.aio.aclose()


def text_of(content: types.Content) -> str:
    return "".join(p.text or "" for p in content.parts or [])


@pytest.mark.parametrize("only", [False, True], ids=["beside-allowed", "only-call"])
@pytest.mark.parametrize("signatures", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_gemini(make_stack: MakeStack, stream: bool, signatures: bool, only: bool) -> None:
    fake = FakeGemini(signatures=signatures)
    stack = await make_stack(policy=policy(only), upstreams={"gemini": fake})
    fake.push(first_reply(only), Reply(content="Skipped the delete."), Reply(content="Bye."))
    history = [types.Content(role="user", parts=[types.Part(text="clean up")])]
    first = await gemini_turn(stack, stream, history)
    calls = [p.function_call for p in first.parts or [] if p.function_call]
    assert [c.name for c in calls] == ([] if only else ["list_volumes"])
    assert DENIAL in text_of(first)
    history += [first, types.Content(role="user", parts=[types.Part(text="go on")] if only else [
        types.Part(function_response=types.FunctionResponse(
            id=calls[0].id, name="list_volumes", response={"result": "[vol-9]"}))])]
    second = await gemini_turn(stack, stream, history)
    assert text_of(second) == "Skipped the delete."
    history += [second, types.Content(role="user", parts=[types.Part(text="thanks")])]
    third = await gemini_turn(stack, stream, history)
    assert text_of(third) == "Bye."
    assert len(fake.requests) == 3


async def test_a_result_for_the_removed_call_is_the_providers_400(stack: Stack) -> None:
    """An agent that claims to have run the denied call (it was never shown it) sends a
    history the provider refuses; tether passes that refusal on, in the provider's words."""
    import openai

    stack.fake.push(first_reply(False))
    history: list[Any] = [{"role": "user", "content": "clean up"}]
    first = await chat(stack, False, history)
    history += [first, {"role": "tool", "tool_call_id": "call_list", "content": "[vol-9]"},
                {"role": "tool", "tool_call_id": "call_del", "content": "deleted"}]
    with pytest.raises(openai.BadRequestError) as e:
        await chat(stack, False, history)
    assert "must be a response to a preceding message with 'tool_calls'" in e.value.message
