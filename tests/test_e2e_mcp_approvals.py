"""OpenAI MCP approval requests through a running tether, with the official openai SDK.

The fake Responses server runs MCP tools as OpenAI does (fake_responses_mcp): it stops at
an `mcp_approval_request` where the request's `require_approval` asks for one, runs the
tool when a later request approves it, and refuses (400) an approval response for a
request it never made or that was answered already. The agent's loop is unchanged: one
`responses.create` per turn, stop when the answer has no function call.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from proxy.demo.fake_openai import RawReply
from proxy.demo.fake_responses_mcp import McpCall, McpState
from proxy.providers.mcp_approvals import MAX_ROUNDS
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_approvals import admin, pending
from tests.test_e2e_provider_tools import CONFIG, RULES, mcp

CREATE = McpCall("create_issue", '{"title": "Disk full on db-1"}')
TIMED = RULES.replace('effect: write}\n    action: hold\n',
                      'effect: write}\n    action: hold\n    timeout: 30s\n')
assert TIMED != RULES


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", "approvals-test-token")


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    made = await make_stack(policy=TIMED, extra=CONFIG)
    made.fake.mcp = McpState(tools={"create_issue": lambda a: json.dumps({"number": 7}),
                                    "get_issue": lambda a: json.dumps({"title": "old"})})
    return made


def state(stack: Stack) -> McpState:
    assert isinstance(stack.fake.mcp, McpState)
    return stack.fake.mcp


def types(answer: Any) -> list[str]:
    return [item.type for item in answer.output]


async def decide_first(stack: Stack, verdict: str, reason: str = "") -> dict[str, Any]:
    [approval] = await pending(stack)
    status, _ = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/{verdict}",
                            {"by": "alice", "reason": reason})
    assert status == 200
    return approval


async def ask(stack: Stack, tool: dict[str, Any], **kw: Any) -> Any:
    return await stack.client().responses.create(model="gpt-x", input="file the disk issue",
                                                 tools=list[Any]([tool]), **kw)


async def test_held_approval_request_approved_runs_and_the_loop_goes_on(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(CREATE,)), Reply(content="Filed issue #7."))
    task = asyncio.create_task(ask(stack, mcp()))
    approval = await decide_first(stack, "approve")
    assert approval["tool"] == "openai:mcp:github:create_issue"
    assert approval["rules"] == ["github-writes-held"]
    assert json.loads(approval["arguments"]) == {"title": "Disk full on db-1"}
    answer = await asyncio.wait_for(task, 10)
    # One ordinary answer: what ran, then the model's text; no approval item to answer.
    assert types(answer) == ["mcp_list_tools", "mcp_call", "message"]
    assert answer.output_text == "Filed issue #7."
    assert state(stack).ran == [("github", "create_issue", {"title": "Disk full on db-1"})]
    first, second = stack.fake.requests
    assert first["tools"][0]["require_approval"] == {"always": {"tool_names": ["create_issue"]},
                                            "never": {"tool_names": ["get_issue",
                                                                     "list_issues"]}}
    [reply] = second["input"]
    assert reply["type"] == "mcp_approval_response" and reply["approve"] is True
    assert second["previous_response_id"] != answer.id  # chained to the first answer
    assert answer.usage is not None and answer.usage.input_tokens == 48  # both calls
    # The agent's next turn chains to the answer it got, and the provider accepts it.
    stack.fake.push(Reply(content="Anything else?"))
    more = await stack.client().responses.create(model="gpt-x", input="thanks",
                                                 previous_response_id=answer.id,
                                                 tools=list[Any]([mcp()]))
    assert more.output_text == "Anything else?"
    records = [r for r in stack.audit() if r.get("stage") == "approval"]
    assert [(r["tool"], r["action"]) for r in records] == [
        ("openai:mcp:github:create_issue", "hold")]


async def test_held_approval_request_denied_never_runs(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(CREATE,)), Reply(content="I could not file it."))
    task = asyncio.create_task(ask(stack, mcp()))
    await decide_first(stack, "deny", "not today")
    answer = await asyncio.wait_for(task, 10)
    assert state(stack).ran == []
    assert types(answer) == ["mcp_list_tools", "message"]
    assert answer.output_text == "I could not file it."
    [reply] = stack.fake.requests[1]["input"]
    assert reply["approve"] is False
    assert "github-writes-held" in reply["reason"] and "not executed" in reply["reason"]


async def test_rule_denied_approval_request_answered_no_without_a_human(
        make_stack: MakeStack) -> None:
    stack = await make_stack(policy=TIMED, extra=CONFIG)
    stack.fake.mcp = McpState(ignore_allowed=True)  # a provider that ignores the narrowing
    stack.fake.push(Reply(calls=(McpCall("delete_repo", '{"repo": "prod"}'),)),
                    Reply(content="Not allowed, sorry."))
    answer = await ask(stack, mcp(require_approval="always"))
    assert state(stack).ran == []
    assert answer.output_text == "Not allowed, sorry."
    [reply] = stack.fake.requests[1]["input"]
    assert reply["approve"] is False and "no-repo-deletes" in reply["reason"]
    assert "Deleting repositories is not allowed" in reply["reason"]


async def test_the_agents_own_approval_request_reaches_it(stack: Stack) -> None:
    # The agent asked for approval of every tool: an allowed request is its to answer.
    stack.fake.push(Reply(calls=(McpCall("get_issue", '{"number": 3}'),)),
                    Reply(content="Issue 3 is old."))
    answer = await ask(stack, mcp(require_approval="always"))
    assert types(answer) == ["mcp_list_tools", "mcp_approval_request"]
    assert len(stack.fake.requests) == 1 and state(stack).ran == []
    request = answer.output[1]
    more = await stack.client().responses.create(
        model="gpt-x", previous_response_id=answer.id, tools=list[Any]([mcp(require_approval="always")]),
        input=[{"type": "mcp_approval_response", "approval_request_id": request.id,
                "approve": True}])
    assert more.output_text == "Issue 3 is old."
    assert state(stack).ran == [("github", "get_issue", {"number": 3})]


async def test_not_stored_the_continuation_carries_the_turn(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(CREATE,)), Reply(content="Filed."))
    task = asyncio.create_task(ask(stack, mcp(), store=False))
    await decide_first(stack, "approve")
    answer = await asyncio.wait_for(task, 10)
    assert answer.output_text == "Filed."
    second = stack.fake.requests[1]
    assert "previous_response_id" not in second
    assert [i.get("type") for i in second["input"]] == [
        "message", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response"]
    assert second["input"][0]["content"] == "file the disk issue"


async def test_approval_requests_beside_function_calls_are_not_answered(stack: Stack) -> None:
    # The model also calls a function the agent runs.
    stack.fake.push(Reply(calls=(CREATE, Call("get_weather", "{}"))))
    tools: list[Any] = [mcp(), {"type": "function", "name": "get_weather", "parameters": {}}]
    answer = await stack.client().responses.create(model="gpt-x", input="x", tools=tools)
    # The agent has a call to run: tether does not answer for it, and hides its own
    # approval request, which is never answered and never runs.
    assert types(answer) == ["mcp_list_tools", "function_call"]
    assert len(stack.fake.requests) == 1 and state(stack).ran == []
    _, approvals = await admin(stack, "GET", "/v1/approvals")
    assert approvals["pending"] == [] and approvals["recent"] == []  # no human was asked


async def test_bad_approval_items_are_denied(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=TIMED, extra=CONFIG)
    stack.fake.mcp = McpState(ignore_allowed=True)
    odd = McpCall("get_issue", '{"number": ')  # arguments that do not parse
    stack.fake.push(Reply(calls=(odd,)), Reply(content="ok"))
    answer = await ask(stack, mcp(require_approval="always"))
    assert state(stack).ran == []
    [reply] = stack.fake.requests[1]["input"]
    assert reply["approve"] is False and "tether:malformed-call" in reply["reason"]
    assert answer.output_text == "ok"


async def test_rounds_are_bounded(stack: Stack) -> None:
    # A model that asks again after every answer: tether stops after MAX_ROUNDS.
    deny = McpCall("create_issue", '{"title": "again"}')
    for _ in range(MAX_ROUNDS + 1):
        stack.fake.push(Reply(calls=(deny,)))
    task = asyncio.create_task(ask(stack, mcp()))
    for _ in range(MAX_ROUNDS + 1):
        await decide_first(stack, "deny")
    answer = await asyncio.wait_for(task, 10)
    assert len(stack.fake.requests) == MAX_ROUNDS + 1
    assert "mcp_approval_request" not in types(answer)
    assert state(stack).ran == []
    assert answer.usage is not None and answer.usage.input_tokens == 24 * (MAX_ROUNDS + 1)


# --- streamed ---------------------------------------------------------------------------


async def ask_stream(stack: Stack, tool: dict[str, Any], **kw: Any) -> tuple[Any, list[Any]]:
    """The SDK's stream helper: every event, and the final response it builds."""
    client = stack.client()
    async with client.responses.stream(model="gpt-x", input="file the disk issue",
                                       tools=list[Any]([tool]), **kw) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    return final, events


async def test_streamed_held_approval_approved_continues_in_one_stream(stack: Stack) -> None:
    stack.fake.push(Reply(content="Filing.", calls=(CREATE,)), Reply(content="Filed issue #7."))
    task = asyncio.create_task(ask_stream(stack, mcp()))
    await decide_first(stack, "approve")
    final, events = await asyncio.wait_for(task, 10)
    assert types(final) == ["message", "mcp_list_tools", "mcp_call", "message"]
    assert final.output_text == "Filing.Filed issue #7."
    assert state(stack).ran == [("github", "create_issue", {"title": "Disk full on db-1"})]
    kinds = [e.type for e in events]
    assert kinds.count("response.created") == 1 and kinds.count("response.completed") == 1
    assert "mcp_approval_request" not in [getattr(getattr(e, "item", None), "type", None)
                                          for e in events]
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1, 2, 3]
    second = stack.fake.requests[1]
    assert second["stream"] is True and second["input"][0]["approve"] is True
    assert final.usage is not None and final.usage.output_tokens == 24
    stack.fake.push(Reply(content="Anything else?"))
    more = await stack.client().responses.create(model="gpt-x", input="thanks",
                                                 previous_response_id=final.id, tools=list[Any]([mcp()]))
    assert more.output_text == "Anything else?"


async def test_streamed_denied_approval_never_runs(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(CREATE,)), Reply(content="I could not file it."))
    task = asyncio.create_task(ask_stream(stack, mcp()))
    await decide_first(stack, "deny", "no")
    final, _ = await asyncio.wait_for(task, 10)
    assert state(stack).ran == []
    assert final.output_text == "I could not file it."
    reply = stack.fake.requests[1]["input"][0]
    assert reply["approve"] is False and "github-writes-held" in reply["reason"]


async def test_streamed_agents_own_approval_request_reaches_it(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(McpCall("get_issue", '{"number": 3}'),)))
    final, _ = await ask_stream(stack, mcp(require_approval="always"))
    assert types(final) == ["mcp_list_tools", "mcp_approval_request"]
    assert len(stack.fake.requests) == 1


async def test_streamed_rounds_are_bounded(stack: Stack) -> None:
    again = McpCall("create_issue", '{"title": "again"}')
    for _ in range(MAX_ROUNDS + 1):
        stack.fake.push(Reply(calls=(again,)))
    task = asyncio.create_task(ask_stream(stack, mcp()))
    for _ in range(MAX_ROUNDS + 1):
        await decide_first(stack, "deny")
    final, events = await asyncio.wait_for(task, 10)
    assert len(stack.fake.requests) == MAX_ROUNDS + 1
    assert "mcp_approval_request" not in types(final)
    assert [e.type for e in events].count("response.completed") == 1
    assert final.usage is not None and final.usage.input_tokens == 24 * (MAX_ROUNDS + 1)


async def test_streamed_continuation_refused_ends_with_an_error(stack: Stack) -> None:
    # The provider refuses tether's answer (here: its stored response is gone).
    stack.fake.push(Reply(calls=(CREATE,)), Reply(content="never"))
    task = asyncio.create_task(ask_stream(stack, mcp()))
    [approval] = await pending(stack)
    state(stack).stored.clear()
    await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve", {"by": "alice"})
    with pytest.raises(openai.APIError) as e:
        await asyncio.wait_for(task, 10)
    assert "refused tether's answer" in str(e.value)
    assert state(stack).ran == []


async def test_streamed_approval_item_that_never_completes_is_not_released(
        stack: Stack) -> None:
    item = {"id": "mcpr_1", "type": "mcp_approval_request", "server_label": "github",
            "name": "create_issue", "arguments": "{}"}
    head = {"id": "resp_x", "object": "response", "status": "in_progress", "output": [],
            "model": "gpt-x", "created_at": 0}
    events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": head}),
              ("response.output_item.added", {"output_index": 0, "item": item}),
              ("response.completed", {"response": {**head, "status": "completed",
                                                   "output": [item]}})]
    raw = "".join(f"event: {k}\ndata: {json.dumps({'type': k, 'sequence_number': i, **v})}\n\n"
                  for i, (k, v) in enumerate(events))
    stack.fake.push(RawReply(content_type="text/event-stream", chunks=(raw.encode(),)))
    with pytest.raises(openai.APIError) as e:
        await ask_stream(stack, mcp())
    assert "inside an MCP approval request" in str(e.value)
    assert len(stack.fake.requests) == 1
