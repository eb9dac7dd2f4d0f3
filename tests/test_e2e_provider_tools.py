"""Provider-run tools through a running tether, with the official SDKs: judged before they leave.

A server no rule allows never reaches the fake upstream (400 in the provider's shape,
audited); an allowed MCP server reaches it narrowed; function tools and allowed server
tools pass byte for byte.
"""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from yarl import URL

from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_gemini import FakeGemini
from tests.conftest import POLICY, MakeStack, Stack
from tests.fakes import Reply

GITHUB = "https://api.githubcopilot.com/mcp/"
CONFIG = f"""
provider_tools:
  mcp_servers:
    github:
      url: {GITHUB}
      tools: {{get_issue: read, list_issues: read, create_issue: write, delete_repo: write}}
agents:
  researcher: {{tools: ["get_weather", "openai:mcp:github:*"]}}
"""
RULES = POLICY + """
  - id: github-reads
    match: {tool: ["openai:mcp:github:*", "anthropic:mcp:github:*"], effect: read}
    action: allow
  - id: github-writes-held
    match: {tool: ["openai:mcp:github:*", "anthropic:mcp:github:*"], effect: write}
    action: hold
  - id: no-repo-deletes
    match: {tool: "*:mcp:github:delete_repo"}
    action: deny
    message: Deleting repositories is not allowed
"""


def mcp(**kw: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "github", "server_url": GITHUB,
            "require_approval": "never", **kw}


async def responses(stack: Stack, tools: list[Any], **headers: str) -> Any:
    client = stack.client(default_headers=headers) if headers else stack.client()
    return await client.responses.create(model="gpt-x", input="triage", tools=tools)


def refusals(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == "request"
            and r["code"] == "provider_tool_denied"]


async def test_openai_server_no_rule_allows_never_leaves(make_stack: MakeStack) -> None:
    stack = await make_stack(extra=CONFIG)
    for tool in (mcp(server_label="evil", server_url="https://evil.example/mcp"),
                 mcp(server_url="https://evil.example/mcp/"),
                 {"type": "code_interpreter", "container": {"type": "auto"}}):
        with pytest.raises(openai.BadRequestError) as e:
            await responses(stack, [tool])
        assert e.value.status_code == 400
        body = e.value.body
        assert isinstance(body, dict) and "refused" in body["message"]
    assert stack.fake.requests == []
    assert [r["message"].split(" (rules: ")[1].split(")")[0] for r in refusals(stack)] == [
        "tether:mcp-server-unlisted", "tether:mcp-server-url", "tether:provider-tool-unlisted"]
    [decision] = stack.provider_decisions()
    assert decision["tool"] == "openai:code_interpreter" and decision["action"] == "deny"


async def test_openai_streamed_request_judged_the_same(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    client = stack.client()
    denied: list[Any] = [mcp(allowed_tools=["delete_repo"])]
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="gpt-x", input="triage", stream=True, tools=denied)
    assert stack.fake.requests == []
    stack.fake.push(Reply(content="done"))
    allowed: list[Any] = [mcp(allowed_tools=["get_issue"])]
    stream = await client.responses.create(model="gpt-x", input="triage", stream=True,
                                           tools=allowed)
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert stack.fake.requests[0]["tools"][0]["allowed_tools"] == ["get_issue"]


async def test_openai_mcp_narrowed_and_holds_need_approval(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(Reply(content="done"))
    answer = await responses(stack, [mcp(), {"type": "web_search"}])
    assert answer.output_text == "done"
    [sent] = stack.fake.requests
    assert sent["tools"][0]["allowed_tools"] == ["get_issue", "list_issues", "create_issue"]
    assert sent["tools"][0]["require_approval"] == {
        "always": {"tool_names": ["create_issue"]},
        "never": {"tool_names": ["get_issue", "list_issues"]}}
    assert sent["tools"][1] == {"type": "web_search"}
    decided = {r["tool"]: (r["action"], r["rules"]) for r in stack.provider_decisions()}
    assert decided["openai:mcp:github:delete_repo"] == ("deny", ["github-writes-held",
                                                                 "no-repo-deletes"])
    assert decided["openai:mcp:github:create_issue"][0] == "hold"
    assert decided["openai:web_search"] == ("allow", ["provider-search"])
    assert any(r["kind"] == "provider_tools_narrowed" for r in stack.audit())


async def test_openai_agent_scope_by_canonical_names(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    stack.fake.push(Reply(content="done"))
    await responses(stack, [mcp(allowed_tools={"tool_names": ["list_issues", "delete_repo"]}),
                            {"type": "web_search"},
                            {"type": "function", "name": "get_weather", "parameters": {}}],
                    **{"X-Tether-Agent": "researcher"})
    [sent] = stack.fake.requests
    # web_search is outside the scope: filtered out; the MCP server is narrowed.
    assert [t["type"] for t in sent["tools"]] == ["mcp", "function"]
    assert sent["tools"][0]["allowed_tools"] == {"tool_names": ["list_issues"]}
    assert sent["tools"][0]["require_approval"] == "never"


async def test_openai_bad_mcp_input_refused(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=RULES, extra=CONFIG)
    bad: list[list[Any]] = [
        [mcp(), mcp(server_url=GITHUB + "other")],                # one label, two URLs
        [mcp(server_url="https://u:p@api.githubcopilot.com/mcp/")],
        [mcp(server_url="https://api.githubcopilot.com/mcp/%2e%2e/admin")],
        [mcp(server_url="https://api.githubcopilot.com./mcp/#x")],
        [mcp(require_approval={"never": ["get_issue"]})],
        [mcp(require_approval="sometimes")],
        [mcp(allowed_tools="get_issue")],
        [{"type": "brand_new_hosted_tool"}],
        [{"type": "mcp", "server_url": GITHUB}],                  # no label
    ]
    for tools in bad:
        with pytest.raises(openai.BadRequestError):
            await responses(stack, tools)
    assert stack.fake.requests == []


async def test_function_tools_pass_byte_for_byte(make_stack: MakeStack) -> None:
    stack = await make_stack(extra=CONFIG)
    stack.fake.push(Reply(content="ok"))
    raw = b'{"model":"gpt-x", "input":"hi","tools":[{"type":"function","name":"get_weather",' \
          b'"parameters":{}}, {"type":"web_search_preview"}]}'
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.base_url + "/responses", data=io.BytesIO(raw), headers={
                "Content-Type": "application/json", "Authorization": "Bearer k"}) as resp:
            assert resp.status == 200
    assert stack.fake.requests == [json.loads(raw)]


# --- Anthropic ---------------------------------------------------------------------------


async def anthropic_stack(make_stack: MakeStack, policy: str = RULES
                          ) -> tuple[Stack, FakeAnthropic, anthropic.AsyncAnthropic]:
    fake = FakeAnthropic()
    stack = await make_stack(policy=policy, upstreams={"anthropic": fake}, extra=CONFIG)
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    return stack, fake, client


async def test_anthropic_mcp_server_refused_or_narrowed(make_stack: MakeStack) -> None:
    stack, fake, client = await anthropic_stack(make_stack)
    async with client:
        with pytest.raises(anthropic.BadRequestError) as e:
            await client.beta.messages.create(
                model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
                mcp_servers=[{"type": "url", "name": "gitlab", "url": "https://gitlab.example/mcp"}],
                betas=["mcp-client-2025-04-04"])
        assert e.value.status_code == 400
        assert isinstance(e.value.body, dict) and e.value.body["type"] == "error"
        assert "tether:mcp-server-unlisted" in e.value.body["error"]["message"]
        assert fake.requests == []
        fake.push(Reply(content="done"))
        await client.beta.messages.create(
            model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
            mcp_servers=[{"type": "url", "name": "github", "url": GITHUB}],
            betas=["mcp-client-2025-04-04"])
        [sent] = fake.requests
        # The connector has no approval step: the held create_issue is left out.
        assert sent["mcp_servers"][0]["tool_configuration"] == {
            "allowed_tools": ["get_issue", "list_issues"]}
        fake.push(Reply(content="done"))
        await client.beta.messages.create(
            model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
            mcp_servers=[{"type": "url", "name": "github", "url": GITHUB}],
            tools=[{"type": "mcp_toolset", "mcp_server_name": "github"}],
            betas=["mcp-client-2025-11-20"])
        toolset = fake.requests[-1]["tools"][0]
        assert toolset["default_config"] == {"enabled": False}
        assert toolset["configs"] == {"get_issue": {"enabled": True},
                                      "list_issues": {"enabled": True}}
    assert len(refusals(stack)) == 1


async def test_anthropic_server_tools_judged(make_stack: MakeStack) -> None:
    stack, fake, client = await anthropic_stack(make_stack)
    async with client:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(
                model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}])
        assert fake.requests == []
        fake.push(Reply(content="done"))
        await client.messages.create(
            model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}])
        assert fake.requests[0]["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]
    assert [r["tool"] for r in stack.provider_decisions()] == ["anthropic:web_fetch",
                                                               "anthropic:web_search"]


# --- Gemini ------------------------------------------------------------------------------


async def test_gemini_built_in_tools_judged(make_stack: MakeStack) -> None:
    fake = FakeGemini()
    stack = await make_stack(upstreams={"gemini": fake})
    path = "/gemini/v1beta/models/gemini-x:generateContent"

    async def post(tools: list[Any]) -> int:
        body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                           "tools": tools}).encode()
        async with aiohttp.ClientSession() as http:
            async with http.post(URL(stack.proxy_url + path, encoded=True), data=body, headers={
                    "Content-Type": "application/json", "x-goog-api-key": "k"}) as resp:
                if resp.status == 400:
                    error = (await resp.json())["error"]
                    assert "gemini:code_execution" in error["message"]
                return resp.status

    assert await post([{"codeExecution": {}}]) == 400
    assert fake.requests == []
    assert await post([{"googleSearch": {}}]) == 200
    assert fake.requests[0]["tools"] == [{"googleSearch": {}}]
