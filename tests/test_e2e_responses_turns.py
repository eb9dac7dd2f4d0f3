"""A Responses conversation after a denial, with the openai SDK, through a real tether, against
the fake upstream that stores responses and enforces OpenAI's history rules (every call
needs its output, item references must exist): `previous_response_id` and `item_reference`
turns, whole and streamed, and the references tether cannot resolve."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from proxy.demo.fake_responses_mcp import McpState
from proxy.server.routes import CONTEXT
from proxy.sessions.rewrites import MemoryRewrites
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_approvals import admin, pending
from tests.test_e2e_mcp_approvals import CREATE, TIMED
from tests.test_e2e_provider_tools import CONFIG, mcp
from tests.test_e2e_responses import PROD_DELETE, create

DENIAL = "'delete_volume' was denied by no-prod-deletes"


async def turn(stack: Stack, stream: bool, agent: str | None = None, **kw: Any) -> Response:
    headers = {"X-Tether-Agent": agent} if agent else None
    r, _ = await create(stack, stream, extra_headers=headers, **kw)
    return r


async def denied_first(stack: Stack, stream: bool, agent: str | None = None) -> Response:
    """A first answer with an allowed call and a denied one."""
    stack.fake.push(Reply(content="Cleaning up.", calls=(
        Call("list_volumes", "{}", id="call_list"), Call(PROD_DELETE.name, PROD_DELETE.arguments,
                                                          id="call_del"))))
    r = await turn(stack, stream, agent)
    assert [i.type for i in r.output] == ["message", "function_call", "message"]
    assert DENIAL in r.output_text
    return r


@pytest.mark.parametrize("stream", [False, True])
async def test_previous_response_id_after_a_denial(stack: Stack, stream: bool) -> None:
    first = await denied_first(stack, stream)
    stack.fake.push(Reply(content="I will not delete it."), Reply(content="Done."))
    second = await turn(stack, stream, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": "call_list", "output": "[vol-9]"}])
    assert second.output_text == "I will not delete it."
    sent = stack.fake.requests[1]["input"]
    # The denied call, which OpenAI still holds, is answered with the denial text.
    assert sent[0]["type"] == "function_call_output" and sent[0]["call_id"] == "call_del"
    assert DENIAL in sent[0]["output"]
    assert sent[1] == {"type": "function_call_output", "call_id": "call_list",
                       "output": "[vol-9]"}
    third = await turn(stack, stream, previous_response_id=second.id, input="thanks")
    assert third.output_text == "Done."
    assert stack.fake.requests[2]["input"] == "thanks"  # nothing owed any more


REWRITE = "defaults: {on_deny: rewrite}\n"


@pytest.mark.parametrize("stream", [False, True])
async def test_previous_response_id_with_a_text_input(make_stack: MakeStack, stream: bool
                                                      ) -> None:
    """Rewrite mode: the answer ends at tether's message, and the denied call, which OpenAI
    still holds, is answered on the agent's next turn (the default, `continue`, answers it
    at once: test_e2e_continuations)."""
    stack = await make_stack(policy=REWRITE + POLICY)
    stack.fake.push(Reply(calls=(PROD_DELETE,)))
    first = await turn(stack, stream)
    stack.fake.push(Reply(content="Understood."))
    second = await turn(stack, stream, previous_response_id=first.id, input="what happened?")
    assert second.output_text == "Understood."
    sent = stack.fake.requests[1]["input"]
    assert [i["type"] for i in sent] == ["function_call_output", "message"]
    assert sent[1] == {"type": "message", "role": "user", "content": "what happened?"}


def references(r: Response) -> list[dict[str, Any]]:
    return [{"type": "item_reference", "id": i.id} for i in r.output]


@pytest.mark.parametrize("stream", [False, True])
async def test_item_references_after_a_denial(stack: Stack, stream: bool) -> None:
    """The node `ai` SDK's default: earlier output sent back as item references."""
    first = await denied_first(stack, stream)
    assert str(first.output[2].id).startswith("msg_tether_")
    stack.fake.push(Reply(content="Skipped the delete."), Reply(content="Bye."))
    history: list[Any] = [{"role": "user", "content": "clean up"}, *references(first),
                          {"type": "function_call_output", "call_id": "call_list",
                           "output": "[vol-9]"}]
    second = await turn(stack, stream, input=history)
    assert second.output_text == "Skipped the delete."
    sent = stack.fake.requests[1]["input"]
    expanded = sent[3]
    assert expanded["type"] == "message" and expanded["role"] == "assistant"
    assert "id" not in expanded and DENIAL in expanded["content"][0]["text"]
    assert sent[1] == {"type": "item_reference", "id": first.output[0].id}  # OpenAI's own
    history += [*references(second), {"role": "user", "content": "thanks"}]
    third = await turn(stack, stream, input=history)
    assert third.output_text == "Bye."


@pytest.mark.parametrize("stream", [False, True])
async def test_full_items_sent_back_after_a_denial(stack: Stack, stream: bool) -> None:
    """The openai SDK's habit: the answer's output items sent back as they came."""
    first = await denied_first(stack, stream)
    stack.fake.push(Reply(content="ok"))
    history: list[Any] = [{"role": "user", "content": "clean up"},
                          *(i.to_dict() for i in first.output),
                          {"type": "function_call_output", "call_id": "call_list",
                           "output": "[vol-9]"}]
    second = await turn(stack, stream, input=history, store=False)
    assert second.output_text == "ok"
    sent = stack.fake.requests[1]["input"]
    assert all(not str(i.get("id", "")).startswith("msg_tether_") for i in sent)


async def test_an_expired_item_reference_is_refused_with_its_cause(stack: Stack) -> None:
    first = await denied_first(stack, False)
    stack.tether.proxy[CONTEXT].rewrites = MemoryRewrites()  # everything expired
    with pytest.raises(openai.BadRequestError) as e:
        await turn(stack, False, input=[*references(first), {"role": "user", "content": "go"}])
    assert e.value.status_code == 400
    assert "tether no longer holds it" in e.value.message
    assert str(first.output[2].id) in e.value.message
    assert len(stack.fake.requests) == 1  # nothing forwarded


async def test_another_agents_references_are_refused(stack: Stack) -> None:
    first = await denied_first(stack, False, agent="janitor")
    with pytest.raises(openai.BadRequestError) as e:
        await turn(stack, False, agent="intruder", input=references(first))
    assert "another agent" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await turn(stack, False, agent="intruder", previous_response_id=first.id, input="go")
    assert "another agent" in e.value.message and first.id in e.value.message
    assert len(stack.fake.requests) == 1
    stack.fake.push(Reply(content="fine"))
    ok = await turn(stack, False, agent="janitor", previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": "call_list", "output": "[]"}])
    assert ok.output_text == "fine"


async def test_a_denied_call_the_agent_answered_is_not_answered_twice(stack: Stack) -> None:
    first = await denied_first(stack, False)
    stack.fake.push(Reply(content="ok"))
    await turn(stack, False, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": "call_list", "output": "[]"},
        {"type": "function_call_output", "call_id": "call_del", "output": "mine"}])
    sent = stack.fake.requests[1]["input"]
    assert [i["call_id"] for i in sent] == ["call_list", "call_del"]


async def test_without_tether_the_chain_breaks(stack: Stack) -> None:
    """The fake refuses what OpenAI refuses: the test above is not vacuous."""
    first = await denied_first(stack, False)
    stack.tether.proxy[CONTEXT].rewrites = MemoryRewrites()
    with pytest.raises(openai.BadRequestError) as e:
        await turn(stack, False, previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": "call_list", "output": "[]"}])
    assert "No tool output found for function call call_del" in e.value.message
    assert "tether: if tether denied that call, it no longer holds" in e.value.message



# --- the Conversations API ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_conversation_after_a_denial(stack: Stack, stream: bool) -> None:
    client = stack.client()
    conversation = await client.conversations.create()
    first = await denied_first_in(stack, stream, conversation.id)
    stack.fake.push(Reply(content="I skipped it."), Reply(content="Bye."))
    second = await turn(stack, stream, conversation=conversation.id, input=[
        {"type": "function_call_output", "call_id": "call_list", "output": "[vol-9]"}])
    assert second.output_text == "I skipped it."
    sent = stack.fake.requests[1]["input"]
    assert sent[0]["call_id"] == "call_del" and DENIAL in sent[0]["output"]
    third = await turn(stack, stream, conversation=conversation.id, input="thanks")
    assert third.output_text == "Bye."
    assert stack.fake.requests[2]["input"] == "thanks"  # answered once, not again
    # Read back, the conversation shows the denial as the agent got it.
    items = [i.to_dict() for i in (await client.conversations.items.list(
        conversation.id, order="asc")).data]
    calls = [i["call_id"] for i in items if i["type"] == "function_call"]
    assert calls == ["call_list"]
    assert first.output[2].id in [i.get("id") for i in items]


async def denied_first_in(stack: Stack, stream: bool, conversation: str) -> Response:
    stack.fake.push(Reply(content="Cleaning up.", calls=(
        Call("list_volumes", "{}", id="call_list"), Call(PROD_DELETE.name, PROD_DELETE.arguments,
                                                          id="call_del"))))
    r = await turn(stack, stream, conversation=conversation)
    assert DENIAL in r.output_text
    return r


# --- stored retrieval ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stored_response_reads_back_as_rewritten(stack: Stack, stream: bool) -> None:
    first = await denied_first(stack, stream)
    client = stack.client()
    again = await client.responses.retrieve(first.id)
    assert [i.to_dict() for i in again.output] == [i.to_dict() for i in first.output]
    assert "call_del" not in again.model_dump_json()
    items = await client.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"]


async def test_a_stored_response_tether_has_no_record_of_is_refused(stack: Stack) -> None:
    first = await denied_first(stack, False)
    stack.tether.proxy[CONTEXT].rewrites = MemoryRewrites()
    with pytest.raises(openai.APIStatusError) as e:
        await stack.client().responses.retrieve(first.id)
    assert e.value.status_code == 501 and "no record" in e.value.message


async def test_a_stored_response_without_calls_reads_back(stack: Stack) -> None:
    stack.fake.push(Reply(content="hello"))
    r = await turn(stack, False)
    again = await stack.client().responses.retrieve(r.id)
    assert again.output_text == "hello"


async def test_another_agents_stored_response_is_refused(stack: Stack) -> None:
    first = await denied_first(stack, False, agent="janitor")
    with pytest.raises(openai.BadRequestError) as e:
        await stack.client().responses.retrieve(
            first.id, extra_headers={"X-Tether-Agent": "intruder"})
    assert "another agent" in e.value.message


async def test_other_stored_answer_endpoints_stay_refused(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.APIStatusError) as e:
        await client.responses.delete("resp_1")
    assert e.value.status_code == 501
    with pytest.raises(openai.APIStatusError) as e:
        await client.conversations.items.create("conv_1", items=[])
    assert e.value.status_code == 501
    with pytest.raises(openai.NotFoundError):  # passed, and the upstream has no such response
        await client.responses.retrieve("resp_nothing")


FLOWS = """
flows:
  labels:
    untrusted: [web_fetch]
tools:
  web_fetch: {effect: read}
rules:
  - id: no-evil-fetch
    match: {tool: web_fetch, args: {url: {matches: evil}}}
    action: deny
    message: not that site
  - id: write-after-untrusted
    match: {effect: write, session: {after: {label: untrusted}}}
    action: hold
    timeout: 300ms
"""


async def test_tethers_own_denial_output_is_not_untrusted_content(make_stack: MakeStack) -> None:
    """The output tether adds for a denied call is its own text, not a tool's: flow rules
    do not count it as a result of unknown origin (which an agent-sent one would be)."""
    stack = await make_stack(policy=FLOWS)
    stack.fake.push(Reply(calls=(Call("web_fetch", '{"url": "https://evil.example"}',
                                      id="call_fetch"),)))
    tools = [{"type": "function", "name": n, "parameters": {"type": "object"}}
             for n in ("web_fetch", "update_record")]
    first, _ = await create(stack, False, tools=tools)
    assert "not that site" in first.output_text
    stack.fake.push(Reply(calls=(Call("update_record", "{}", id="call_write"),)))
    second, _ = await create(stack, False, previous_response_id=first.id, input="go on",
                             tools=tools)
    assert [i.type for i in second.output] == ["function_call"], second.output_text
    assert stack.fake.requests[1]["input"][0]["call_id"] == "call_fetch"


async def test_a_denial_in_a_stream_tether_continued(make_stack: MakeStack,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An MCP approval tether answered, then a denied call in the continuation: the agent
    chains from the first round's id (the one its stream announced); tether chains from
    the last round and answers the denied call there (rewrite mode; under the default the
    approved create_issue, reported as run in the second round, is judged again as a
    provider-tool violation, and an answer with a violation is not continued)."""
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", "approvals-test-token")
    stack = await make_stack(policy=REWRITE + TIMED, extra=CONFIG)
    stack.fake.mcp = McpState(tools={"create_issue": lambda a: json.dumps({"number": 7})})
    stack.fake.push(Reply(content="Filing.", calls=(CREATE,)),
                    Reply(content="Cleaning too.", calls=(PROD_DELETE,)),
                    Reply(content="Done."))
    tools: list[Any] = [mcp(),
                        {"type": "function", "name": "delete_volume",
                         "parameters": {"type": "object"}}]

    async def ask() -> Response:
        async with stack.client().responses.stream(model="gpt-x", input="file it",
                                                   tools=tools) as s:
            async for _ in s:
                pass
            return await s.get_final_response()

    task = asyncio.create_task(ask())
    for _ in range(100):
        if await pending(stack):
            break
        await asyncio.sleep(0.05)
    [approval] = await pending(stack)
    status, _ = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                            {"by": "alice", "reason": ""})
    assert status == 200
    final = await asyncio.wait_for(task, 10)
    assert DENIAL in final.output_text
    more = await stack.client().responses.create(model="gpt-x", input="and?", tools=tools,
                                                 previous_response_id=final.id)
    assert more.output_text == "Done."
    third = stack.fake.requests[2]
    assert third["previous_response_id"] != final.id  # the last round's
    assert third["input"][0]["type"] == "function_call_output" and \
        DENIAL in third["input"][0]["output"]
