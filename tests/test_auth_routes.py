"""Agent authentication on the tool routes, end to end: `/apis/{name}/` and `/mcp/{name}`
(every method, the SSE stream and session end included) name the agent by its
credential, never forward that credential (a header or Gemini-style `?key=`), and
refuse a request without one 401 under `auth.mode: required`, nothing sent."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from proxy.demo.fake_mcp import FakeMcp
from proxy.demo.fake_tool_api import FakeToolApi
from tests.conftest import MakeStack, Stack
from tests.fakes.oidc import FakeIssuer

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
KEY = "tk-routes-static-key"
POLICY = f"""
agents:
  key-agent: {{key_sha256: [{hashlib.sha256(KEY.encode()).hexdigest()}]}}
rules:
  - id: db-agent-no-comments
    match: {{api: jira.addComment, agent: db-agent}}
    action: deny
    message: db-agent may not comment
  - id: db-agent-no-deletes
    match: {{tool: delete_volume, agent: db-agent}}
    action: deny
    message: db-agent may not delete
"""
CONFIG = (f"apis:\n  jira: {{url: https://jira.invalid, spec: {SPECS / 'jira.yaml'}}}\n"
          "mcp:\n  tools: {url: http://mcp.invalid/mcp}\n")


async def routes(make_stack: MakeStack, oidc: FakeIssuer, mode: str = "required"
                 ) -> tuple[Stack, FakeToolApi, FakeMcp]:
    jira, mcp = FakeToolApi(), FakeMcp()
    extra = CONFIG + (f"auth:\n  mode: {mode}\n  jwt: {{issuer: {oidc.issuer}, "
                      "audiences: [tether]}\n")
    stack = await make_stack(policy=POLICY, extra=extra, upstreams={"jira": jira, "tools": mcp})
    return stack, jira, mcp


async def send(stack: Stack, method: str, path: str, headers: dict[str, str],
               body: Any = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(
            method, URL(stack.proxy_url + path, encoded=True), json=body,
            headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def leaked(headers: Sequence[Mapping[str, str]], secret: str) -> list[str]:
    return [k for h in headers for k, v in h.items() if secret in v]


async def test_apis_name_the_agent_and_drop_its_credential(make_stack: MakeStack,
                                                           oidc: FakeIssuer) -> None:
    stack, jira, _ = await routes(make_stack, oidc)
    token = oidc.mint("db-agent")
    path = "/apis/jira/rest/api/2/issue/OPS-1/comment"
    status, _, _ = await send(stack, "POST", path, {"Authorization": f"Bearer {token}"},
                              {"body": "hi"})
    assert status == 403 and jira.seen == []  # db-agent may not comment
    status, _, _ = await send(stack, "GET", "/apis/jira/rest/api/2/issue/OPS-1",
                              {"Authorization": f"Bearer {token}"})
    assert status == 200
    # A Gemini-style ?key= is a credential too: consumed, stripped from the query.
    status, _, _ = await send(stack, "GET", f"/apis/jira/rest/api/2/issue/OPS-2?key={KEY}"
                              "&expand=names", {})
    assert status == 200
    assert [(s.path, s.query) for s in jira.seen] == [
        ("/rest/api/2/issue/OPS-1", ""), ("/rest/api/2/issue/OPS-2", "expand=names")]
    assert leaked([s.headers for s in jira.seen], token) == []
    got = [(d["agent"], d["api"], d["action"]) for d in stack.decisions()]
    assert got == [("db-agent", "jira.addComment", "deny"), ("db-agent", "jira.getIssue", "allow"),
                   ("key-agent", "jira.getIssue", "allow")]
    status, headers, body = await send(stack, "GET", "/apis/jira/rest/api/2/issue/OPS-1",
                                       {"X-Tether-Agent": "db-agent"})
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated"
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert len(jira.seen) == 2


def rpc(method: str, rpc_id: int = 1, **params: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}


ACCEPT = {"Accept": "application/json, text/event-stream"}


async def test_mcp_every_method_is_authenticated_and_the_credential_dropped(
        make_stack: MakeStack, oidc: FakeIssuer) -> None:
    stack, _, mcp = await routes(make_stack, oidc)
    token = oidc.mint("db-agent")
    auth = {**ACCEPT, "Authorization": f"Bearer {token}"}
    status, headers, _ = await send(stack, "POST", "/mcp/tools", auth, rpc(
        "initialize", 0, protocolVersion="2025-06-18", capabilities={},
        clientInfo={"name": "t", "version": "1"}))
    assert status == 200
    sid = headers["Mcp-Session-Id"]
    session = {"Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
    status, _, body = await send(stack, "POST", "/mcp/tools", {**auth, **session}, rpc(
        "tools/call", 2, name="delete_volume", arguments={"volume_id": "v"}))
    assert status == 200
    assert json.loads(body)["result"]["_meta"]["tether"]["rule"] == "db-agent-no-deletes"
    assert [d["agent"] for d in stack.decisions()] == ["db-agent"]
    # GET (the server's stream) and DELETE (session end) without a credential: 401.
    for method in ("GET", "DELETE"):
        before = len(mcp.http)
        status, headers, body = await send(stack, method, "/mcp/tools",
                                           {**ACCEPT, **session, "X-Tether-Agent": "db-agent"})
        assert status == 401, method
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["message"].startswith("[tether]")
        assert len(mcp.http) == before  # nothing reached the server
    refusals = [r for r in stack.audit() if r["kind"] == "request"]
    assert [(r["provider"], r["status"], r["code"]) for r in refusals] == [
        ("mcp:tools", 401, "unauthenticated")] * 2
    status, _, _ = await send(stack, "DELETE", "/mcp/tools", {**auth, **session})
    assert status in (200, 202, 204) and not mcp.sessions
    assert leaked([h for _, h in mcp.http], token) == []
    assert [m for m, _ in mcp.http] == ["POST", "DELETE"]  # the denied call never went


async def test_mcp_optional_mode_still_lets_anonymous_on(make_stack: MakeStack,
                                                         oidc: FakeIssuer) -> None:
    stack, _, mcp = await routes(make_stack, oidc, mode="optional")
    status, _, _ = await send(stack, "POST", "/mcp/tools", ACCEPT, rpc(
        "initialize", 0, protocolVersion="2025-06-18", capabilities={},
        clientInfo={"name": "t", "version": "1"}))
    assert status == 200 and len(mcp.http) == 1
