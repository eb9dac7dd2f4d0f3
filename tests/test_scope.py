"""Agent scopes (hub and spoke): declared tools outside the scope are taken out of the
request before the model sees them, and calls outside it are still denied."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.errors import BadRequest
from proxy.policy.names import normalize
from proxy.providers.anthropic import MESSAGES as ANTHROPIC
from proxy.providers.base import Restricted, RestrictsTools
from proxy.providers.bedrock import CONVERSE
from proxy.providers.gemini import GEMINI
from proxy.providers.openai_chat import CHAT
from proxy.providers.openai_responses import RESPONSES
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Call, Reply

SCOPE = ("query_", "get_db_status", "openai:web_search", "anthropic:web_search",
         "gemini:google_search")


def permits(name: str) -> bool:
    n = normalize(name)
    return n.startswith("query_") or n in SCOPE


def restrict(fmt: Any, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    assert isinstance(fmt, RestrictsTools)
    out = fmt.restrict_tools(json.dumps(obj).encode(), permits)
    if out is None:
        return None, ()
    assert isinstance(out, Restricted)
    return json.loads(out.body), out.removed


def fn(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


FORMATS = [CHAT, RESPONSES, ANTHROPIC, CONVERSE, GEMINI]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_nothing_removed_keeps_the_body_byte_identical(fmt: Any) -> None:
    # odd spacing and key order, which a re-serialisation would change
    bodies = {
        "openai.chat": b'{"model":"m",  "tools":[{"type":"function","function":{"name":"query_a"}}]}',
        "openai.responses": b'{"tools": [{"type":"function","name":"query_a"},{"type":"web_search"}]}',
        "anthropic.messages": b'{"model":"m","tools":[ {"name":"get_db_status"} ]}',
        "bedrock.converse": b'{"toolConfig":{"tools":[{"toolSpec":{"name":"query_a"}}]} }',
        "gemini.generate": b'{"tools":[{"functionDeclarations":[{"name":"query_a"}]},{"googleSearch":{}}]}',
    }
    assert fmt.restrict_tools(bodies[fmt.name], permits) is None
    assert fmt.restrict_tools(b'{"model": "m"}', permits) is None


def test_chat() -> None:
    body, removed = restrict(CHAT, {"model": "m", "tools": [fn("query_a"), fn("delete_volume"),
                                                            fn("get_db_status")],
                                    "tool_choice": "auto", "parallel_tool_calls": False})
    assert removed == ("delete_volume",)
    assert body is not None and [t["function"]["name"] for t in body["tools"]] == [
        "query_a", "get_db_status"]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False


def test_chat_emptied_and_legacy_functions() -> None:
    body, removed = restrict(CHAT, {"model": "m", "tools": [fn("delete_volume")],
                                    "tool_choice": "required", "parallel_tool_calls": True,
                                    "functions": [{"name": "drop_db"}, {"name": "query_b"}]})
    assert removed == ("delete_volume", "drop_db")
    assert body == {"model": "m", "functions": [{"name": "query_b"}]}
    body, _ = restrict(CHAT, {"model": "m", "functions": [{"name": "drop_db"}],
                              "function_call": "auto"})
    assert body == {"model": "m"}


@pytest.mark.parametrize("choice", [
    {"type": "function", "function": {"name": "delete_volume"}},
    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [fn("delete_volume")]}},
])
def test_chat_forced_removed_tool_is_refused(choice: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match="delete_volume"):
        restrict(CHAT, {"model": "m", "tools": [fn("query_a"), fn("delete_volume")],
                        "tool_choice": choice})
    with pytest.raises(BadRequest, match="drop_db"):
        restrict(CHAT, {"model": "m", "functions": [{"name": "drop_db"}],
                        "function_call": {"name": "drop_db"}})


def test_chat_allowed_tools_are_cut_too() -> None:
    body, _ = restrict(CHAT, {"model": "m", "tools": [fn("query_a"), fn("delete_volume")],
                              "tool_choice": {"type": "allowed_tools", "allowed_tools": {
                                  "mode": "auto", "tools": [fn("query_a"), fn("delete_volume")]}}})
    assert body is not None
    assert body["tool_choice"]["allowed_tools"]["tools"] == [fn("query_a")]


def test_responses_functions_hosted_tools_and_namespaces() -> None:
    tools = [{"type": "function", "name": "query_a"}, {"type": "function", "name": "delete_volume"},
             {"type": "web_search"}, {"type": "code_interpreter", "container": {"type": "auto"}},
             {"type": "custom", "name": "run_sql"},
             {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "rm_rf"}]}]
    body, removed = restrict(RESPONSES, {"model": "m", "tools": tools, "tool_choice": "auto"})
    assert removed == ("delete_volume", "openai:code_interpreter", "run_sql", "rm_rf")
    assert body is not None and body["tools"] == [tools[0], tools[2]]
    with pytest.raises(BadRequest, match="code_interpreter"):
        restrict(RESPONSES, {"model": "m", "tools": tools,
                             "tool_choice": {"type": "code_interpreter"}})
    with pytest.raises(BadRequest, match="run_sql"):
        restrict(RESPONSES, {"model": "m", "tools": tools,
                             "tool_choice": {"type": "custom", "name": "run_sql"}})


def test_responses_emptied() -> None:
    body, removed = restrict(RESPONSES, {"model": "m", "tools": [{"type": "function",
                                                                  "name": "delete_volume"}],
                                         "tool_choice": "required", "parallel_tool_calls": True})
    assert removed == ("delete_volume",) and body == {"model": "m"}


def test_anthropic() -> None:
    tools = [{"name": "query_a", "input_schema": {}}, {"name": "delete_volume", "input_schema": {}},
             {"type": "web_search_20250305", "name": "web_search"}]
    body, removed = restrict(ANTHROPIC, {"model": "m", "tools": tools,
                                         "tool_choice": {"type": "any"}})
    assert removed == ("delete_volume",)
    assert body is not None and body["tools"] == [tools[0], tools[2]]
    assert body["tool_choice"] == {"type": "any"}
    body, _ = restrict(ANTHROPIC, {"model": "m", "tools": [tools[1]], "tool_choice": {"type": "any"}})
    assert body == {"model": "m"}
    with pytest.raises(BadRequest, match="delete_volume"):
        restrict(ANTHROPIC, {"model": "m", "tools": tools,
                             "tool_choice": {"type": "tool", "name": "delete_volume"}})


def test_bedrock() -> None:
    spec: list[dict[str, Any]] = [{"toolSpec": {"name": n, "inputSchema": {"json": {}}}}
                                  for n in ("query_a", "delete_volume")]
    body, removed = restrict(CONVERSE, {"messages": [], "toolConfig": {
        "tools": [*spec, {"cachePoint": {"type": "default"}}], "toolChoice": {"auto": {}}}})
    assert removed == ("delete_volume",)
    assert body is not None and body["toolConfig"] == {
        "tools": [spec[0], {"cachePoint": {"type": "default"}}], "toolChoice": {"auto": {}}}
    body, _ = restrict(CONVERSE, {"messages": [], "toolConfig": {
        "tools": [spec[1], {"cachePoint": {"type": "default"}}], "toolChoice": {"any": {}}}})
    assert body == {"messages": []}
    with pytest.raises(BadRequest, match="delete_volume"):
        restrict(CONVERSE, {"messages": [], "toolConfig": {
            "tools": spec, "toolChoice": {"tool": {"name": "delete_volume"}}}})


def test_gemini_both_spellings() -> None:
    body, removed = restrict(GEMINI, {"contents": [], "tools": [
        {"functionDeclarations": [{"name": "query_a"}, {"name": "delete_volume"}]},
        {"function_declarations": [{"name": "drop_db"}]},
        {"googleSearch": {}}, {"code_execution": {}}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY",
                                                 "allowedFunctionNames": ["query_a", "drop_db"]}}})
    assert removed == ("delete_volume", "drop_db", "gemini:code_execution")
    assert body is not None and body["tools"] == [
        {"functionDeclarations": [{"name": "query_a"}]}, {"googleSearch": {}}]
    assert body["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"] == ["query_a"]


def test_gemini_emptied_and_forced() -> None:
    body, _ = restrict(GEMINI, {"contents": [], "tools": [
        {"function_declarations": [{"name": "delete_volume"}]}],
        "tool_config": {"function_calling_config": {"mode": "ANY"}}})
    assert body == {"contents": []}
    with pytest.raises(BadRequest, match="delete_volume"):
        restrict(GEMINI, {"contents": [], "tools": [{"functionDeclarations": [
            {"name": "query_a"}, {"name": "delete_volume"}]}], "toolConfig": {
            "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["delete_volume"]}}})


# --- end to end --------------------------------------------------------------------------

AGENTS = "agents:\n  db-agent: {{tools: [query_*, get_db_status]{extra}}}\n"
TOOLS: Any = [fn("query_orders"), fn("get_db_status"), fn("delete_volume")]
DELETE = Call("delete_volume", '{"volume_id": "vol-1"}')
MESSAGES: Any = [{"role": "user", "content": "clean up"}]


async def scoped(make_stack: MakeStack, agent_extra: str = "", defaults: str = "",
                 **kw: Any) -> Stack:
    return await make_stack(policy=POLICY + AGENTS.format(extra=agent_extra) + defaults, **kw)


def client(stack: Stack) -> openai.AsyncOpenAI:
    return stack.client(default_headers={"X-Tether-Agent": "db-agent"})


def declared(body: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] if "function" in t else t["name"] for t in body.get("tools", [])]


async def metric(stack: Stack, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(stack.admin_url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_model_never_sees_tools_outside_the_scope(make_stack: MakeStack,
                                                               stream: bool) -> None:
    stack = await scoped(make_stack)
    stack.fake.push(Reply(calls=(DELETE, Call("query_orders", "{}"))))
    c = client(stack)
    if stream:
        names = []
        async for chunk in await c.chat.completions.create(model="m", messages=MESSAGES,
                                                           tools=TOOLS, stream=True):
            for choice in chunk.choices:
                names += [t.function.name for t in choice.delta.tool_calls or []
                          if t.function and t.function.name]
        text = ""
    else:
        r = await c.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        names = [t.function.name for t in r.choices[0].message.tool_calls or []
                 if t.type == "function"]
        text = r.choices[0].message.content or ""
    assert declared(stack.fake.requests[-1]) == ["query_orders", "get_db_status"]
    assert names == ["query_orders"]
    assert stream or "tether:agent-scope" in text
    decisions = {r["tool"]: r for r in stack.decisions()}
    assert decisions["delete_volume"]["action"] == "deny"
    assert "tether:agent-scope" in decisions["delete_volume"]["rules"]
    assert decisions["query_orders"]["action"] == "allow"
    [filtered] = [r for r in stack.audit() if r["kind"] == "tools_filtered"]
    assert (filtered["agent"], filtered["removed"]) == ("db-agent", ["delete_volume"])
    assert await metric(stack, "tether_tools_filtered_total") == 1


async def test_filtering_off_the_tool_reaches_the_model_but_the_call_is_denied(
        make_stack: MakeStack) -> None:
    stack = await scoped(make_stack, agent_extra=", filter_tools: false")
    stack.fake.push(Reply(calls=(DELETE,)))
    r = await client(stack).chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert declared(stack.fake.requests[-1]) == ["query_orders", "get_db_status", "delete_volume"]
    assert not r.choices[0].message.tool_calls
    [record] = stack.decisions()
    assert record["action"] == "deny" and record["rules"] == ["tether:agent-scope"]
    assert not [r for r in stack.audit() if r["kind"] == "tools_filtered"]


async def test_defaults_filter_tools_false_and_agent_override(make_stack: MakeStack) -> None:
    stack = await scoped(make_stack, defaults="defaults: {filter_tools: false}\n")
    stack.fake.push(Reply(content="ok"))
    await client(stack).chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert "delete_volume" in declared(stack.fake.requests[-1])
    stack = await scoped(make_stack, agent_extra=", filter_tools: true",
                         defaults="defaults: {filter_tools: false}\n")
    stack.fake.push(Reply(content="ok"))
    await client(stack).chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert "delete_volume" not in declared(stack.fake.requests[-1])


async def test_other_agents_and_unscoped_requests_are_untouched(make_stack: MakeStack) -> None:
    stack = await scoped(make_stack)
    stack.fake.push(Reply(content="ok"), Reply(content="ok"))
    await stack.client(default_headers={"X-Tether-Agent": "janitor"}).chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS)
    await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert [declared(b) for b in stack.fake.requests] == [declared({"tools": TOOLS})] * 2


async def test_forced_removed_tool_is_refused_and_audited(make_stack: MakeStack) -> None:
    stack = await scoped(make_stack)
    with pytest.raises(openai.BadRequestError) as e:
        await client(stack).chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "delete_volume"}})
    assert e.value.status_code == 400 and "delete_volume" in str(e.value)
    assert stack.fake.requests == []
    [record] = [r for r in stack.audit() if r["kind"] == "request"]
    assert (record["status"], record["agent"]) == (400, "db-agent")


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_model_never_sees_tools_outside_the_scope(make_stack: MakeStack,
                                                                  stream: bool) -> None:
    fake = FakeAnthropic()
    stack = await scoped(make_stack, upstreams={"anthropic": fake})
    fake.push(Reply(calls=(DELETE, Call("get_db_status", "{}"))))
    c = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                 max_retries=0, default_headers={"X-Tether-Agent": "db-agent"})
    tools: Any = [{"name": n, "input_schema": {"type": "object"}}
                  for n in ("query_orders", "get_db_status", "delete_volume")]
    try:
        if stream:
            async with c.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES,
                                         tools=tools) as s:
                content: list[Any] = list((await s.get_final_message()).content)
        else:
            content = list((await c.messages.create(model="claude-x", max_tokens=100,
                                                    messages=MESSAGES, tools=tools)).content)
    finally:
        await c.close()
    assert [t["name"] for t in fake.requests[-1]["tools"]] == ["query_orders", "get_db_status"]
    assert [b.name for b in content if b.type == "tool_use"] == ["get_db_status"]
    denied = [r for r in stack.decisions() if r["tool"] == "delete_volume"]
    assert denied and "tether:agent-scope" in denied[0]["rules"]
