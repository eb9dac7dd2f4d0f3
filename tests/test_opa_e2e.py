"""OPA end to end: a real tether asking the fake-but-honest OPA (real Rego, the Data
API's shape) or its embedded engine, the official openai SDK on the LLM side and
the `/apis/{name}/` reverse route on the egress side."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.demo.fake_tool_api import FakeToolApi
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.fakes.opa_server import RULES, FakeOpa
from tests.test_e2e_approvals import TOKEN, admin, pending
from tests.test_e2e_openai import MESSAGES, TOOLS

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
OPA_RULE = "opa:tether/decision"
REMOTE = "opa: {url: 'http://opa.invalid', timeout: 0.3}\n"
EMBEDDED = f"opa: {{embedded: '{RULES}', timeout: 2}}\n"
APIS = f"apis:\n  jira: {{url: https://jira.invalid, spec: '{SPECS / 'jira.yaml'}'}}\n"
POLICY = """
approvals: {keepalive: 50ms}
tools:
  get_weather: {effect: read}
rules:
  - id: no-prod-deletes
    match: {tool: delete_volume, args: {tags.env: {in: [production]}}}
    action: deny
    message: Deleting production resources is not allowed
"""
RESIZE = '{"volume_id": "vol-7", "size_gb": 50}'


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


async def remote(make_stack: MakeStack, opa: FakeOpa | None = None,
                 config: str = REMOTE) -> tuple[Stack, FakeOpa]:
    opa = opa or FakeOpa()
    stack = await make_stack(policy=POLICY, extra=config + APIS,
                             upstreams={"opa": opa, "jira": FakeToolApi()})
    return stack, opa


async def ask(stack: Stack, call: Call, agent: str = "janitor") -> tuple[str, list[str]]:
    """One non-streamed turn: the assistant's text and the names of the calls it kept."""
    stack.fake.push(Reply(content="", calls=(call,)))
    client = stack.client(default_headers={"X-Tether-Agent": agent})
    r = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    m = r.choices[0].message
    return m.content or "", [c.function.name for c in m.tool_calls or [] if c.type == "function"]


async def metric(stack: Stack, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.admin_url + "/metrics") as resp:
            text = await resp.text()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def last_rules(stack: Stack) -> list[str]:
    return list(stack.decisions()[-1]["rules"])


# --- verdicts ---------------------------------------------------------------------------

async def test_allow(make_stack: MakeStack) -> None:
    stack, opa = await remote(make_stack)
    text, kept = await ask(stack, Call("get_weather", '{"city": "Oslo"}'))
    assert kept == ["get_weather"] and text == ""
    assert OPA_RULE in last_rules(stack) and stack.decisions()[-1]["action"] == "allow"
    assert opa.paths == ["tether/decision"]
    assert opa.inputs[0]["tool"] == "get_weather" and opa.inputs[0]["effect"] == "read"
    assert await metric(stack, "tether_opa_decisions_total", '{result="allow"}') == 1


async def test_deny_with_the_policys_reason(make_stack: MakeStack) -> None:
    stack, _ = await remote(make_stack)
    text, kept = await ask(stack, Call("resize_volume", RESIZE), agent="janitor")
    assert kept == []
    assert f"was denied by {OPA_RULE}: agent janitor may not make write calls: it needs the " \
           "deployer role" in text
    record = stack.decisions()[-1]
    assert record["action"] == "deny" and record["rules"] == [OPA_RULE]
    assert await metric(stack, "tether_opa_decisions_total", '{result="deny"}') == 1


async def test_an_opa_allow_never_overrides_a_yaml_deny(make_stack: MakeStack) -> None:
    stack, _ = await remote(make_stack)
    prod = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')
    text, kept = await ask(stack, prod, agent="deployer-bot")
    assert kept == [] and "Deleting production resources is not allowed" in text
    assert last_rules(stack) == ["no-prod-deletes", OPA_RULE]   # both named, the deny won
    assert await metric(stack, "tether_opa_decisions_total", '{result="allow"}') == 1


@pytest.mark.parametrize("outcome", ["approve", "deny"])
async def test_hold_goes_to_approvals(make_stack: MakeStack, outcome: str) -> None:
    stack, _ = await remote(make_stack)
    task = asyncio.create_task(ask(stack, Call("resize_volume", '{"size_gb": 900}'),
                                   agent="deployer-bot"))
    [approval] = await pending(stack)
    assert approval["tool"] == "resize_volume" and approval["rules"] == [OPA_RULE]
    assert not task.done()
    status, _ = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/{outcome}",
                            {"by": "alice"})
    assert status == 200
    text, kept = await asyncio.wait_for(task, 10)
    assert kept == (["resize_volume"] if outcome == "approve" else [])
    assert (text == "") is (outcome == "approve")
    assert await metric(stack, "tether_opa_decisions_total", '{result="hold"}') == 1


# --- failures: every one a deny, counted and audited ----------------------------------------

FAULTS: list[tuple[str, dict[str, Any], str, str]] = [
    # (name, knobs on the fake, rule id, error reason)
    ("down", {"down": True}, "tether:opa-unavailable", "connect"),
    ("slow", {"delay": 1.0}, "tether:opa-unavailable", "timeout"),
    ("undefined", {"answer": {}}, "tether:opa-undefined", "undefined"),
    ("string-true", {"answer": {"result": "true"}}, "tether:opa-bad-result", "bad_result"),
    ("http-500", {"status": 500}, "tether:opa-unavailable", "status"),
]


@pytest.mark.parametrize(("knobs", "rule", "reason"), [f[1:] for f in FAULTS],
                         ids=[f[0] for f in FAULTS])
async def test_failures_deny(make_stack: MakeStack, knobs: dict[str, Any], rule: str,
                             reason: str) -> None:
    stack, opa = await remote(make_stack)
    for name, value in knobs.items():
        setattr(opa, name, value)
    # A read OPA would allow, by a writer: only the failure can deny it.
    for _ in range(2):   # never cached: the second call asks again
        text, kept = await ask(stack, Call("get_weather", "{}"), agent="deployer-bot")
        assert kept == [] and f"was denied by {rule}" in text and "fail closed" in text
        assert last_rules(stack) == [rule]
    assert await metric(stack, "tether_opa_errors_total", f'{{reason="{reason}"}}') == 2
    assert await metric(stack, "tether_opa_decisions_total", '{result="error"}') == 2
    assert await metric(stack, "tether_opa_cache_hits_total") == 0


async def test_connection_refused_denies(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=POLICY, extra="opa: {url: 'http://127.0.0.1:1'}\n")
    text, kept = await ask(stack, Call("get_weather", "{}"))
    assert kept == [] and "tether:opa-unavailable" in text
    assert last_rules(stack) == ["tether:opa-unavailable"]
    assert await metric(stack, "tether_opa_errors_total", '{reason="connect"}') == 1


# --- one input shape, both sides -------------------------------------------------------------

async def test_llm_and_egress_send_the_same_shape(make_stack: MakeStack) -> None:
    stack, opa = await remote(make_stack)
    await ask(stack, Call("resize_volume", RESIZE), agent="janitor")
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.proxy_url + "/apis/jira/rest/api/2/issue",
                             json={"projectKey": "OPS", "summary": "s", "issueType": "Bug"},
                             headers={"X-Tether-Agent": "janitor",
                                      "X-Tether-Session": "s-9"}) as resp:
            status, body = resp.status, await resp.json()
    assert status == 403 and body["error"]["rule"] == OPA_RULE
    assert "needs the deployer role" in body["error"]["message"]
    llm, egress = opa.inputs
    assert isinstance(llm, dict) and isinstance(egress, dict)
    assert set(llm) == set(egress) == {
        "version", "source", "agent", "claims", "session", "provider", "model", "endpoint",
        "tool", "arguments", "raw_arguments", "effect", "api", "declared_tools", "budget"}
    assert llm["source"] == "llm" and egress["source"] == "egress"
    assert llm["tool"] == "resize_volume" and llm["arguments"] == {"volume_id": "vol-7",
                                                                   "size_gb": 50}
    assert llm["provider"] == "openai" and llm["model"] == "gpt-4o" and llm["api"] is None
    assert egress["api"] == "jira.createIssue" and egress["effect"] == "write"
    assert egress["provider"] == "api:jira" and egress["session"] == "s-9"
    assert egress["arguments"] == {"projectKey": "OPS", "summary": "s", "issueType": "Bug"}
    assert llm["agent"] == egress["agent"] == "janitor"
    assert llm["version"] == egress["version"] == 1


async def test_the_budget_reaches_the_policy(make_stack: MakeStack) -> None:
    opa = FakeOpa()
    stack = await make_stack(policy=POLICY + "budgets: {session: {tokens: 100000}}\n",
                             extra=REMOTE + APIS, upstreams={"opa": opa, "jira": FakeToolApi()})
    await ask(stack, Call("get_weather", "{}"))
    budget = opa.inputs[0]["budget"]
    assert budget["limits"] == {"tokens": 100000} and budget["used"]["tokens"] > 0
    assert budget["remaining"]["tokens"] == 100000 - budget["used"]["tokens"]


# --- the cache ----------------------------------------------------------------------------

async def test_identical_inputs_are_answered_from_the_cache(make_stack: MakeStack) -> None:
    stack, opa = await remote(make_stack)

    async def get(key: str) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.proxy_url + f"/apis/jira/rest/api/2/issue/{key}",
                                headers={"X-Tether-Agent": "janitor"}) as resp:
                return resp.status

    assert await get("OPS-1") == 200
    assert await get("OPS-1") == 200
    assert len(opa.inputs) == 1                       # the second one came from the cache
    assert await metric(stack, "tether_opa_cache_hits_total") == 1
    assert await get("OPS-2") == 200
    assert len(opa.inputs) == 2                       # a different input is asked
    assert [r["rules"] for r in stack.decisions()] == [[OPA_RULE]] * 3   # all audited


# --- embedded = remote -----------------------------------------------------------------------

CASES = [
    (Call("get_weather", "{}"), "janitor"),
    (Call("resize_volume", RESIZE), "janitor"),
    (Call("resize_volume", RESIZE), "deployer-bot"),
    (Call("resize_volume", '{"size_gb": 900}'), "deployer-bot"),
    (Call("delete_volume", '{"tags": {"env": "production"}}'), "deployer-bot"),
    (Call("resize_volume", '{"size_gb": '), "deployer-bot"),   # arguments that do not parse
]


async def test_embedded_gives_the_same_verdicts_as_remote(make_stack: MakeStack) -> None:
    stacks = [(await remote(make_stack))[0], await make_stack(policy=POLICY, extra=EMBEDDED)]
    outcomes: list[list[tuple[str, list[str], str]]] = []
    for stack in stacks:
        got = []
        for call, agent in CASES:
            task = asyncio.create_task(ask(stack, call, agent))
            await asyncio.sleep(0.3)
            if not task.done():                      # held: deny it, as a human would
                [approval] = await pending(stack)
                await admin(stack, "POST", f"/v1/approvals/{approval['id']}/deny", {"by": "bob"})
            await asyncio.wait_for(task, 10)
            first = next(r for r in reversed(stack.decisions()) if r["tool"] == call.name)
            got.append((first["policy_action"], first["rules"], first["message"]))
        outcomes.append(got)
    remote_got, embedded_got = outcomes
    assert remote_got == embedded_got
    assert [o[0] for o in remote_got] == ["allow", "deny", "allow", "hold", "deny", "deny"]
