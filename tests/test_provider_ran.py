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
