"""The OpenAI Agents SDK with an MCP server behind tether: the model calls a tool that tether
denies on the MCP route; the SDK hands the model the denial as the tool's result (`isError`
with the rule and its message), not its generic "An error occurred while running the tool",
so the model's answer can name the rule. The model is the fake OpenAI upstream, reached
through tether's LLM route as another agent the rule does not cover."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI

from proxy.demo.fake_mcp import FakeMcp
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply

agents = pytest.importorskip("agents")
agents_mcp = pytest.importorskip("agents.mcp")

CONFIG = "mcp:\n  tools: {url: http://mcp.invalid/mcp}\n"
POLICY = """
rules:
  - id: mcp-no-prod-deletes
    description: the janitor's MCP session may not delete production volumes
    match:
      tool: delete_volume
      agent: janitor
      args: {tags.env: {in: [production]}}
    action: deny
    message: Deleting production resources is not allowed
"""
PROD = {"volume_id": "vol-1", "tags": {"env": "production"}}


def model(body: dict[str, Any]) -> Reply:
    """Calls delete_volume, then repeats what the tool said."""
    outputs = [i for i in body.get("input") or [] if isinstance(i, dict)
               and i.get("type") == "function_call_output"]
    if outputs:
        return Reply(content=f"The tool said: {outputs[-1]['output']}")
    return Reply(calls=(Call("delete_volume", json.dumps(PROD), id="call_1"),))


async def run(make_stack: MakeStack, config: str) -> tuple[Stack, FakeMcp, str]:
    agents.set_tracing_disabled(True)
    mcp = FakeMcp()
    stack = await make_stack(policy=POLICY, extra=config, fake=FakeOpenAI(script=model),
                             upstreams={"tools": mcp})
    client = AsyncOpenAI(base_url=stack.base_url, api_key="sk-agent", max_retries=0,
                         default_headers={"X-Tether-Agent": "planner"})
    server = agents_mcp.MCPServerStreamableHttp(params={
        "url": f"{stack.proxy_url}/mcp/tools",
        "headers": {"X-Tether-Agent": "janitor", "X-Tether-Session": "s1"}})
    try:
        async with server:
            agent = agents.Agent(name="janitor", instructions="Clean up.", mcp_servers=[server],
                                 model=agents.OpenAIResponsesModel("gpt-x", client))
            result = await agents.Runner.run(agent, "clean up vol-1")
    finally:
        await client.close()
    return stack, mcp, str(result.final_output)


async def test_the_model_reads_the_denying_rule(make_stack: MakeStack) -> None:
    stack, mcp, said = await run(make_stack, CONFIG)
    assert "mcp-no-prod-deletes" in said
    assert "Deleting production resources is not allowed" in said
    assert "An error occurred while running the tool" not in said
    assert mcp.calls() == []  # never forwarded
    [denied] = [r for r in stack.decisions() if r["provider"] == "mcp:tools"]
    assert (denied["tool"], denied["action"], denied["rules"]) == (
        "delete_volume", "deny", ["mcp-no-prod-deletes"])


async def test_under_deny_as_error_the_sdk_hides_why(make_stack: MakeStack) -> None:
    """The JSON-RPC error, still a setting: the SDK keeps its text from the model."""
    _, mcp, said = await run(make_stack, CONFIG.replace("{url:", "{deny_as: error, url:"))
    assert "mcp-no-prod-deletes" not in said and mcp.calls() == []
