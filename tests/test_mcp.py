"""`/mcp/{name}`: MCP `tools/call` over Streamable HTTP, governed by the same rules.

The sans-IO JSON-RPC reader table-driven; then a real tether in front of the
fake MCP server, driven by the official `mcp` SDK client (JSON and SSE answers)
and by raw HTTP for what no SDK sends (malformed bodies, batches).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from yarl import URL

from proxy import config as config_mod
from proxy.demo.fake_mcp import FakeMcp
from proxy.errors import ConfigError
from proxy.policy.mcp import DENIED, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, RpcRefused, parse_body
from tests.conftest import MakeStack, Stack
from tests.test_e2e_approvals import TOKEN, admin, pending

CONFIG = "mcp:\n  tools: {url: http://mcp.invalid/mcp}\napprovals: {keepalive: 50ms}\n"
POLICY = """
rules:
  - id: no-prod-deletes
    match:
      tool: ["delete_*"]
      args: {tags.env: {in: [production, production-candidate]}}
    action: deny
    message: Deleting production resources is not allowed
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 30s
    message: Resizing needs a human
"""
PROD = {"volume_id": "vol-1", "tags": {"env": "production"}}


# ---- the sans-IO reader -------------------------------------------------------------

def _req(method: str, rpc_id: object = 1, **params: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}


@pytest.mark.parametrize(("body", "version", "code"), [
    (b"{", None, PARSE_ERROR),
    (b"\xff\xfe", None, PARSE_ERROR),
    (b"42", None, INVALID_REQUEST),
    (b"[]", None, INVALID_REQUEST),
    (b'{"id": 1, "method": "ping"}', None, INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', None, INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 7}', None, INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": []}', None, INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1}', None, INVALID_REQUEST),
    # A notification cannot be a tool call: it would run with no answer to deny.
    (b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}', None,
     INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}', None, INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": ""}}', None,
     INVALID_PARAMS),
    # Duplicate keys anywhere: the server might read the other one.
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "method": "ping"}', None,
     INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_volume",'
     b' "arguments": {"tags": {"env": "dev", "env": "production"}}}}', None, INVALID_REQUEST),
    # Batches only in 2025-03-26; one bad element refuses the batch.
    (json.dumps([_req("ping")]).encode(), "2025-06-18", INVALID_REQUEST),
    (json.dumps([_req("ping")]).encode(), "2025-11-25", INVALID_REQUEST),
    (json.dumps([_req("ping"), {"jsonrpc": "1.0"}]).encode(), "2025-03-26", INVALID_REQUEST),
])
def test_refused_bodies(body: bytes, version: str | None, code: int) -> None:
    with pytest.raises(RpcRefused) as e:
        parse_body(body, version)
    assert e.value.code == code


def test_tool_calls_are_read_and_other_messages_pass() -> None:
    batch = [_req("tools/list", "a"), {"jsonrpc": "2.0", "method": "notifications/initialized"},
             _req("tools/call", 7, name="get_weather", arguments={"city": "Oslo"}),
             {"jsonrpc": "2.0", "id": "s1", "result": {}}]
    env = parse_body(json.dumps(batch).encode(), None)    # no header: 2025-03-26, batches ok
    assert env.batch and [m.method for m in env.messages] == [
        "tools/list", "notifications/initialized", "tools/call", None]
    assert [m.rpc_id for m in env.messages] == ["a", None, 7, None]
    [call] = env.calls
    assert (call.name, call.arguments, call.id, call.problem) == (
        "get_weather", {"city": "Oslo"}, "7", None)
    [single] = parse_body(json.dumps(_req("tools/call", "x", name="t")).encode(),
                          "2025-06-18").calls
    assert single.arguments == {} and not parse_body(b'{"jsonrpc": "2.0", "id": 1, '
                                                     b'"method": "ping"}', None).batch


@pytest.mark.parametrize("arguments", [[1, 2], "x", 3, None])
def test_arguments_that_are_not_an_object_are_a_problem(arguments: object) -> None:
    [call] = parse_body(json.dumps(_req("tools/call", 1, name="t", arguments=arguments))
                        .encode(), None).calls
    assert call.arguments is None and call.problem == "params.arguments is not a JSON object"


@pytest.mark.parametrize(("text", "line", "message"), [
    ("mcp: [a]\n", 1, "must be a mapping"),
    ("mcp:\n  bad.name: {url: http://x}\n", 2, "letters, digits"),
    ("mcp:\n  t:\n    url: http://x\n    spec: a.yaml\n", 4, "unknown key"),
    ("mcp:\n  t: {api_key_env: K}\n", 2, "url is required"),
    ("mcp:\n  t:\n    url: ftp://x\n", 3, "not an http(s) endpoint"),
    ("mcp:\n  t:\n    url: http://x\n    api_key_env: 3\n", 4, "environment variable"),
])
def test_config_errors_name_file_and_line(tmp_path: Path, text: str, line: int,
                                          message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(path, env={})
    assert e.value.line == line and message in str(e.value) and str(path) in str(e.value)


def test_config_and_url_override(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("mcp:\n  my-tools: {url: 'http://a/mcp/', api_key_env: K}\n")
    server = config_mod.load(path, env={}).mcp.get("my-tools")
    assert server is not None and (server.url, server.api_key_env, server.provider) == (
        "http://a/mcp", "K", "mcp:my-tools")
    over = config_mod.load(path, env={"TETHER_UPSTREAM_MY_TOOLS": "http://b:1/x"}).mcp
    assert over.get("my-tools").url == "http://b:1/x"  # type: ignore[union-attr]


# ---- end to end ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


async def mcp_stack(make_stack: MakeStack, fake: FakeMcp) -> Stack:
    return await make_stack(policy=POLICY, extra=CONFIG, upstreams={"tools": fake})


@asynccontextmanager
async def connect(stack: Stack, session: str = "s1", agent: str = "janitor"
                  ) -> AsyncIterator[ClientSession]:
    headers = {"X-Tether-Session": session, "X-Tether-Agent": agent}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, \
            streamable_http_client(f"{stack.proxy_url}/mcp/tools", http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        yield client


def text_of(result: Any) -> str:
    [content] = result.content
    return str(content.text)


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_sdk_allowed_and_denied(make_stack: MakeStack, sse: bool) -> None:
    fake = FakeMcp(sse=sse)
    stack = await mcp_stack(make_stack, fake)
    async with connect(stack) as client:
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} >= {"get_weather", "delete_volume"}
        result = await client.call_tool("get_weather", {"city": "Oslo"})
        assert text_of(result) == 'get_weather ran with {"city": "Oslo"}'
        assert not result.is_error
        # A denial is a tool result the model reads (isError), not a protocol error.
        denied = await client.call_tool("delete_volume", PROD)
        assert denied.is_error
        assert text_of(denied) == (
            "[tether] The tool call delete_volume was denied by no-prod-deletes: Deleting "
            "production resources is not allowed. It was not run.")
        assert denied.meta is not None and denied.meta["tether"] == {
            "rule": "no-prod-deletes", "rules": ["no-prod-deletes"], "tool": "delete_volume"}
        # A dev volume is not production: allowed, passed through.
        dev = await client.call_tool("delete_volume", {"volume_id": "v2", "tags": {"env": "dev"}})
        assert "delete_volume ran with" in text_of(dev)
    assert fake.calls() == ["get_weather", "delete_volume"]
    assert all(m["params"]["arguments"]["tags"]["env"] != "production"
               for m in fake.seen if m.get("params", {}).get("name") == "delete_volume")
    methods = [m.get("method") for m in fake.seen]
    assert methods[:3] == ["initialize", "notifications/initialized", "tools/list"]
    # The session id reached the server on every request after initialize; DELETE ended it.
    assert {"GET", "DELETE"} <= {m for m, _ in fake.http} and not fake.sessions
    assert all("x-tether-session" not in {k.lower() for k in h} for _, h in fake.http)
    records = stack.decisions()
    assert [(r["tool"], r["action"], r["rules"]) for r in records] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", ["no-prod-deletes"]),
        ("delete_volume", "allow", [])]
    assert {(r["provider"], r["session"], r["agent"], r["endpoint"]) for r in records} == {
        ("mcp:tools", "s1", "janitor", "tools/call")}
    assert records[1]["arguments"] == PROD


async def test_held_call_approved_then_forwarded(make_stack: MakeStack) -> None:
    fake = FakeMcp(sse=True)
    stack = await mcp_stack(make_stack, fake)
    async with connect(stack, session="s9") as client:
        task = asyncio.create_task(client.call_tool("resize_volume", {"volume_id": "v",
                                                                      "size_gb": 50}))
        [approval] = await pending(stack)
        assert (approval["tool"], approval["provider"], approval["rules"]) == (
            "resize_volume", "mcp:tools", ["resize-needs-approval"])
        await asyncio.sleep(0.1)
        assert not task.done() and fake.calls() == []
        status, body = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                                   {"by": "alice"})
        assert status == 200 and body["state"] == "approved"
        result = await asyncio.wait_for(task, 10)
        assert text_of(result) == 'resize_volume ran with {"size_gb": 50, "volume_id": "v"}'
        # Denied by a human: a tool result the model reads, naming the rule and the
        # approver's reason; nothing forwarded.
        task = asyncio.create_task(client.call_tool("resize_volume", {"volume_id": "w",
                                                                      "size_gb": 9}))
        [approval] = await pending(stack)
        await admin(stack, "POST", f"/v1/approvals/{approval['id']}/deny",
                    {"by": "bob", "reason": "not today"})
        denied = await asyncio.wait_for(task, 10)
        assert denied.is_error and "not today" in text_of(denied)
        assert denied.meta is not None
        assert denied.meta["tether"]["rule"] == "resize-needs-approval"
    assert fake.calls() == ["resize_volume"]
    events = [(r["event"], r.get("decided_by")) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", None), ("approved", "alice"), ("created", None),
                      ("denied", "bob")]


async def post(stack: Stack, body: bytes | object, headers: dict[str, str] | None = None,
               path: str = "/mcp/tools") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(
            URL(stack.proxy_url + path, encoded=True), data=data,
            headers={"Accept": "application/json, text/event-stream",
                     "Content-Type": "application/json", **(headers or {})}) as resp:
        text = await resp.read()
        return resp.status, json.loads(text) if text else None


async def session_id(stack: Stack, version: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            stack.proxy_url + "/mcp/tools",
            json=_req("initialize", 0, protocolVersion=version, capabilities={},
                      clientInfo={"name": "t", "version": "1"}),
            headers={"Accept": "application/json, text/event-stream"}) as resp:
        assert resp.status == 200
        return resp.headers["Mcp-Session-Id"]


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", PARSE_ERROR),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"arguments": {}}},
     INVALID_PARAMS),
    ([_req("tools/call", 1, name="get_weather")], INVALID_REQUEST),   # a batch in 2025-06-18
])
async def test_malformed_refused_and_audited(make_stack: MakeStack, body: object,
                                             code: int) -> None:
    fake = FakeMcp()
    stack = await mcp_stack(make_stack, fake)
    sid = await session_id(stack, "2025-06-18")
    status, answer = await post(stack, body, {"Mcp-Session-Id": sid,
                                              "MCP-Protocol-Version": "2025-06-18"})
    assert status == 400
    assert answer["jsonrpc"] == "2.0" and answer["id"] is None
    assert answer["error"]["code"] == code and answer["error"]["message"].startswith("[tether]")
    assert fake.calls() == [] and [m["method"] for m in fake.seen] == ["initialize"]
    [record] = [r for r in stack.audit() if r["kind"] == "request"]
    assert record["provider"] == "mcp:tools" and record["status"] == 400
    assert stack.decisions() == []


async def test_denied_tool_result_shape(make_stack: MakeStack) -> None:
    fake = FakeMcp()
    stack = await mcp_stack(make_stack, fake)
    sid = await session_id(stack, "2025-06-18")
    status, answer = await post(stack, _req("tools/call", "call-7", name="delete_volume",
                                            arguments=PROD),
                                {"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"})
    assert status == 200
    assert answer == {"jsonrpc": "2.0", "id": "call-7", "result": {
        "content": [{"type": "text", "text": (
            "[tether] The tool call delete_volume was denied by no-prod-deletes: "
            "Deleting production resources is not allowed. It was not run.")}],
        "isError": True,
        "_meta": {"tether": {"rule": "no-prod-deletes", "rules": ["no-prod-deletes"],
                             "tool": "delete_volume"}}}}
    assert fake.calls() == []


async def test_sdk_sees_the_json_rpc_error_under_deny_as_error(make_stack: MakeStack) -> None:
    fake = FakeMcp()
    stack = await make_stack(policy=POLICY, extra=CONFIG.replace(
        "tools: {url:", "tools: {deny_as: error, url:"), upstreams={"tools": fake})
    async with connect(stack) as client:
        with pytest.raises(MCPError) as e:
            await client.call_tool("delete_volume", PROD)
    assert e.value.code == DENIED
    assert "Deleting production resources is not allowed" in e.value.message
    assert e.value.data["rules"] == ["no-prod-deletes"]


async def test_denied_json_rpc_error_shape(make_stack: MakeStack) -> None:
    fake = FakeMcp()
    stack = await make_stack(policy=POLICY, extra=CONFIG.replace(
        "tools: {url:", "tools: {deny_as: error, url:"), upstreams={"tools": fake})
    sid = await session_id(stack, "2025-06-18")
    status, answer = await post(stack, _req("tools/call", "call-7", name="delete_volume",
                                            arguments=PROD),
                                {"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"})
    assert status == 200
    assert answer == {"jsonrpc": "2.0", "id": "call-7", "error": {
        "code": DENIED,
        "message": "[tether] The tool call delete_volume was denied by no-prod-deletes: "
                   "Deleting production resources is not allowed. It was not run.",
        "data": {"rule": "no-prod-deletes", "rules": ["no-prod-deletes"],
                 "tool": "delete_volume"}}}
    # Arguments that are not an object: denied (and audited), not forwarded.
    status, answer = await post(stack, _req("tools/call", 8, name="get_weather", arguments=[1]),
                                {"Mcp-Session-Id": sid})
    assert status == 200 and answer["error"]["data"]["rule"] == "tether:malformed-call"
    assert fake.calls() == []


async def test_batch_with_a_denied_call_is_refused_whole(make_stack: MakeStack) -> None:
    fake = FakeMcp()
    stack = await mcp_stack(make_stack, fake)
    sid = await session_id(stack, "2025-03-26")
    headers = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-03-26"}
    batch = [_req("tools/call", 1, name="get_weather", arguments={"city": "Oslo"}),
             {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
             _req("tools/call", 2, name="delete_volume", arguments=PROD)]
    status, answer = await post(stack, batch, headers)
    assert status == 200 and [a["id"] for a in answer] == [1, 2]
    assert answer[0]["error"]["code"] == INVALID_REQUEST  # not judged bad, not forwarded
    assert answer[1]["result"]["isError"] is True
    assert answer[1]["result"]["_meta"]["tether"]["rule"] == "no-prod-deletes"
    assert fake.calls() == []
    # All allowed: forwarded unchanged, answered by the server.
    status, answer = await post(stack, [batch[0], _req("tools/list", 3)], headers)
    assert status == 200 and [a["id"] for a in answer] == [1, 3]
    assert fake.calls() == ["get_weather"]


async def test_unknown_server_and_methods(make_stack: MakeStack) -> None:
    fake = FakeMcp()
    stack = await mcp_stack(make_stack, fake)
    status, answer = await post(stack, _req("ping"), path="/mcp/nope")
    assert status == 404 and answer["error"]["code"] == INVALID_REQUEST
    async with aiohttp.ClientSession() as http, http.put(stack.proxy_url + "/mcp/tools") as r:
        assert r.status == 405
    status, _ = await post(stack, _req("ping"), path="/mcp/tools/%2e%2e/admin")
    assert status == 400
    assert fake.http == []
    assert {r["status"] for r in stack.audit() if r["kind"] == "request"} == {404, 405, 400}
