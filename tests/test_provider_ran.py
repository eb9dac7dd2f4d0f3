"""Provider-run calls that ran, as a whole answer reports them (OpenAI `mcp_call`,
`web_search_call` ...; Anthropic `mcp_tool_use`, `server_tool_use`): judged by the rules
that judged the request, audited with their arguments (`stage: ran`), and one the policy
does not allow (the provider ignored the narrowing) is a violation that denies every call
the answer hands the agent. Official SDKs through a running tether; the fakes answer with
the providers' own JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.model import Action, Decision, ToolCall
from proxy.providers.anthropic_stream import MessagesStream
from proxy.providers.openai_responses_stream import ResponsesStream
from proxy.providers.provider_ran import VIOLATION, anthropic_block, openai_item
from tests.conftest import MakeStack, Stack
from tests.fakes import RawReply
from tests.test_e2e_provider_tools import CONFIG, GITHUB, RULES, anthropic_stack, mcp

WEATHER: Any = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def responses_body(*items: dict[str, Any]) -> RawReply:
    body = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
            "model": "gpt-x", "output": list(items), "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
    return RawReply(chunks=(json.dumps(body).encode(),))


def mcp_call(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"mcp_{tool}", "type": "mcp_call", "server_label": "github", "name": tool,
            "arguments": json.dumps(arguments), "output": "ok", "error": None,
            "status": "completed"}


TOOLS: Any = [mcp(), WEATHER]
FUNCTION_CALL = {"id": "fc_1", "type": "function_call", "call_id": "call_1",
                 "name": "get_weather", "arguments": '{"city": "Oslo"}', "status": "completed"}


def ran(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == "decision" and r.get("stage") == "ran"]


def violations(stack: Stack) -> float:
    metric = stack.tether.governor.metrics.provider_tool_violations
    return sum(s.value for m in metric.collect() for s in m.samples
               if s.name.endswith("_total"))


async def test_openai_allowed_mcp_call_is_audited_and_the_answer_kept(
        make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(responses_body(mcp_call("get_issue", {"number": 7}), FUNCTION_CALL))
    answer = await stack.client().responses.create(model="gpt-x", input="triage",
                                                   tools=TOOLS)
    kinds = [item.type for item in answer.output]
    assert kinds == ["mcp_call", "function_call"]
    [record] = ran(stack)
    assert record["tool"] == "openai:mcp:github:get_issue" and record["action"] == "allow"
    assert record["arguments"] == {"number": 7} and record["effect"] == "read"
    assert [(d["tool"], d["action"]) for d in stack.decisions()] == [("get_weather", "allow")]
    assert violations(stack) == 0


async def test_openai_mcp_call_the_policy_denies_is_a_violation(make_stack: MakeStack) -> None:
    """The provider ran delete_repo although tether narrowed it away: audited as denied,
    counted, and the function call beside it is not released."""
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(responses_body(mcp_call("delete_repo", {"repo": "prod"}), FUNCTION_CALL))
    answer = await stack.client().responses.create(model="gpt-x", input="triage",
                                                   tools=TOOLS)
    assert [item.type for item in answer.output] == ["mcp_call", "message"]
    assert VIOLATION in answer.output_text and "openai:mcp:github:delete_repo" in answer.output_text
    [record] = ran(stack)
    assert record["action"] == "deny" and "no-repo-deletes" in record["rules"]
    assert record["arguments"] == {"repo": "prod"}
    [denied] = stack.decisions()
    assert denied["tool"] == "get_weather" and denied["action"] == "deny"
    assert VIOLATION in denied["rules"]
    assert violations(stack) == 1


async def test_openai_held_tool_that_ran_is_a_violation(make_stack: MakeStack) -> None:
    """create_issue needs approval (its rule holds): run without one, it is a violation,
    never a hold waiting for a human on something already done."""
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(responses_body(mcp_call("create_issue", {"title": "x"}), FUNCTION_CALL))
    answer = await stack.client().responses.create(model="gpt-x", input="triage",
                                                   tools=TOOLS)
    assert [item.type for item in answer.output] == ["mcp_call", "message"]
    [record] = ran(stack)
    assert record["action"] == "hold"
    assert violations(stack) == 1


async def test_anthropic_server_and_mcp_blocks_judged(make_stack: MakeStack) -> None:
    stack, fake, client = await anthropic_stack(make_stack)

    def message(*blocks: dict[str, Any]) -> RawReply:
        body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": list(blocks), "stop_reason": "tool_use", "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 3}}
        return RawReply(chunks=(json.dumps(body).encode(),))

    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                "input": {"city": "Oslo"}}
    search = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
              "input": {"query": "weather"}}
    delete = {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "delete_repo",
              "server_name": "github", "input": {"repo": "prod"}}
    tools: Any = [{"type": "web_search_20250305", "name": "web_search"},
                  {"name": "get_weather", "input_schema": {"type": "object"}}]
    async with client:
        fake.push(message(search, tool_use))
        kept = await client.messages.create(
            model="claude-x", max_tokens=100, tools=tools,
            messages=[{"role": "user", "content": "hi"}])
        assert [b.type for b in kept.content] == ["server_tool_use", "tool_use"]
        fake.push(message(delete, tool_use))
        cut = await client.beta.messages.create(
            model="claude-x", max_tokens=100, tools=tools,
            messages=[{"role": "user", "content": "hi"}],
            mcp_servers=[{"type": "url", "name": "github", "url": GITHUB}],
            betas=["mcp-client-2025-04-04"])
        assert [b.type for b in cut.content] == ["mcp_tool_use", "text"]
    assert [(r["tool"], r["action"]) for r in ran(stack)] == [
        ("anthropic:web_search", "allow"), ("anthropic:mcp:github:delete_repo", "deny")]
    assert [(d["tool"], d["action"]) for d in stack.decisions()] == [
        ("get_weather", "allow"), ("get_weather", "deny")]
    assert violations(stack) == 1


@pytest.mark.parametrize(("item", "name", "arguments"), [
    ({"type": "web_search_call", "id": "ws", "action": {"type": "search", "query": "q"}},
     "openai:web_search", {"type": "search", "query": "q"}),
    ({"type": "code_interpreter_call", "id": "ci", "code": "print(1)"},
     "openai:code_interpreter", {"code": "print(1)"}),
    ({"type": "image_generation_call", "id": "ig"}, "openai:image_generation", {}),
    ({"type": "mcp_call", "id": "m", "server_label": "gh", "name": "t", "arguments": "not json"},
     "openai:mcp:gh:t", {"input": "not json"}),
    ({"type": "mcp_list_tools", "id": "l"}, None, None),
    ({"type": "function_call", "id": "f"}, None, None),
])
def test_openai_items_named(item: dict[str, Any], name: str | None,
                            arguments: dict[str, Any] | None) -> None:
    call = openai_item(item, 3)
    assert (call.name if call else None) == name
    assert (call.arguments if call else None) == arguments


@pytest.mark.parametrize(("block", "name"), [
    ({"type": "server_tool_use", "id": "s", "name": "web_fetch", "input": {"url": "u"}},
     "anthropic:web_fetch"),
    ({"type": "server_tool_use", "id": "s", "name": "code_execution", "input": {"code": "x"}},
     "anthropic:code_execution"),
    ({"type": "mcp_tool_use", "id": "m", "name": "get_issue", "server_name": "github",
      "input": {}}, "anthropic:mcp:github:get_issue"),
    ({"type": "web_search_tool_result", "tool_use_id": "s", "content": []}, None),
    ({"type": "tool_use", "id": "t", "name": "x", "input": {}}, None),
])
def test_anthropic_blocks_named(block: dict[str, Any], name: str | None) -> None:
    call = anthropic_block(block, 0)
    assert (call.name if call else None) == name


# --- streamed answers -------------------------------------------------------------------

ALLOW = Decision(Action.ALLOW)


def sse(kind: str, body: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()


def responses_events(*items: dict[str, Any]) -> list[bytes]:
    """A Responses stream in the API's shapes: each item added, its argument deltas and
    progress events, done; then `response.completed` listing them all."""
    final = json.loads(responses_body(*items).chunks[0])
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": started}),
                                                ("response.in_progress", {"response": started})]
    for i, item in enumerate(items):
        where = {"item_id": item["id"], "output_index": i}
        events.append(("response.output_item.added", {"output_index": i, "item": {
            **item, "status": "in_progress", "arguments": "",
            **({"output": None} if item["type"] == "mcp_call" else {})}}))
        kind = "function_call" if item["type"] == "function_call" else "mcp_call"
        text = item["arguments"]
        if kind == "mcp_call":
            events.append(("response.mcp_call.in_progress", where))
        events += [(f"response.{kind}_arguments.delta", {**where, "delta": text[:5]}),
                   (f"response.{kind}_arguments.delta", {**where, "delta": text[5:]}),
                   (f"response.{kind}_arguments.done", {**where, "arguments": text})]
        if kind == "mcp_call":
            events.append(("response.mcp_call.completed", where))
        events.append(("response.output_item.done", {"output_index": i, "item": item}))
    events.append(("response.completed", {"response": final}))
    return [sse(kind, {**body, "sequence_number": n}) for n, (kind, body) in enumerate(events)]


def messages_events(*blocks: dict[str, Any], whole: bool = False) -> list[bytes]:
    """A Messages stream in the API's shapes; a tool block's input arrives as
    `input_json_delta`s (or, `whole`, in its `content_block_start`)."""
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 3, "output_tokens": 1}}
    out = [sse("message_start", {"message": message}), sse("ping", {})]
    for i, block in enumerate(blocks):
        where = {"index": i}
        if "input" in block and not whole or block["type"] == "tool_use":
            text = json.dumps(block["input"])
            out.append(sse("content_block_start", {**where, "content_block": {**block, "input": {}}}))
            out += [sse("content_block_delta", {**where, "delta": {
                "type": "input_json_delta", "partial_json": piece}})
                for piece in ("", text[:4], text[4:])]
        else:
            out.append(sse("content_block_start", {**where, "content_block": block}))
        out.append(sse("content_block_stop", where))
    out += [sse("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                  "usage": {"output_tokens": 9}}),
            sse("message_stop", {})]
    return out


def drive(stream: ResponsesStream | MessagesStream, chunks: list[bytes]
          ) -> tuple[bytes, list[ToolCall], list[str]]:
    """What the client gets, what ran (as reported), and the order in which ran calls and
    pending calls came out."""
    data, ran, order = bytearray(), list[ToolCall](), list[str]()
    for chunk in [*chunks, None]:  # as the server drives it: each chunk, then the end
        step = stream.feed(chunk) if chunk is not None else stream.close()
        while True:
            ran += step.ran
            order += [f"ran:{c.name}" for c in step.ran]
            data += step.data
            if not step.pending:
                break
            order += [f"call:{c.name}" for c in step.pending]
            step = stream.decide([ALLOW] * len(step.pending))
    return bytes(data), ran, order


MCP_GET = mcp_call("get_issue", {"number": 7})
BLOCKS: Any = (
    {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "delete_repo",
     "server_name": "github", "input": {"repo": "prod"}},
    {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "is_error": False,
     "content": [{"type": "text", "text": "deleted"}]},
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}})


@pytest.mark.parametrize("bytewise", [False, True])
def test_responses_filter_reports_what_ran_when_its_item_is_done(bytewise: bool) -> None:
    events = responses_events(MCP_GET, FUNCTION_CALL)
    body = b"".join(events)
    chunks = [body[i:i + 1] for i in range(len(body))] if bytewise else events
    data, ran, order = drive(ResponsesStream(), chunks)
    assert order == ["ran:openai:mcp:github:get_issue", "call:get_weather"]
    [done] = ran
    assert done.arguments == {"number": 7} and done.id == "mcp_get_issue" and done.index == 0
    assert data == body  # the mcp_call's events pass unchanged, the allowed call too


def test_responses_filter_reports_an_item_only_at_its_done_event() -> None:
    events = responses_events(MCP_GET)
    stream = ResponsesStream()
    done_at = next(i for i, e in enumerate(events) if b"output_item.done" in e)
    before = [stream.feed(e) for e in events[:done_at]]
    assert all(not s.ran for s in before)
    assert b"".join(s.data for s in before) == b"".join(events[:done_at])  # not held
    step = stream.feed(events[done_at])
    assert [c.name for c in step.ran] == ["openai:mcp:github:get_issue"]
    assert step.data == events[done_at]
    assert not stream.feed(b"".join(events[done_at + 1:])).ran  # reported once, not twice


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("whole", [False, True])
def test_messages_filter_reports_what_ran_when_its_block_stops(bytewise: bool,
                                                               whole: bool) -> None:
    events = messages_events(*BLOCKS, whole=whole)
    body = b"".join(events)
    chunks = [body[i:i + 1] for i in range(len(body))] if bytewise else events
    data, ran, order = drive(MessagesStream(), chunks)
    assert order == ["ran:anthropic:mcp:github:delete_repo", "call:get_weather"]
    [done] = ran
    assert done.arguments == {"repo": "prod"} and done.id == "mcptoolu_1" and done.index == 0
    mcp_events = body.split(b"event: content_block_start")[1]
    assert b"event: content_block_start" + mcp_events in data  # passed unchanged
    stop_at = next(i for i, e in enumerate(events) if b"content_block_stop" in e)
    stream = MessagesStream()
    assert not any(stream.feed(e).ran for e in events[:stop_at])
    assert [c.name for c in stream.feed(events[stop_at]).ran] == [
        "anthropic:mcp:github:delete_repo"]


def test_messages_filter_judges_oversized_input_by_name() -> None:
    stream = MessagesStream(max_arguments=8)
    _, [done], _ = drive(stream, messages_events(BLOCKS[0]))
    assert done.too_large and done.arguments is None and done.name.endswith("delete_repo")


def streamed(events: list[bytes]) -> RawReply:
    return RawReply(content_type="text/event-stream", chunks=tuple(events))


async def test_openai_stream_allowed_mcp_call_is_audited_and_both_reach_the_client(
        make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(streamed(responses_events(MCP_GET, FUNCTION_CALL)))
    async with stack.client().responses.stream(model="gpt-x", input="triage",
                                               tools=TOOLS) as stream:
        answer = await stream.get_final_response()
    assert [item.type for item in answer.output] == ["mcp_call", "function_call"]
    [record] = ran(stack)
    assert record["tool"] == "openai:mcp:github:get_issue" and record["action"] == "allow"
    assert record["arguments"] == {"number": 7}
    assert [(d["tool"], d["action"]) for d in stack.decisions()] == [("get_weather", "allow")]
    assert violations(stack) == 0


async def test_openai_stream_denied_mcp_call_denies_the_calls_after_it(
        make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(streamed(responses_events(mcp_call("delete_repo", {"repo": "prod"}),
                                              FUNCTION_CALL)))
    events = await stack.client().responses.create(model="gpt-x", input="triage",
                                                   tools=TOOLS, stream=True)
    seen = [event async for event in events]
    done = [e.item.type for e in seen if e.type == "response.output_item.done"]
    assert done == ["mcp_call", "message"]  # what ran stays; the call is replaced
    final = seen[-1]
    assert final.type == "response.completed"
    assert VIOLATION in final.response.output_text
    assert "openai:mcp:github:delete_repo" in final.response.output_text
    [record] = ran(stack)
    assert record["action"] == "deny" and "no-repo-deletes" in record["rules"]
    assert record["arguments"] == {"repo": "prod"}
    [denied] = stack.decisions()
    assert denied["tool"] == "get_weather" and denied["action"] == "deny"
    assert VIOLATION in denied["rules"]
    assert violations(stack) == 1


async def test_anthropic_stream_mcp_tool_use_judged(make_stack: MakeStack) -> None:
    stack, fake, client = await anthropic_stack(make_stack)
    get_issue = {**BLOCKS[0], "name": "get_issue", "input": {"number": 7}}
    kwargs: Any = {"model": "claude-x", "max_tokens": 100,
                   "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                   "mcp_servers": [{"type": "url", "name": "github", "url": GITHUB}],
                   "betas": ["mcp-client-2025-04-04"]}
    async with client:
        fake.push(streamed(messages_events(get_issue, BLOCKS[1], BLOCKS[2])))
        async with client.beta.messages.stream(**kwargs) as stream:
            kept = await stream.get_final_message()
        assert [b.type for b in kept.content] == ["mcp_tool_use", "mcp_tool_result", "tool_use"]
        fake.push(streamed(messages_events(*BLOCKS)))
        async with client.beta.messages.stream(**kwargs) as stream:
            cut = await stream.get_final_message()
        assert [b.type for b in cut.content] == ["mcp_tool_use", "mcp_tool_result", "text"]
        text = cut.content[2]
        assert text.type == "text" and VIOLATION in text.text
    assert [(r["tool"], r["action"], r["arguments"]) for r in ran(stack)] == [
        ("anthropic:mcp:github:get_issue", "allow", {"number": 7}),
        ("anthropic:mcp:github:delete_repo", "deny", {"repo": "prod"})]
    assert [(d["tool"], d["action"]) for d in stack.decisions()] == [
        ("get_weather", "allow"), ("get_weather", "deny")]
    assert VIOLATION in stack.decisions()[1]["rules"]
    assert violations(stack) == 1


def test_responses_filter_reports_an_item_only_the_terminal_event_lists() -> None:
    """An item with no `output_item.done` of its own is still reported, at the end."""
    events = [e for e in responses_events(MCP_GET) if b"response.output_item." not in e
              and b"response.mcp_call" not in e]
    _, [done], _ = drive(ResponsesStream(), events)
    assert done.name == "openai:mcp:github:get_issue" and done.index == 0


async def test_openai_stream_call_released_before_the_violation_stays_released(
        make_stack: MakeStack) -> None:
    """What a stream already handed the agent cannot be taken back: a call before the
    violating item is released; calls after it are denied; two violations count once."""
    delete = mcp_call("delete_repo", {"repo": "prod"})
    later = {**FUNCTION_CALL, "id": "fc_2", "call_id": "call_2"}
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(streamed(responses_events(FUNCTION_CALL, delete, {**delete, "id": "m2"},
                                              later)))
    async with stack.client().responses.stream(model="gpt-x", input="triage",
                                               tools=TOOLS) as stream:
        answer = await stream.get_final_response()
    assert [item.type for item in answer.output] == [
        "function_call", "mcp_call", "mcp_call", "message"]
    assert [(r["tool"], r["action"]) for r in ran(stack)] == [
        ("openai:mcp:github:delete_repo", "deny")] * 2
    assert [(d["tool"], d["action"]) for d in stack.decisions()] == [
        ("get_weather", "allow"), ("get_weather", "deny")]
    assert violations(stack) == 1
