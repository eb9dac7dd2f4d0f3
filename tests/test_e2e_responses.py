"""The official openai SDK's Responses API, through a real tether, against the fake upstream."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import (
    CustomToolParam,
    FunctionToolParam,
    Response,
    ResponseStreamEvent,
    ToolParam,
)
from yarl import URL

from proxy.demo.fake_responses import CustomCall, ServerCall, stream_events
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, RawReply, Reply

TOOLS: list[ToolParam] = [
    *(FunctionToolParam(type="function", name=n, parameters={"type": "object"}, strict=False)
      for n in ("get_weather", "delete_volume", "drop_database", "resize_volume", "list_volumes")),
    CustomToolParam(type="custom", name="run_sql"),
]
ODD_ARGS = '{ "city":"Zürich",\n  "note": "tab\\there \\u00e9 \\"q\\" 漢字", "n": 1.50e2 }'
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')
SQL_POLICY = """
rules:
  - id: no-drop-sql
    description: Free-form SQL is governed as args.input
    match: {tool: run_sql, args: {input: {matches: "(?i)\\\\bdrop\\\\b"}}}
    action: deny
    message: DROP statements are not allowed
"""


def calls_of(output: list[Any]) -> list[tuple[str, str, str]]:
    """(type, name, argument text) of every call item in a response's output."""
    out = []
    for item in output:
        if item.type == "function_call":
            out.append((item.type, item.name, item.arguments))
        elif item.type == "custom_tool_call":
            out.append((item.type, item.name, item.input))
    return out


async def create(stack: Stack, stream: bool, **kw: Any) -> tuple[Response, list[ResponseStreamEvent]]:
    """One answer, either way; a streamed one is accumulated the way agents do: finished
    items from output_item.done, checked against the final response."""
    client = stack.client()
    args: dict[str, Any] = {"model": "gpt-x", "input": "clean up", "tools": TOOLS, **kw}
    if not stream:
        return await client.responses.create(**args), []
    events: list[ResponseStreamEvent] = []
    async for event in await client.responses.create(stream=True, **args):
        events.append(event)
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), "sequence numbers must strictly increase"
    final = [e for e in events if e.type in ("response.completed", "response.incomplete",
                                             "response.failed")]
    assert len(final) == 1
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.to_dict() for i in done] == [i.to_dict() for i in final[0].response.output]
    return final[0].response, events


async def test_single_allowed_call_non_streaming(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", ODD_ARGS, id="call_abc"),)))
    r, _ = await create(stack, False)
    [item] = r.output
    assert item.type == "function_call" and item.call_id == "call_abc"
    assert (item.name, item.arguments) == ("get_weather", ODD_ARGS)
    [record] = stack.decisions()
    assert record["action"] == "allow" and record["arguments"]["city"] == "Zürich"
    assert record["call_id"] == "call_abc" and record["endpoint"] == "v1/responses"
    assert stack.fake.requests[0]["tools"][0]["name"] == "get_weather"


async def test_single_allowed_call_streaming(stack: Stack) -> None:
    stack.fake.push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    r, events = await create(stack, True)
    assert r.output_text == "Let me check."
    assert calls_of(r.output) == [("function_call", "get_weather", ODD_ARGS)]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == ODD_ARGS
    assert [r["stream"] for r in stack.decisions()] == [True]


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_calls_all_allowed(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),
                                 Call("get_weather", '{"city": "Lima"}'),
                                 Call("list_volumes", "{}"))))
    r, _ = await create(stack, stream)
    assert calls_of(r.output) == [("function_call", "get_weather", '{"city": "Oslo"}'),
                                  ("function_call", "get_weather", '{"city": "Lima"}'),
                                  ("function_call", "list_volumes", "{}")]
    assert len({i.call_id for i in r.output if i.type == "function_call"}) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_replaced_and_allowed_call_kept(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE, Call("list_volumes", "{}"))))
    r, _ = await create(stack, stream)
    assert [i.type for i in r.output] == ["message", "function_call", "message", "function_call"]
    assert calls_of(r.output) == [("function_call", "get_weather", ODD_ARGS),
                                  ("function_call", "list_volumes", "{}")]
    assert r.output_text.startswith("Cleaning up.")
    assert "'delete_volume' was denied by no-prod-deletes" in r.output_text
    assert "Deleting production resources is not allowed" in r.output_text
    assert r.status == "completed"
    actions = [(x["tool"], x["action"], x["rules"], x["stream"]) for x in stack.decisions()]
    assert actions == [("get_weather", "allow", [], stream),
                       ("delete_volume", "deny", ["no-prod-deletes"], stream),
                       ("list_volumes", "allow", [], stream)]


async def test_stream_helper_final_response_reflects_the_rewrite(stack: Stack) -> None:
    stack.fake.push(Reply(content="Cleaning up.", calls=(Call("get_weather", ODD_ARGS),
                                                         PROD_DELETE)))
    client = stack.client()
    text: list[str] = []
    async with client.responses.stream(model="gpt-x", input="clean up", tools=TOOLS) as s:
        async for event in s:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
        final = await s.get_final_response()
    assert [i.type for i in final.output] == ["message", "function_call", "message"]
    assert calls_of(final.output) == [("function_call", "get_weather", ODD_ARGS)]
    assert "no-prod-deletes" in final.output_text and "".join(text) == final.output_text
    assert not any(getattr(i, "name", None) == "delete_volume" for i in final.output)


@pytest.mark.parametrize("stream", [False, True])
async def test_only_call_denied_leaves_no_call(make_stack: MakeStack, stream: bool) -> None:
    """In rewrite mode the answer ends at tether's message."""
    stack = await make_stack(policy="defaults: {on_deny: rewrite}\n" + POLICY)
    stack.fake.push(Reply(calls=(PROD_DELETE,)))
    r, _ = await create(stack, stream)
    assert calls_of(r.output) == [] and [i.type for i in r.output] == ["message"]
    assert "denied" in r.output_text
    assert len(stack.fake.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_only_call_denied_is_continued_by_default(stack: Stack, stream: bool) -> None:
    """The default (`on_deny: continue`): tether's message, then the model's answer after
    reading the denial as the call's output, in one response."""
    stack.fake.push(Reply(calls=(PROD_DELETE,)), Reply(content="I will leave it."))
    r, _ = await create(stack, stream)
    assert calls_of(r.output) == [] and [i.type for i in r.output] == ["message", "message"]
    assert "denied" in r.output_text and r.output_text.endswith("I will leave it.")
    assert len(stack.fake.requests) == 2
    outputs = [i for i in stack.fake.requests[1]["input"] if i["type"] == "function_call_output"]
    assert len(outputs) == 1 and "no-prod-deletes" in outputs[0]["output"]


@pytest.mark.parametrize("stream", [False, True])
async def test_custom_tool_input_is_governed_as_args_input(make_stack: MakeStack,
                                                           stream: bool) -> None:
    stack = await make_stack(policy=SQL_POLICY)
    stack.fake.push(Reply(calls=(CustomCall("run_sql", "SELECT * FROM t;\n"),
                                 CustomCall("run_sql", "DROP TABLE users;"))))
    r, _ = await create(stack, stream)
    assert calls_of(r.output) == [("custom_tool_call", "run_sql", "SELECT * FROM t;\n")]
    assert "DROP statements are not allowed" in r.output_text
    records = stack.decisions()
    assert [(x["action"], x["arguments"]) for x in records] == [
        ("allow", {"input": "SELECT * FROM t;\n"}), ("deny", {"input": "DROP TABLE users;"})]


@pytest.mark.parametrize("stream", [False, True])
async def test_built_in_tool_items_pass_untouched(stack: Stack, stream: bool) -> None:
    search = ServerCall("web_search_call", '{"action": {"type": "search", "query": "tether"}}')
    stack.fake.push(Reply(content="Found it.", calls=(search,)))
    r, _ = await create(stack, stream, tools=[{"type": "web_search"}])
    assert [i.type for i in r.output] == ["message", "web_search_call"]
    assert stack.decisions() == []


async def test_on_deny_error_is_a_403_in_openai_shape(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("drop_database", '{"name": "prod"}'),)))
    with pytest.raises(openai.PermissionDeniedError) as info:
        await create(stack, False)
    assert info.value.status_code == 403
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "tool_call_denied"
    assert "Dropping databases is never allowed" in info.value.message


async def test_on_deny_error_in_a_stream_raises_in_the_sdk(stack: Stack) -> None:
    stack.fake.push(Reply(content="ok", calls=(Call("drop_database", '{"name": "prod"}'),)),
                    Reply(content="ok", calls=(Call("drop_database", '{"name": "prod"}'),)))
    with pytest.raises(openai.APIError, match="Dropping databases is never allowed"):
        await create(stack, True)
    client = stack.client()
    with pytest.raises(openai.APIError, match="Dropping databases is never allowed"):
        async with client.responses.stream(model="gpt-x", input="x", tools=TOOLS) as s:
            await s.get_final_response()


@pytest.mark.parametrize("stream", [False, True])
async def test_hold_nobody_approves_is_a_deny(stack: Stack, stream: bool) -> None:
    stack.fake.push(Reply(calls=(Call("resize_volume", '{"size": 10}'),)))
    r, _ = await create(stack, stream)
    assert calls_of(r.output) == [] and "approval" in r.output_text
    [record] = stack.decisions()
    assert (record["action"], record["policy_action"]) == ("hold", "hold")
    events = [(r["event"], r["tool"]) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", "resize_volume"), ("expired", "resize_volume")]


async def test_undeclared_tool_is_denied(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    r, _ = await create(stack, False, tools=[{"type": "function", "name": "list_volumes",
                                              "parameters": {}, "strict": False}])
    assert calls_of(r.output) == []
    assert stack.decisions()[0]["rules"] == ["tether:undeclared-tool"]


async def test_safety_identifier_names_the_session(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    await create(stack, False, safety_identifier="user-42")
    [record] = stack.decisions()
    assert record["session"] == "user-42"


async def test_session_and_agent_headers_reach_the_audit_not_the_upstream(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    client = stack.client(default_headers={"X-Tether-Session": "s-1", "X-Tether-Agent": "janitor"})
    await client.responses.create(model="gpt-x", input="x", tools=TOOLS)
    [record] = stack.decisions()
    assert (record["session"], record["agent"]) == ("s-1", "janitor")
    sent = {k.lower() for k in stack.fake.headers[-1]}
    assert "x-tether-session" not in sent and "x-tether-agent" not in sent


# --- Azure ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_azure_responses_routes(make_stack: MakeStack, stream: bool) -> None:
    fake = FakeOpenAI()
    stack = await make_stack(upstreams={"azure": fake})
    fake.push(Reply(calls=(Call("get_weather", ODD_ARGS), PROD_DELETE)),
              Reply(calls=(Call("get_weather", ODD_ARGS), PROD_DELETE)))
    classic = openai.AsyncAzureOpenAI(azure_endpoint=stack.proxy_url + "/azure",
                                      api_key="azure-key", api_version="2025-04-01-preview",
                                      max_retries=0)
    v1 = openai.AsyncOpenAI(base_url=stack.proxy_url + "/azure/openai/v1", api_key="k",
                            max_retries=0)
    stack.clients += [classic, v1]
    for client in (classic, v1):
        r: Response
        if stream:
            async with client.responses.stream(model="my-deployment", input="x",
                                               tools=TOOLS) as s:
                r = await s.get_final_response()
        else:
            r = await client.responses.create(model="my-deployment", input="x", tools=TOOLS)
        assert calls_of(r.output) == [("function_call", "get_weather", ODD_ARGS)]
        assert "no-prod-deletes" in r.output_text
    assert "api-key" not in {k.lower() for k in fake.headers[0]}  # the agent's key is stripped
    assert [(x["provider"], x["endpoint"], x["action"]) for x in stack.decisions()] == [
        ("azure", "openai/responses", "allow"), ("azure", "openai/responses", "deny"),
        ("azure", "openai/v1/responses", "allow"), ("azure", "openai/v1/responses", "deny")]


# --- bad input --------------------------------------------------------------------------


async def post(stack: Stack, body: bytes, path: str = "/openai/v1/responses",
               method: str = "POST") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        url = URL(stack.proxy_url + path, encoded=True)
        async with http.request(method, url, data=io.BytesIO(body),
                                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()


def rejected(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == "request"]


@pytest.mark.parametrize("body, status, needle", [
    (b'{"model": "gpt-x", "input": [', 400, "not valid JSON"),
    (b'{"model": "gpt-x", "stream": "true"}', 400, "'stream' must be a boolean"),
    (b'{"model": "gpt-x", "stream": false, "stream": true}', 400, "duplicate key"),
    (b'{"model": "gpt-x", "tools": {"type": "function"}}', 400, "'tools' must be an array"),
    (b'{"model": "gpt-x", "tools": [{"type": "local_shell"}]}', 501, "cannot govern"),
])
async def test_malformed_request_is_refused_and_not_forwarded(stack: Stack, body: bytes,
                                                              status: int, needle: str) -> None:
    got, error = await post(stack, body)
    assert got == status and needle in error["error"]["message"]
    assert stack.fake.requests == []
    [record] = rejected(stack)
    assert record["status"] == status


async def test_sdk_sees_a_bad_request_error(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError, match="must be an array"):
        await stack.client().responses.create(model="gpt-x", input="x",
                                              extra_body={"tools": {"x": 1}})


async def test_unreadable_json_from_upstream_is_a_502(stack: Stack) -> None:
    stack.fake.push(RawReply(chunks=(b'{"id": "x", "object": "response"}',)))
    with pytest.raises(openai.InternalServerError, match="no 'output'"):
        await create(stack, False)


def _cut_after(turn: Reply, needle: bytes, extra: int) -> tuple[bytes, ...]:
    events = stream_events(turn, "gpt-x")
    return tuple(events[:next(i for i, e in enumerate(events) if needle in e) + extra])


TWO = Reply(content="Deleting.", calls=(
    Call("get_weather", '{"city": "Oslo"}'),
    Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "temporary"}}')))


async def test_upstream_stream_cut_mid_call(stack: Stack) -> None:
    stack.fake.push(RawReply(content_type="text/event-stream",
                             chunks=_cut_after(TWO, b"delete_volume", 3), cut=True))
    stream = await stack.client().responses.create(model="gpt-x", input="x", tools=TOOLS,
                                                   stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="ended before the response was complete"):
        async for event in stream:
            if event.type == "response.output_item.done" and event.item.type == "function_call":
                seen.append(event.item.name)
    assert seen == ["get_weather"]
    assert [(r["tool"], r["action"], r["rules"]) for r in stack.decisions()] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(r["code"] == "stream_error" for r in rejected(stack))


@pytest.mark.parametrize("finish, status", [("length", "incomplete"), ("failed", "failed")])
async def test_stream_ending_mid_call_denies_it(stack: Stack, finish: str, status: str) -> None:
    stack.fake.push(Reply(content="Deleting.", calls=TWO.calls, finish_reason=finish))
    r, events = await create(stack, True)
    assert r.status == status
    assert calls_of(r.output) == [("function_call", "get_weather", '{"city": "Oslo"}')]
    assert not any(e.type == "response.function_call_arguments.delta" and e.output_index == 2
                   for e in events)
    assert [(x["tool"], x["action"], x["rules"]) for x in stack.decisions()] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(x["code"] == "stream_error" for x in rejected(stack)) == (status == "failed")


async def test_error_event_inside_a_200_raises_in_the_sdk(stack: Stack) -> None:
    error = {"type": "error", "code": "server_error", "message": "The server is overloaded",
             "param": None, "sequence_number": 40}
    chunks = _cut_after(TWO, b"delete_volume", 2) + (
        f"event: error\ndata: {json.dumps(error)}\n\n".encode(),)
    stack.fake.push(RawReply(content_type="text/event-stream", chunks=chunks))
    with pytest.raises(openai.APIError, match="The server is overloaded"):
        await create(stack, True)
    assert [(x["tool"], x["action"]) for x in stack.decisions()] == [
        ("get_weather", "allow"), ("delete_volume", "deny")]


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/openai/v1/responses/", 404),
    ("POST", "/openai/v1/Responses", 404),
    ("POST", "/openai/responses", 404),
    ("POST", "/openai/v2/responses", 404),
    ("GET", "/openai/v1/responses", 404),
    ("POST", "/openai/v1//responses", 400),
    ("POST", "/openai/v1/respons%65s", 400),
    # Stored reads are shown as tether rewrote them (test_e2e_responses_turns.py): the
    # upstream's 404 for one it does not hold comes back as it came.
    ("GET", "/openai/v1/responses/resp_1", 404),
    ("POST", "/openai/v1/responses/resp_1/cancel", 501),
    ("GET", "/openai/v1/responses/resp_1/input_items", 404),
    ("DELETE", "/openai/v1/responses/resp_1", 501),
    ("GET", "/openai/v1/responses/resp_1/input_items/x", 501),
    ("GET", "/openai/v1/conversations/conv_1", 501),
    ("POST", "/openai/v1/threads/t1/runs", 501),
    ("POST", "/openai/v1/realtime/sessions", 501),
    ("POST", "/azure/openai/deployments/d/responses", 404),
    ("POST", "/azure/openai/Responses", 404),
    ("GET", "/azure/openai/responses/resp_1", 501),
])
async def test_other_responses_routes_are_refused(make_stack: MakeStack, method: str, path: str,
                                                  status: int) -> None:
    fake = FakeOpenAI()
    stack = await make_stack(upstreams={"azure": fake})
    got, error = await post(stack, b'{"model": "gpt-x", "input": "x"}', path, method)
    assert got == status and error["error"]["message"]
    assert stack.fake.requests == [] and fake.requests == []
