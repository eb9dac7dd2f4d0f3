"""A denial does not end the agent's run (`on_deny: continue`, the default): when every
call in an answer is denied, tether sends the model the denial as the call's result and
hands the agent the model's next answer instead.

Each test runs the plain agent loop most agents and harnesses use (run the calls the
model asked for, send the results back, stop at an answer without a call) with the
official SDK, streamed and not, against fakes that enforce each provider's history rules
(the continuation tether sends must be a request the provider accepts). The model's
script: delete (denied), then, having read why, list (allowed), then a final answer.
Without continuing, the loop would stop at the first answer, the task abandoned.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from google.genai import types

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_bedrock import FakeBedrock
from proxy.demo.fake_gemini import FakeGemini
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.test_e2e_bedrock import EXTRA, TETHER_KEY, TETHER_SECRET, TOOL_CONFIG, assemble, client
from tests.test_e2e_bedrock import tether_credentials as tether_credentials  # noqa: F401
from tests.test_e2e_gemini import CONFIG, sdk_client

PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}',
                   id="call_del")
LIST = Call("list_volumes", "{}", id="call_list")
DENIAL = "'delete_volume' was denied by no-prod-deletes: Deleting production resources is " \
         "not allowed"
DONE = "Listed the volumes; vol-9 stays."

# The model: tries the delete, reads why it was denied, lists instead, then answers.
SCRIPT = (Reply(content="Cleaning up.", calls=(PROD_DELETE,)), Reply(calls=(LIST,)),
          Reply(content=DONE))

TOOLS = {"list_volumes": lambda args: "[vol-9 (production)]"}

CONTINUE = "defaults: {on_deny: continue}\n"  # the default, said where a test names it

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning")


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    """The default policy: `on_deny` unset, so `continue`."""
    return await make_stack(policy=POLICY)


def continuations(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == "continuation"]


def assert_linked(stack: Stack, outcomes: list[str]) -> None:
    """Each continuation record names the denied decision it answers, by id."""
    records = continuations(stack)
    assert [r["outcome"] for r in records] == outcomes
    denied = {d["decision_id"]: d for d in stack.decisions() if d["action"] == "deny"}
    for r in records:
        assert r["continues"] and all(d in denied for d in r["continues"])
        assert r["rules"] == ["no-prod-deletes"]
        assert r["request_id"] == denied[r["continues"][0]]["request_id"]


# --- Chat Completions and Azure OpenAI ----------------------------------------------------


CHAT_TOOLS: list[Any] = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object"}}} for n in ("list_volumes", "delete_volume")]


async def chat_loop(client: Any, stream: bool, model: str = "gpt-x"
                    ) -> tuple[list[dict[str, Any]], list[str]]:
    """The plain loop; returns the conversation and the tools it ran."""
    messages: list[Any] = [{"role": "user", "content": "clean up the volumes"}]
    ran: list[str] = []
    for _ in range(10):
        if stream:
            async with client.chat.completions.stream(model=model, messages=messages,
                                                      tools=CHAT_TOOLS) as s:
                async for _ in s:
                    pass
                final = await s.get_final_completion()
            message = final.choices[0].message.to_dict()
            message.pop("parsed", None)
            for c in message.get("tool_calls") or []:
                c["function"].pop("parsed_arguments", None)
        else:
            r = await client.chat.completions.create(model=model, messages=messages,
                                                     tools=CHAT_TOOLS)
            message = r.choices[0].message.to_dict()
        messages.append(message)
        if not message.get("tool_calls"):
            return messages, ran
        for c in message["tool_calls"]:
            ran.append(c["function"]["name"])
            messages.append({"role": "tool", "tool_call_id": c["id"],
                             "content": TOOLS[c["function"]["name"]]({})})
    raise AssertionError("the loop did not end")


def check_chat_continuation(body: dict[str, Any]) -> None:
    """What tether sent the model: its denied call, and the call's result saying why."""
    assistant, result = body["messages"][-2], body["messages"][-1]
    assert assistant["role"] == "assistant"
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_del"]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_del"
    assert DENIAL in result["content"] and "It was not executed" in result["content"]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_completions(stack: Stack, stream: bool) -> None:
    stack.fake.push(*SCRIPT)
    messages, ran = await chat_loop(stack.client(), stream)
    assert ran == ["list_volumes"]                 # the task went on after the denial
    assert messages[-1]["content"] == DONE
    first = messages[1]                            # one answer: the denial, then the call
    assert DENIAL in first["content"] and first["content"].startswith("Cleaning up.")
    assert [c["id"] for c in first["tool_calls"]] == ["call_list"]
    assert len(stack.fake.requests) == 3           # first, tether's continuation, the agent's
    check_chat_continuation(stack.fake.requests[1])
    assert_linked(stack, ["sent"])


@pytest.mark.parametrize("stream", [False, True])
async def test_azure(make_stack: MakeStack, stream: bool) -> None:
    from openai import AsyncAzureOpenAI

    fake = FakeOpenAI()
    stack = await make_stack(policy=CONTINUE + POLICY, upstreams={"azure": fake})
    fake.push(*SCRIPT)
    client = AsyncAzureOpenAI(azure_endpoint=stack.proxy_url + "/azure", api_key="k",
                              api_version="2024-10-21", max_retries=0)
    try:
        messages, ran = await chat_loop(client, stream, model="prod-gpt")
    finally:
        await client.close()
    assert ran == ["list_volumes"] and messages[-1]["content"] == DONE
    assert len(fake.requests) == 3
    check_chat_continuation(fake.requests[1])


async def test_chat_usage_adds_up(stack: Stack) -> None:
    """The agent's usage counts every upstream call its answer took."""
    stack.fake.push(*SCRIPT)
    r = await stack.client().chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}], tools=CHAT_TOOLS)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (48, 24)  # two calls of 24+12


async def test_chat_stream_usage_adds_up(stack: Stack) -> None:
    stack.fake.push(*SCRIPT)
    chunks = []
    stream = await stack.client().chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}], tools=CHAT_TOOLS,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        chunks.append(chunk)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (48, 24)
    assert len({c.id for c in chunks}) == 1                    # one stream, one id
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["tool_calls"]                          # one end, the continuation's


async def test_rewrite_keeps_the_behaviour_before_continuations(make_stack: MakeStack
                                                                ) -> None:
    """`defaults.on_deny: rewrite`: the answer ends with the denial text, nothing more is
    sent upstream."""
    stack = await make_stack(policy="defaults: {on_deny: rewrite}\n" + POLICY)
    stack.fake.push(*SCRIPT)
    messages, ran = await chat_loop(stack.client(), False)
    assert ran == [] and DENIAL in messages[-1]["content"]     # the loop stopped there
    assert len(stack.fake.requests) == 1 and continuations(stack) == []


async def test_a_rule_that_says_rewrite_wins(make_stack: MakeStack) -> None:
    policy = POLICY.replace("    message: Deleting production resources is not allowed\n",
                            "    message: Deleting production resources is not allowed\n"
                            "    on_deny: rewrite\n", 1)
    stack = await make_stack(policy=CONTINUE + policy)
    stack.fake.push(*SCRIPT)
    _, ran = await chat_loop(stack.client(), True)
    assert ran == [] and len(stack.fake.requests) == 1


async def test_a_rule_can_continue_under_a_rewrite_default(make_stack: MakeStack) -> None:
    policy = POLICY.replace("    message: Deleting production resources is not allowed\n",
                            "    message: Deleting production resources is not allowed\n"
                            "    on_deny: continue\n", 1)
    stack = await make_stack(policy=policy)
    stack.fake.push(*SCRIPT)
    _, ran = await chat_loop(stack.client(), False)
    assert ran == ["list_volumes"] and len(stack.fake.requests) == 3


# --- the bound and the budgets ------------------------------------------------------------


TOKEN = "admin-test-token"


@pytest.fixture
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


async def spent(stack: Stack, session: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/v1/sessions/{session}",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return dict(body["spent"])


def forever(body: Any) -> Reply:
    return Reply(calls=(PROD_DELETE,))


@pytest.mark.usefixtures("admin_token")
@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_that_asks_forever_stops_at_the_bound(make_stack: MakeStack,
                                                            stream: bool) -> None:
    stack = await make_stack(fake=FakeOpenAI(script=forever), policy=CONTINUE + POLICY,
                             extra="budgets:\n  session: {llm_calls: 100}\n")
    client = stack.client(default_headers={"X-Tether-Session": "forever"})
    messages, ran = await chat_loop(client, stream)
    assert ran == [] and len(messages) == 2           # one answer to the agent, no call in it
    assert messages[1]["content"].count(DENIAL) == 4  # the first and three continuations
    assert len(stack.fake.requests) == 4              # bound: defaults.max_continuations 3
    assert_linked(stack, ["sent", "sent", "sent", "bound"])
    bound = continuations(stack)[-1]
    assert bound["rule"] == "tether:continuations" and "max_continuations is 3" in bound["message"]
    used = await spent(stack, "forever")
    assert used["llm_calls"] == 4                     # every upstream call charged
    assert used["input_tokens"] == 4 * 24 and used["output_tokens"] == 4 * 12


@pytest.mark.usefixtures("admin_token")
@pytest.mark.parametrize("stream", [False, True])
async def test_a_spent_budget_stops_continuing(make_stack: MakeStack, stream: bool) -> None:
    """The iteration cap counts continuations: with `llm_calls: 2` one is made, the next is
    refused by the budget, and the agent gets the answer as it stood."""
    stack = await make_stack(fake=FakeOpenAI(script=forever), policy=CONTINUE + POLICY,
                             extra="budgets:\n  session: {llm_calls: 2}\n")
    client = stack.client(default_headers={"X-Tether-Session": "capped"})
    messages, _ = await chat_loop(client, stream)
    assert messages[1]["content"].count(DENIAL) == 2
    assert len(stack.fake.requests) == 2
    assert [r["outcome"] for r in continuations(stack)] == ["sent", "budget"]
    assert "llm_calls budget spent" in continuations(stack)[-1]["message"]
    assert (await spent(stack, "capped"))["llm_calls"] == 2


@pytest.mark.parametrize("bound", [0, 1])
async def test_the_bound_is_configurable(make_stack: MakeStack, bound: int) -> None:
    stack = await make_stack(fake=FakeOpenAI(script=forever),
                             policy=f"defaults: {{on_deny: continue, max_continuations: "
                                    f"{bound}}}\n" + POLICY)
    messages, _ = await chat_loop(stack.client(), False)
    assert len(stack.fake.requests) == 1 + bound
    assert messages[1]["content"].count(DENIAL) == 1 + bound


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_that_fails_the_continuation_ends_as_the_rewrite(
        stack: Stack, stream: bool) -> None:
    """Fail closed: the continuation's 500 is not the agent's; it gets the rewrite, and
    the failure is recorded."""
    from tests.fakes import RawReply

    stack.fake.push(SCRIPT[0], RawReply(status=500, chunks=(b'{"error": {"message": "boom"}}',)))
    messages, ran = await chat_loop(stack.client(), stream)
    assert ran == [] and DENIAL in messages[1]["content"]
    assert [r["outcome"] for r in continuations(stack)] == ["sent", "failed"]
    assert continuations(stack)[-1]["status"] == 500


@pytest.mark.parametrize("stream", [False, True])
async def test_a_continuations_call_is_judged(stack: Stack, stream: bool) -> None:
    """The continuation's own calls are decided like any: one `on_deny: error` call in it
    refuses the answer, as it would have refused the first."""
    drop = Call("drop_database", "{}", id="call_drop")
    stack.fake.push(SCRIPT[0], Reply(calls=(drop,)))
    import openai

    with pytest.raises(openai.APIError) as e:
        await chat_loop(stack.client(), stream)
    assert "Dropping databases is never allowed" in str(e.value)
    assert [d["tool"] for d in stack.decisions()] == ["delete_volume", "drop_database"]


@pytest.mark.usefixtures("admin_token")
async def test_a_caller_that_leaves_during_a_continuation(make_stack: MakeStack) -> None:
    """The agent's stream is closed while tether streams it the continuation: no crash
    (tether serves the next request), the round is charged, and the audit says so."""
    fake = FakeOpenAI(delay_s=0.02)
    stack = await make_stack(fake=fake, policy=CONTINUE + POLICY,
                             extra="budgets:\n  session: {llm_calls: 100}\n")
    stack.fake.push(SCRIPT[0], Reply(content="Let me think. " * 40))
    body = {"model": "gpt-x", "stream": True, "tools": CHAT_TOOLS,
            "messages": [{"role": "user", "content": "clean up the volumes"}]}
    seen = b""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{stack.base_url}/chat/completions", json=body,
                               headers={"X-Tether-Session": "leaving"})
        async for chunk in resp.content.iter_any():
            seen += chunk
            if b"Let" in seen:          # the continuation has begun: the agent leaves
                break
        resp.close()
    assert b"It was not executed" in seen
    for _ in range(100):
        if any(r["outcome"] == "abandoned" for r in continuations(stack)):
            break
        await asyncio.sleep(0.05)
    assert [r["outcome"] for r in continuations(stack)] == ["sent", "abandoned"]
    gone = continuations(stack)[-1]
    assert gone["round"] == 1 and gone["call_ids"] == ["call_del"]
    assert "disconnected" in gone["message"]
    stack.fake.push(Reply(content="still here"))
    r = await stack.client().chat.completions.create(model="gpt-x", messages=[
        {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "still here"
    assert (await spent(stack, "leaving"))["llm_calls"] == 2   # both rounds charged


@pytest.mark.parametrize("stream", [False, True])
async def test_an_oversize_argument_in_a_continuation_is_judged_by_name(
        make_stack: MakeStack, stream: bool) -> None:
    """A megabyte of arguments in the continuation's call, over `limits.max_arguments_bytes`:
    denied unread (tether:arguments-too-large) as in a first answer. Whole, that denial is
    continued in turn; streamed, the stream is cut there with an error event, as a first
    round's would be (test_e2e_sizes). None of the megabyte reaches the agent or the audit."""
    import openai

    stack = await make_stack(policy=CONTINUE + POLICY,
                             extra="limits: {max_arguments_bytes: 65536}\n")
    big = Call("list_volumes", json.dumps({"filter": "x" * 1_000_000}), id="call_big")
    stack.fake.push(SCRIPT[0], Reply(calls=(big,)), Reply(content=DONE))
    if stream:
        with pytest.raises(openai.APIError) as e:
            await chat_loop(stack.client(), stream)
        assert "tether:arguments-too-large" in str(e.value) and len(str(e.value)) < 10_000
        assert [r["outcome"] for r in continuations(stack)] == ["sent"]
    else:
        messages, ran = await chat_loop(stack.client(), stream)
        assert ran == [] and len(messages) == 2
        answer = messages[1]["content"]
        assert DENIAL in answer and "tether:arguments-too-large" in answer
        assert answer.endswith(DONE) and len(answer) < 10_000
        assert [r["outcome"] for r in continuations(stack)] == ["sent", "sent"]
    decisions = stack.decisions()
    assert [(d["tool"], d["rules"]) for d in decisions] == [
        ("delete_volume", ["no-prod-deletes"]), ("list_volumes", ["tether:arguments-too-large"])]
    assert len(json.dumps(decisions)) < 10_000         # the audit holds no megabyte either


# --- Anthropic ------------------------------------------------------------------------------


ANTHROPIC_TOOLS: list[Any] = [{"name": n, "input_schema": {"type": "object"}}
                              for n in ("list_volumes", "delete_volume")]


@pytest.fixture
async def claude(make_stack: MakeStack) -> AsyncIterator[tuple[Stack, FakeAnthropic,
                                                               anthropic.AsyncAnthropic]]:
    fake = FakeAnthropic()
    stack = await make_stack(policy=CONTINUE + POLICY, upstreams={"anthropic": fake})
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    yield stack, fake, client
    await client.close()


async def claude_loop(client: anthropic.AsyncAnthropic, stream: bool
                      ) -> tuple[list[dict[str, Any]], list[str], list[Any]]:
    messages: list[Any] = [{"role": "user", "content": "clean up the volumes"}]
    ran: list[str] = []
    finals: list[Any] = []
    for _ in range(10):
        params: dict[str, Any] = {"model": "claude-test", "max_tokens": 512,
                                  "messages": messages, "tools": ANTHROPIC_TOOLS}
        if stream:
            async with client.messages.stream(**params) as s:
                async for _ in s:
                    pass
                final = await s.get_final_message()
        else:
            final = await client.messages.create(**params)
        finals.append(final)
        content: list[dict[str, Any]] = [b.to_dict() for b in final.content]
        messages.append({"role": "assistant", "content": content})
        uses = [b for b in content if b["type"] == "tool_use"]
        if not uses:
            return messages, ran, finals
        ran += [u["name"] for u in uses]
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": u["id"], "content": TOOLS[u["name"]]({})}
            for u in uses]})
    raise AssertionError("the loop did not end")


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic(claude: tuple[Stack, FakeAnthropic, anthropic.AsyncAnthropic],
                         stream: bool) -> None:
    stack, fake, client = claude
    fake.push(*SCRIPT)
    messages, ran, finals = await claude_loop(client, stream)
    assert ran == ["list_volumes"]
    assert messages[-1]["content"][0]["text"] == DONE
    first = messages[1]["content"]
    assert [b["type"] for b in first] == ["text", "text", "tool_use"]
    assert first[0]["text"] == "Cleaning up." and DENIAL in first[1]["text"]
    assert finals[0].stop_reason == "tool_use"
    assert finals[0].usage.output_tokens == 2 * finals[-1].usage.output_tokens  # both rounds
    assert finals[0].usage.input_tokens == 2 * finals[-1].usage.input_tokens
    assert len(fake.requests) == 3
    sent = fake.requests[1]["messages"]
    assert [b["type"] for b in sent[-2]["content"]] == ["text", "tool_use"]
    result = sent[-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "call_del"
    assert result["is_error"] is True and DENIAL in result["content"][0]["text"]
    assert_linked(stack, ["sent"])


# --- Bedrock Converse -----------------------------------------------------------------------


def bedrock_loop(stack: Stack, stream: bool) -> tuple[list[dict[str, Any]], list[str]]:
    runtime = client(stack)
    messages: list[Any] = [{"role": "user", "content": [{"text": "clean up the volumes"}]}]
    ran: list[str] = []
    for _ in range(10):
        if stream:
            response = runtime.converse_stream(modelId="anthropic.claude-test",
                                               messages=messages, toolConfig=TOOL_CONFIG)
            content, _ = assemble(list(response["stream"]))
            for block in content:
                if "toolUse" in block:
                    block["toolUse"]["input"] = json.loads(block["toolUse"]["input"] or "{}")
        else:
            r = runtime.converse(modelId="anthropic.claude-test", messages=messages,
                                 toolConfig=TOOL_CONFIG)
            content = list(r["output"]["message"]["content"])
        messages.append({"role": "assistant", "content": content})
        uses = [b["toolUse"] for b in content if "toolUse" in b]
        if not uses:
            return messages, ran
        ran += [u["name"] for u in uses]
        messages.append({"role": "user", "content": [{"toolResult": {
            "toolUseId": u["toolUseId"], "content": [{"text": TOOLS[u["name"]]({})}]}}
            for u in uses]})
    raise AssertionError("the loop did not end")


@pytest.mark.parametrize("stream", [False, True])
async def test_bedrock(make_stack: MakeStack, stream: bool) -> None:
    fake = FakeBedrock(TETHER_KEY, TETHER_SECRET)
    stack = await make_stack(policy=CONTINUE + POLICY, upstreams={"bedrock": fake},
                             extra=EXTRA)
    fake.push(*SCRIPT)
    messages, ran = await asyncio.to_thread(bedrock_loop, stack, stream)
    assert ran == ["list_volumes"]
    assert messages[-1]["content"][0]["text"] == DONE
    assert any(DENIAL in b.get("text", "") for b in messages[1]["content"])
    assert len(fake.requests) == 3
    sent = fake.requests[1]["messages"]
    assert any("toolUse" in b for b in sent[-2]["content"])
    result = sent[-1]["content"][0]["toolResult"]
    assert result["status"] == "error" and DENIAL in result["content"][0]["text"]
    assert_linked(stack, ["sent"])


# --- Gemini ---------------------------------------------------------------------------------


async def gemini_loop(stack: Stack, stream: bool) -> tuple[list[types.Content], list[str]]:
    sdk = sdk_client(stack)
    contents = [types.Content(role="user", parts=[types.Part(text="clean up the volumes")])]
    ran: list[str] = []
    try:
        for _ in range(10):
            if stream:
                parts: list[types.Part] = []
                async for chunk in await sdk.aio.models.generate_content_stream(
                        model="gemini-2.5-flash", contents=contents, config=CONFIG):
                    if chunk.candidates and chunk.candidates[0].content:
                        parts += chunk.candidates[0].content.parts or []
                content = types.Content(role="model", parts=parts)
            else:
                r = await sdk.aio.models.generate_content(model="gemini-2.5-flash",
                                                          contents=contents, config=CONFIG)
                assert r.candidates and r.candidates[0].content
                content = r.candidates[0].content
            contents.append(content)
            calls = [p.function_call for p in content.parts or [] if p.function_call]
            if not calls:
                return contents, ran
            ran += [str(c.name) for c in calls]
            contents.append(types.Content(role="user", parts=[types.Part(
                function_response=types.FunctionResponse(
                    id=c.id, name=c.name, response={"result": TOOLS[str(c.name)]({})}))
                for c in calls]))
        raise AssertionError("the loop did not end")
    finally:
        await sdk.aio.aclose()


def text_of(content: types.Content) -> str:
    return "".join(p.text or "" for p in content.parts or [])


@pytest.mark.parametrize("signatures", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_gemini(make_stack: MakeStack, stream: bool, signatures: bool) -> None:
    fake = FakeGemini(signatures=signatures)
    stack = await make_stack(policy=CONTINUE + POLICY, upstreams={"gemini": fake})
    fake.push(*SCRIPT)
    contents, ran = await gemini_loop(stack, stream)
    assert ran == ["list_volumes"]
    assert text_of(contents[-1]) == DONE
    assert DENIAL in text_of(contents[1])
    assert len(fake.requests) == 3
    sent = fake.requests[1]["contents"]
    calls = [p for p in sent[-2]["parts"] if "functionCall" in p]
    assert [c["functionCall"]["name"] for c in calls] == ["delete_volume"]
    if signatures:  # the model's thought signature goes back on its call
        assert all("thoughtSignature" in c for c in calls)
    answer = sent[-1]["parts"][0]["functionResponse"]
    assert answer["name"] == "delete_volume" and DENIAL in answer["response"]["error"]
    assert_linked(stack, ["sent"])




# --- OpenAI Responses -----------------------------------------------------------------------


RESPONSES_TOOLS: list[Any] = [{"type": "function", "name": n, "parameters": {"type": "object"}}
                              for n in ("list_volumes", "delete_volume")]


async def responses_loop(stack: Stack, stream: bool, *, store: bool | None = None,
                         chain: bool = True) -> tuple[list[Any], list[str], list[Any]]:
    """The plain loop on the Responses API: chained by `previous_response_id` (stored), or
    with `store: false` sending every item back. Returns the answers, the tools run and
    the events of each streamed answer."""
    client = stack.client()
    answers: list[Any] = []
    ran: list[str] = []
    streams: list[Any] = []
    items: list[Any] = [{"role": "user", "content": "clean up the volumes"}]
    previous: str | None = None
    pending: list[Any] = []
    for _ in range(10):
        args: dict[str, Any] = {"model": "gpt-x", "tools": RESPONSES_TOOLS,
                                "input": items if not chain else (items if previous is None
                                                                  else pending)}
        if store is not None:
            args["store"] = store
        if previous is not None and chain:
            args["previous_response_id"] = previous
        if stream:
            events = [e async for e in await client.responses.create(stream=True, **args)]
            numbers = [e.sequence_number for e in events]
            assert numbers == sorted(set(numbers)), "sequence numbers must strictly increase"
            ends = [e for e in events if e.type == "response.completed"]
            assert len(ends) == 1 and events[-1] is ends[0]
            assert sum(e.type == "response.created" for e in events) == 1
            done = [e.item.to_dict() for e in events if e.type == "response.output_item.done"]
            assert done == [i.to_dict() for i in ends[0].response.output]
            streams.append(events)
            r = ends[0].response
        else:
            r = await client.responses.create(**args)
        answers.append(r)
        calls = [i for i in r.output if i.type == "function_call"]
        pending = [{"type": "function_call_output", "call_id": c.call_id,
                    "output": TOOLS[c.name]({})} for c in calls]
        items += [i.to_dict() for i in r.output] + pending
        previous = r.id
        if not calls:
            return answers, ran, streams
        ran += [c.name for c in calls]
    raise AssertionError("the loop did not end")


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_chained(stack: Stack, stream: bool) -> None:
    stack.fake.push(*SCRIPT)
    answers, ran, _ = await responses_loop(stack, stream)
    assert ran == ["list_volumes"] and answers[-1].output_text == DONE
    first = answers[0]
    assert [i.type for i in first.output] == ["message", "message", "function_call"]
    assert DENIAL in first.output_text
    assert first.usage is not None and first.usage.total_tokens == 2 * answers[-1].usage.total_tokens
    sent = stack.fake.requests
    assert len(sent) == 3
    # tether's continuation: chained to the stored answer, the denied call's output.
    assert sent[1]["input"][0]["type"] == "function_call_output"
    assert sent[1]["input"][0]["call_id"] == "call_del"
    assert DENIAL in sent[1]["input"][0]["output"]
    # The agent's next turn chains from the answer it got, and owes nothing for call_del.
    assert [i["call_id"] for i in sent[2]["input"]] == ["call_list"]
    assert_linked(stack, ["sent"])


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_continuation_refused_ends_as_the_rewrite(stack: Stack,
                                                                  stream: bool) -> None:
    """Fail closed on the Responses API too: the continuation's 500 is not the agent's; it
    gets the rewrite (tether's message, no call), and the failure is recorded."""
    from tests.fakes import RawReply

    stack.fake.push(SCRIPT[0], RawReply(status=500, chunks=(b'{"error": {"message": "boom"}}',)))
    answers, ran, _ = await responses_loop(stack, stream)
    assert ran == [] and len(answers) == 1 and DENIAL in answers[0].output_text
    assert [r["outcome"] for r in continuations(stack)] == ["sent", "failed"]
    assert continuations(stack)[-1]["status"] == 500
    # Not answered upstream after all: the agent's next turn, chained from the answer it
    # got, carries the denied call's output, as after any rewrite.
    stack.fake.push(Reply(content="ok"))
    nxt = await stack.client().responses.create(model="gpt-x", tools=RESPONSES_TOOLS,
                                                previous_response_id=answers[0].id,
                                                input="and now?")
    assert nxt.output_text == "ok"
    outputs = [i for i in stack.fake.requests[-1]["input"]
               if i.get("type") == "function_call_output"]
    assert [i["call_id"] for i in outputs] == ["call_del"] and DENIAL in outputs[0]["output"]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_store_false(stack: Stack, stream: bool) -> None:
    stack.fake.push(*SCRIPT)
    answers, ran, _ = await responses_loop(stack, stream, store=False, chain=False)
    assert ran == ["list_volumes"] and answers[-1].output_text == DONE
    continued = stack.fake.requests[1]
    assert continued["store"] is False and "previous_response_id" not in continued
    kinds = [(i.get("type"), i.get("call_id")) for i in continued["input"]]
    # The whole turn again: the agent's input, the call as the model made it, its output.
    assert ("function_call", "call_del") in kinds and kinds[-1] == ("function_call_output",
                                                                    "call_del")


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_item_references(stack: Stack, stream: bool) -> None:
    """The Vercel AI SDK's habit: earlier output sent back by reference. tether's message
    in the first round must resolve, the continuation's items are OpenAI's own."""
    stack.fake.push(*SCRIPT)
    client = stack.client()
    first_args: dict[str, Any] = {"model": "gpt-x", "tools": RESPONSES_TOOLS,
                                  "input": [{"role": "user", "content": "clean up"}]}
    if stream:
        events = [e async for e in await client.responses.create(stream=True, **first_args)]
        first = [e for e in events if e.type == "response.completed"][0].response
    else:
        first = await client.responses.create(**first_args)
    [call] = [i for i in first.output if i.type == "function_call"]
    items: list[Any] = [{"role": "user", "content": "clean up"},
                        *[{"type": "item_reference", "id": i.id} for i in first.output],
                        {"type": "function_call_output", "call_id": call.call_id,
                         "output": "[vol-9]"}]
    second = await client.responses.create(model="gpt-x", tools=RESPONSES_TOOLS, input=items)
    assert second.output_text == DONE


@pytest.mark.usefixtures("admin_token")
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_forever_stops_at_the_bound(make_stack: MakeStack, stream: bool) -> None:
    stack = await make_stack(fake=FakeOpenAI(script=forever), policy=CONTINUE + POLICY,
                             extra="budgets:\n  session: {llm_calls: 100}\n")
    client = stack.client(default_headers={"X-Tether-Session": "forever-r"})
    args: dict[str, Any] = {"model": "gpt-x", "tools": RESPONSES_TOOLS, "input": "go"}
    if stream:
        events = [e async for e in await client.responses.create(stream=True, **args)]
        r = [e for e in events if e.type == "response.completed"][0].response
    else:
        r = await client.responses.create(**args)
    assert [i.type for i in r.output] == ["message"] * 4
    assert len(stack.fake.requests) == 4
    assert_linked(stack, ["sent", "sent", "sent", "bound"])
    assert (await spent(stack, "forever-r"))["llm_calls"] == 4
    # The agent's next turn, chained from what it got, is accepted (nothing owed twice).
    stack.fake.push(Reply(content="ok"))
    nxt = await client.responses.create(model="gpt-x", tools=RESPONSES_TOOLS,
                                        previous_response_id=r.id, input="and now?")
    assert nxt.output_text == "ok"
    assert [i.get("call_id") for i in stack.fake.requests[-1]["input"]
            if i.get("type") == "function_call_output"] == ["call_del"]


# --- an agent framework, unchanged: the OpenAI Agents SDK -----------------------------------


def check_continuation(stack: Stack, api: str) -> None:
    """Three upstream calls: the agent's, tether's continuation carrying the denial as the
    denied call's result, the agent's next (with the allowed call's result)."""
    assert len(stack.fake.requests) == 3
    sent = stack.fake.requests[1]
    if api == "chat":
        assistant, result = sent["messages"][-2], sent["messages"][-1]
        assert [c["id"] for c in assistant["tool_calls"]] == ["call_del"]
        assert result == {"role": "tool", "tool_call_id": "call_del",
                          "content": result["content"]}
        text = result["content"]
    else:
        outputs = [i for i in sent["input"] if i.get("type") == "function_call_output"]
        assert [i["call_id"] for i in outputs] == ["call_del"]
        text = outputs[0]["output"]
    assert DENIAL in text and "It was not executed" in text
    assert_linked(stack, ["sent"])
    # The agent's next request answers only the call it was shown (list), not the denied one.
    nxt = json.dumps(stack.fake.requests[2])
    assert "call_list" in nxt




@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_openai_agents_sdk(stack: Stack, api: str, stream: bool) -> None:
    """The Agents SDK's runner stops at an answer without a tool call, like the plain
    loop: with tether continuing, its run lists the volumes and finishes the task."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    listed: list[str] = []

    @agents.function_tool  # type: ignore[untyped-decorator]
    def list_volumes() -> str:
        """List the volumes."""
        listed.append("yes")
        return "[vol-9 (production)]"

    @agents.function_tool  # type: ignore[untyped-decorator]
    def delete_volume(volume_id: str) -> str:
        """Delete a volume."""
        raise AssertionError("a denied call must never run")

    stack.fake.push(*SCRIPT)
    client = AsyncOpenAI(base_url=stack.base_url, api_key="sk-agent", max_retries=0)
    model = agents.OpenAIResponsesModel("gpt-x", client) if api == "responses" \
        else agents.OpenAIChatCompletionsModel("gpt-x", client)
    agent = agents.Agent(name="janitor", instructions="Clean up.", model=model,
                         tools=[list_volumes, delete_volume])
    try:
        if stream:
            result: Any = agents.Runner.run_streamed(agent, "clean up the volumes")
            async for _ in result.stream_events():
                pass
        else:
            result = await agents.Runner.run(agent, "clean up the volumes")
    finally:
        await client.close()
    assert listed == ["yes"]
    assert result.final_output == DONE
    check_continuation(stack, api)
    # The runner's own history: one model answer (the denial text, the list call) where the
    # model took two rounds, then the final one.
    responses = result.raw_responses
    assert len(responses) == 2
