"""A hostile agent against tool filtering (`filter_tools`): malformed `tools`, names
that hide behind case, invisible characters or a second name-bearing field,
duplicate JSON keys, forced tool choices, huge lists. The law under test: for any
body the filter accepts, no tool outside the scope survives in what is forwarded,
whichever field an upstream reads a tool's name from, and the request tether
re-parses is the request that goes upstream."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_gemini import FakeGemini
from proxy.errors import BadRequest, NotGoverned
from proxy.model import Action, Decision, Effect
from proxy.policy.engine import PolicyEngine
from proxy.policy.provider_tools import ProviderTools
from proxy.providers.anthropic import MESSAGES as ANTHROPIC
from proxy.providers.base import Restricted, Route, RouteKind
from proxy.providers.bedrock import CONVERSE
from proxy.providers.gemini import GEMINI
from proxy.providers.openai_chat import CHAT
from proxy.providers.openai_responses import RESPONSES
from proxy.server.provider_gate import GATES
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Reply

AGENTS = "agents:\n  db-agent: {tools: [query_*, get_db_status, web_search, googleSearch]}\n"
FORMATS = [CHAT, RESPONSES, ANTHROPIC, CONVERSE, GEMINI]


async def scoped(make_stack: MakeStack, **kw: Any) -> Stack:
    return await make_stack(policy=POLICY + AGENTS, **kw)


def _scope() -> Any:
    from proxy.policy.engine import AgentScope, Policy
    from proxy.policy.rules import _glob

    globs = ("query_*", "get_db_status", "web_search", "googleSearch")
    policy = Policy(agents={"db-agent": AgentScope(tuple(_glob(g) for g in globs), globs)})
    found = PolicyEngine(policy).tool_filter("db-agent")
    assert found is not None
    return found


SCOPE = _scope()


def _scope_judge(name: str, effect: Effect, arguments: Mapping[str, object]) -> Decision:
    """The provider-run check's judge with the scope as the only rule."""
    return Decision(Action.ALLOW if SCOPE(name) else Action.DENY, ("tether:agent-scope",))


def route(fmt: Any) -> Route:
    return Route(RouteKind.GOVERNED, fmt, "x", model="m", stream=False)


def wrap(fmt: Any, tools: object, choice: object = None) -> dict[str, Any]:
    """A request of `fmt` declaring `tools` (and forcing `choice`, when given)."""
    if fmt is CONVERSE:
        config: dict[str, Any] = {"tools": tools}
        if choice is not None:
            config["toolChoice"] = choice
        return {"messages": [], "toolConfig": config}
    body: dict[str, Any] = {"model": "m", "messages": [], "tools": tools}
    if choice is not None:
        body["toolConfig" if fmt is GEMINI else "tool_choice"] = choice
    return body


# --- the oracle: every name an upstream could read a tool by ---------------------------


def _name_of(value: object) -> list[str]:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return [value["name"]]
    return []


def upstream_names(fmt: Any, obj: dict[str, Any]) -> list[str]:
    """Deliberately generous: any field that any reading of the API's schema could take
    for the tool's name counts, so the filter cannot pass a tool by hiding its name in a
    field it does not look at."""
    if fmt is CONVERSE:
        tools = (obj.get("toolConfig") or {}).get("tools") or []
    else:
        tools = obj.get("tools") or []
    names: list[str] = []

    def entry(tool: object) -> None:
        if not isinstance(tool, dict):
            return
        if fmt is CHAT:
            names.extend(_name_of(tool.get("function")) + _name_of(tool.get("custom"))
                         + _name_of(tool))
        elif fmt is RESPONSES:
            kind = tool.get("type")
            if kind in ("function", "custom"):
                names.extend(_name_of(tool))
            elif kind == "namespace" and isinstance(tool.get("tools"), list):
                for inner in tool["tools"]:
                    entry(inner)
            elif isinstance(kind, str):
                names.append(kind)
        elif fmt is ANTHROPIC:
            names.extend(_name_of(tool))
        elif fmt is CONVERSE:
            names.extend(_name_of(tool.get("toolSpec")) + _name_of(tool.get("systemTool")))
        else:  # Gemini: declarations by name, built-ins by key
            for key, value in tool.items():
                if key in ("functionDeclarations", "function_declarations"):
                    for d in value if isinstance(value, list) else []:
                        names.extend(_name_of(d))
                else:  # Google reads either spelling of a field
                    names.append(re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key))

    for tool in tools if isinstance(tools, list) else []:
        entry(tool)
    return names


def check_forwarded(fmt: Any, body: bytes) -> None:
    """What the filter lets through: nothing outside the scope, and tether's re-parse
    sees the same tools as the upstream."""
    try:
        fmt.parse_request(body, route(fmt))
    except (BadRequest, NotGoverned):
        return  # refused whole: nothing is forwarded
    try:
        cut = fmt.restrict_tools(body, SCOPE)
    except BadRequest:
        return  # a forced removed tool: refused, nothing forwarded
    forwarded = cut.body if isinstance(cut, Restricted) else body
    # Then the provider-run tools' own check, as the server runs it next: an MCP server is
    # narrowed tool by tool there, not cut by the scope filter; none is configured here,
    # so each one is refused, and a server tool outside the scope is too.
    gate = GATES.get(fmt.name)
    if gate is not None:
        try:
            gated = gate(forwarded, ProviderTools(), _scope_judge)
        except BadRequest:
            return  # refused whole: nothing is forwarded
        forwarded = gated.body if gated.body is not None else forwarded
    parsed = fmt.parse_request(forwarded, route(fmt))  # what tether judges calls against
    obj = json.loads(forwarded)
    seen = upstream_names(fmt, obj)
    outside = [n for n in seen if not SCOPE(n)]
    assert not outside, f"{fmt.name}: forwarded tools outside the scope: {outside!r}"
    assert set(parsed.declared_tools) <= set(seen)


# --- generated bodies --------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from([
        "query_orders", "get_db_status", "delete_volume", "Delete_Volume", "DELETE_VOLUME",
        "Query_Orders", "query_\u200borders", "\uff51uery_x",  # fullwidth q: NFKC -> query_x
        "delete\u200b_volume", " delete_volume ", "dele\u0442e_volume",  # Cyrillic te
        "web_search", "Web_Search", "googleSearch", "google_search", "codeExecution",
        "query_" + "x" * 5000, "", "\u00df", "get_db_statu\u017f",  # long s: folds to s
    ]),
    st.text(max_size=12),
)
NON_STRINGS = st.one_of(st.none(), st.integers(), st.booleans(), st.just([]), st.just({}),
                        st.lists(NAMES, max_size=2))
NAME_VALUES = st.one_of(NAMES, NAMES, NON_STRINGS)
TYPES = st.one_of(st.sampled_from(["function", "custom", "web_search", "namespace", "mcp",
                                   "file_search", "code_interpreter", "allowed_tools"]), NAMES)


def _named() -> st.SearchStrategy[object]:
    return st.one_of(st.fixed_dictionaries({"name": NAME_VALUES}), NAME_VALUES)


VALUES: dict[str, st.SearchStrategy[object]] = {
    "type": TYPES,
    "name": NAME_VALUES,
    "function": _named(),
    "custom": _named(),
    "toolSpec": _named(),
    "systemTool": _named(),
    "functionDeclarations": st.lists(_named(), max_size=3),
    "function_declarations": st.lists(_named(), max_size=3),
    "googleSearch": st.just({}),
    "google_search": st.just({}),
    "cachePoint": st.just({"type": "default"}),
}


@st.composite
def tool_entry(draw: st.DrawFn, depth: int = 0) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(NON_STRINGS)  # not an object at all
    keys = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True))
    entry = {k: draw(VALUES[k]) for k in keys}
    if depth == 0 and draw(st.booleans()) and entry.get("type") == "namespace":
        entry["tools"] = draw(st.lists(tool_entry(depth=1), max_size=3))
    return entry


CHOICES = st.one_of(
    st.none(), st.sampled_from(["auto", "none", "required", "any"]),
    st.fixed_dictionaries({"type": TYPES, "name": NAMES}),
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": NAMES})}),
    st.fixed_dictionaries({"type": st.just("tool"), "name": NAMES}),
    st.fixed_dictionaries({"tool": st.fixed_dictionaries({"name": NAMES})}),
    st.fixed_dictionaries({"functionCallingConfig": st.fixed_dictionaries({
        "mode": st.just("ANY"), "allowedFunctionNames": st.lists(NAMES, max_size=2)})}),
)
TOOL_LISTS = st.one_of(st.lists(tool_entry(), max_size=6), NON_STRINGS)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(tools=TOOL_LISTS, choice=CHOICES)
def test_nothing_outside_the_scope_is_forwarded(fmt: Any, tools: object, choice: object) -> None:
    check_forwarded(fmt, json.dumps(wrap(fmt, tools, choice)).encode())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_a_second_name_field_does_not_smuggle_a_tool(fmt: Any) -> None:
    """One entry carrying two names: an allowed one where the filter looks first and a
    forbidden one where an upstream might look (`type: custom` reads `custom.name`)."""
    entries: dict[str, list[object]] = {
        "openai.chat": [
            {"type": "custom", "function": {"name": "query_a"}, "custom": {"name": "delete_all"}},
            {"type": "function", "function": {"name": "query_a"}, "name": "delete_all"}],
        "openai.responses": [{"type": "function", "name": "query_a",
                              "function": {"name": "delete_all"}}],
        "anthropic.messages": [{"name": "query_a", "type": "custom"}],
        "bedrock.converse": [{"toolSpec": {"name": "query_a", "inputSchema": {"json": {}}},
                              "systemTool": {"name": "delete_all"}}],
        "gemini.generate": [{"functionDeclarations": [{"name": "query_a"}],
                             "function_declarations": [{"name": "delete_all"}]}],
    }
    for entry in entries[fmt.name]:
        check_forwarded(fmt, json.dumps(wrap(fmt, [entry])).encode())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_case_and_invisible_variants_are_cut_like_the_scope_judges_them(fmt: Any) -> None:
    variants = ["Delete_Volume", "DELETE_VOLUME", "delete\u200b_volume", " delete_volume",
                "dele\u0442e_volume"]
    allowed = ["Query_Orders", "query_\u200borders", "\uff51uery_x", "GET_DB_STATUS"]
    for name in variants + allowed:
        tools: list[object]
        if fmt is CHAT:
            tools = [{"type": "function", "function": {"name": name}}]
        elif fmt is RESPONSES or fmt is ANTHROPIC:
            tools = [{"type": "function", "name": name}] if fmt is RESPONSES else [{"name": name}]
        elif fmt is CONVERSE:
            tools = [{"toolSpec": {"name": name, "inputSchema": {"json": {}}}}]
        else:
            tools = [{"functionDeclarations": [{"name": name}]}]
        cut = fmt.restrict_tools(json.dumps(wrap(fmt, tools)).encode(), SCOPE)
        assert (cut is None) == (name in allowed), name
        check_forwarded(fmt, json.dumps(wrap(fmt, tools)).encode())


@pytest.mark.parametrize("fmt", [CHAT, RESPONSES, ANTHROPIC, CONVERSE], ids=lambda f: f.name)
def test_forcing_a_removed_tool_in_another_case_is_refused(fmt: Any) -> None:
    """`tool_choice` naming `DELETE_VOLUME` when `delete_volume` was removed: the scope
    judges names in normal form, so the choice is the removed tool, not a new one."""
    tools: dict[str, list[object]] = {
        "openai.chat": [{"type": "function", "function": {"name": "delete_volume"}},
                        {"type": "function", "function": {"name": "query_a"}}],
        "openai.responses": [{"type": "function", "name": "delete_volume"},
                             {"type": "function", "name": "query_a"}],
        "anthropic.messages": [{"name": "delete_volume"}, {"name": "query_a"}],
        "bedrock.converse": [{"toolSpec": {"name": "delete_volume"}},
                             {"toolSpec": {"name": "query_a"}}],
    }
    choices = {
        "openai.chat": {"type": "function", "function": {"name": "DELETE_VOLUME"}},
        "openai.responses": {"type": "function", "name": "Delete_Volume"},
        "anthropic.messages": {"type": "tool", "name": "delete\u200b_volume"},
        "bedrock.converse": {"tool": {"name": "DELETE_volume"}},
    }
    body = json.dumps(wrap(fmt, tools[fmt.name], choices[fmt.name])).encode()
    with pytest.raises(BadRequest, match="outside this agent's tool scope"):
        fmt.restrict_tools(body, SCOPE)


def test_gemini_both_spellings_of_tool_config_are_refused() -> None:
    """`toolConfig` and `tool_config` together: which one Google reads is not ours to
    guess, so the filter must not edit one and forward the other."""
    body = {"contents": [], "tools": [{"functionDeclarations": [{"name": "delete_volume"},
                                                                {"name": "query_a"}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
            "tool_config": {"function_calling_config": {
                "mode": "ANY", "allowed_function_names": ["delete_volume"]}}}
    raw = json.dumps(body).encode()
    with pytest.raises(BadRequest):
        GEMINI.parse_request(raw, route(GEMINI))
        GEMINI.restrict_tools(raw, SCOPE)


def test_a_huge_tool_list_is_cut_quickly() -> None:
    import time

    tools = [{"type": "function", "function": {"name": f"tool_{i}"}} for i in range(20_000)]
    tools += [{"type": "function", "function": {"name": "query_ok"}}]
    body = json.dumps(wrap(CHAT, tools)).encode()
    started = time.perf_counter()
    cut = CHAT.restrict_tools(body, SCOPE)
    assert time.perf_counter() - started < 2.0
    assert isinstance(cut, Restricted) and len(cut.removed) == 20_000
    assert CHAT.parse_request(cut.body, route(CHAT)).declared_tools == ("query_ok",)


def test_a_lone_surrogate_in_the_body_does_not_break_the_re_serialisation() -> None:
    r"""JSON may carry `\ud800` (an unpaired surrogate), which Python decodes to a str
    that cannot be encoded as UTF-8. The filtered body must still be produced, with
    the surrogate escaped as the agent sent it."""
    bodies: dict[Any, bytes] = {
        CHAT: b'{"model":"m","messages":[{"role":"user","content":"x\\ud800y"}],'
              b'"tools":[{"type":"function","function":{"name":"delete_volume"}},'
              b'{"type":"function","function":{"name":"query_\\udc00a"}}]}',
        ANTHROPIC: b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":'
                   b'"x\\ud800y"}],"tools":[{"name":"delete_volume"},{"name":"query_\\udc00a"}]}',
    }
    for fmt, raw in bodies.items():
        cut = fmt.restrict_tools(raw, SCOPE)
        assert isinstance(cut, Restricted) and cut.removed == ("delete_volume",)
        again = json.loads(cut.body)
        assert again["messages"][0]["content"] == "x\ud800y"
        assert fmt.parse_request(cut.body, route(fmt)).declared_tools == ("query_\udc00a",)


# --- end to end: what the real proxy forwards --------------------------------------------


async def raw_post(stack: Stack, path: str, body: bytes, **headers: str
                   ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            stack.proxy_url + path, data=io.BytesIO(body),
            headers={"Content-Type": "application/json", "X-Tether-Agent": "db-agent",
                     **headers}) as resp:
        return resp.status, await resp.json(content_type=None)


DUPLICATE_BODIES = {
    # the first `tools` is safe, the second is what a last-wins parser would read
    "openai": ("/openai/v1/chat/completions",
               b'{"model":"m","messages":[{"role":"user","content":"hi"}],'
               b'"tools":[{"type":"function","function":{"name":"query_a"}}],'
               b'"tools":[{"type":"function","function":{"name":"delete_volume"}}]}'),
    "responses": ("/openai/v1/responses",
                  b'{"model":"m","input":"hi","tools":[{"type":"function","name":"query_a"}],'
                  b'"tools":[{"type":"function","name":"delete_volume"}]}'),
    "anthropic": ("/anthropic/v1/messages",
                  b'{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"}],'
                  b'"tools":[{"name":"query_a","input_schema":{"type":"object"}}],'
                  b'"tools":[{"name":"delete_volume","input_schema":{"type":"object"}}]}'),
    "gemini": ("/gemini/v1beta/models/gemini-x:generateContent",
               b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}],'
               b'"tools":[{"functionDeclarations":[{"name":"query_a"}]}],'
               b'"tools":[{"functionDeclarations":[{"name":"delete_volume"}]}]}'),
    # duplicates one level down: inside a tool entry
    "openai-inner": ("/openai/v1/chat/completions",
                     b'{"model":"m","messages":[{"role":"user","content":"hi"}],'
                     b'"tools":[{"type":"function","function":{"name":"query_a",'
                     b'"name":"delete_volume"}}]}'),
}


@pytest.mark.parametrize("case", sorted(DUPLICATE_BODIES))
async def test_duplicate_json_keys_are_refused_before_anything_is_forwarded(
        make_stack: MakeStack, case: str) -> None:
    fakes: dict[str, Any] = {"anthropic": FakeAnthropic(), "gemini": FakeGemini()}
    stack = await scoped(make_stack, upstreams=fakes)
    path, body = DUPLICATE_BODIES[case]
    status, error = await raw_post(stack, path, body)
    assert status == 400, error
    assert "duplicate" in json.dumps(error)
    if case == "anthropic":
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    elif case == "gemini":
        assert error["error"]["status"] == "INVALID_ARGUMENT"
    else:
        assert "message" in error["error"]
    assert stack.fake.requests == [] and fakes["anthropic"].requests == []
    assert fakes["gemini"].requests == []
    [record] = [r for r in stack.audit() if r["kind"] == "request"]
    assert record["status"] == 400 and record["agent"] == "db-agent"


async def test_smuggled_second_name_is_not_forwarded(make_stack: MakeStack) -> None:
    stack = await scoped(make_stack)
    stack.fake.push(Reply(content="ok"))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "custom", "function": {"name": "query_a"}, "custom": {"name": "delete_all"}},
        {"type": "function", "function": {"name": "query_b"}}]}).encode()
    status, _ = await raw_post(stack, "/openai/v1/chat/completions", body)
    assert status == 200
    forwarded = stack.fake.requests[-1]["tools"]
    assert forwarded == [{"type": "function", "function": {"name": "query_b"}}]
    [filtered] = [r for r in stack.audit() if r["kind"] == "tools_filtered"]
    assert "delete_all" in filtered["removed"]


@pytest.mark.parametrize("agent", ["db-agent", ""])
@pytest.mark.parametrize("stream", [False, True])
async def test_lone_surrogates_are_refused_not_a_crash(make_stack: MakeStack, agent: str,
                                                       stream: bool) -> None:
    """`"\\ud800"` in a message once made tether answer 500 (the session fingerprint
    could not be encoded), unaudited. Now: 400 in the provider's shape, audited, nothing
    forwarded, whether or not the agent's tools are filtered. An escaped pair is text."""
    stack = await scoped(make_stack, upstreams={"anthropic": FakeAnthropic()})
    flag = b"true" if stream else b"false"
    body = (b'{"model":"m","stream":' + flag + b',"messages":[{"role":"user","content":'
            b'"x\\ud800y"}],"tools":[{"type":"function","function":{"name":"delete_volume"}},'
            b'{"type":"function","function":{"name":"query_a"}}]}')
    status, error = await raw_post(stack, "/openai/v1/chat/completions", body,
                                   **{"X-Tether-Agent": agent})
    assert status == 400 and "surrogate" in error["error"]["message"], error
    status, error = await raw_post(stack, "/anthropic/v1/messages", (
        b'{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"a\\udfffb"}]}'),
        **{"X-Tether-Agent": agent})
    assert status == 400 and error["error"]["type"] == "invalid_request_error", error
    assert stack.fake.requests == [] and stack.fakes["anthropic"].requests == []  # type: ignore[attr-defined]
    records = [r for r in stack.audit() if r["kind"] == "request"]
    assert [r["status"] for r in records] == [400, 400]
    stack.fake.push(Reply(content="ok"))
    status, _ = await raw_post(stack, "/openai/v1/chat/completions", (
        b'{"model":"m","messages":[{"role":"user","content":"\\ud83d\\ude00 \\\\ud800"}]}'))
    assert status == 200  # a pair is an emoji; an escaped backslash is not a surrogate
    assert stack.fake.requests[-1]["messages"][0]["content"] == "\U0001f600 \\ud800"


async def test_tools_of_the_wrong_shape_are_refused_in_the_providers_shape(
        make_stack: MakeStack) -> None:
    stack = await scoped(make_stack, upstreams={"anthropic": FakeAnthropic()})
    cases = [
        ("/openai/v1/chat/completions", {"model": "m", "messages": [], "tools": {"a": 1}}),
        ("/openai/v1/chat/completions", {"model": "m", "messages": [], "tools": ["query_a"]}),
        ("/openai/v1/responses", {"model": "m", "input": "hi", "tools": [1]}),
        ("/anthropic/v1/messages", {"model": "c", "max_tokens": 1, "messages": [],
                                    "tools": [{"name": 7}]}),
    ]
    for path, body in cases:
        status, error = await raw_post(stack, path, json.dumps(body).encode())
        assert status == 400, (path, body, error)
    assert stack.fake.requests == []
    assert len([r for r in stack.audit() if r["kind"] == "request"]) == len(cases)


def test_huge_tool_names_are_not_kept_by_the_name_cache() -> None:
    """Every declared tool name is put in normal form (and the form was cached, 8192
    entries): a few thousand requests, each declaring one distinct name as long as the
    10 MB body allows, must not pin gigabytes. 40 names of 256 KB stand in for them."""
    import gc
    import tracemalloc

    from proxy.policy.names import normalize

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            name = f"tool_{i}_" + "x" * (256 * 1024)
            assert SCOPE(name) is False and normalize(name).startswith(f"tool_{i}_")
            del name
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2 * 1024 * 1024, f"{kept} bytes kept after the names were dropped"
    assert normalize("Delete\u200b_Volume") == "delete_volume"
