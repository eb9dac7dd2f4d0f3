"""`/apis/{name}/...` end to end: a real tether in front of a fake Jira-like tool API,
and the official openai SDK for tool calls linked to OpenAPI operations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai.types.chat import ChatCompletionToolParam
from yarl import URL

from proxy.demo.fake_tool_api import FakeToolApi, ToolReply
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_approvals import TOKEN, admin, pending
from tests.test_e2e_openai import MESSAGES, collect

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
JIRA_TOKEN = "jira-secret-of-tether"
APIS = f"""
apis:
  jira: {{url: https://jira.invalid, spec: {SPECS / 'jira.yaml'}, api_key_env: TETHER_TEST_JIRA}}
  down: {{url: "http://127.0.0.1:1", spec: {SPECS / 'volumes.yaml'}}}
"""
POLICY = """
approvals: {keepalive: 50ms}
tools:
  create_issue: {api: jira.createIssue}
  get_issue: {api: jira.getIssue}
rules:
  - id: no-issue-deletes
    match: {api: jira.deleteIssue}
    action: deny
    message: Agents never delete issues
  - id: readers-only-read
    match: {agent: reader, effect: write}
    action: deny
    message: The reader agent only reads
  - id: comments-need-approval
    match: {api: jira.addComment}
    action: hold
    timeout: 30s
    message: Comments are reviewed
"""
CREATE = {"projectKey": "OPS", "summary": "Disk full on vol-7", "issueType": "Bug"}


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_JIRA", JIRA_TOKEN)
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


@pytest.fixture
async def jira(make_stack: MakeStack) -> tuple[Stack, FakeToolApi]:
    fake = FakeToolApi()
    stack = await make_stack(policy=POLICY, extra=APIS, upstreams={"jira": fake})
    return stack, fake


async def send(stack: Stack, method: str, path: str, *, body: Any = None,
               headers: dict[str, str] | None = None, data: bytes | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    url = URL(stack.proxy_url + path, encoded=True)   # sent as written, no normalising
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, data=data, headers=headers,
                                allow_redirects=False) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def error_of(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    assert set(body["error"]) == {"message", "rule", "rules", "code"}
    return dict(body["error"])


async def test_allowed_read_is_forwarded_with_tethers_credential(
        jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    payload = json.dumps({"key": "OPS-1", "fields": {"summary": "x" * 5000}}).encode()
    fake.push(ToolReply(200, payload, headers={"X-Upstream": "yes"}, chunks=7))
    status, headers, body = await send(
        stack, "GET", "/apis/jira/rest/api/2/issue/OPS-1?fields=summary,status",
        headers={"Authorization": "Bearer agent-key", "X-Tether-Session": "s1",
                 "X-Tether-Agent": "janitor"})
    assert status == 200 and body == payload and headers["X-Upstream"] == "yes"
    [seen] = fake.seen
    assert (seen.method, seen.path, seen.query) == ("GET", "/rest/api/2/issue/OPS-1",
                                                    "fields=summary,status")
    assert seen.headers["Authorization"] == f"Bearer {JIRA_TOKEN}"
    assert not any(k.lower().startswith("x-tether-") for k in seen.headers)
    [record] = stack.decisions()
    assert record["provider"] == "api:jira" and record["tool"] == "jira.getIssue"
    assert record["api"] == "jira.getIssue" and record["effect"] == "read"
    assert record["action"] == "allow" and record["session"] == "s1"
    assert record["agent"] == "janitor"
    assert record["arguments"] == {"issueIdOrKey": "OPS-1", "fields": ["summary", "status"]}
    assert record["endpoint"] == "GET /rest/api/2/issue/OPS-1"


async def test_allowed_write_is_forwarded_with_its_body(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    status, _, body = await send(stack, "POST", "/apis/jira/rest/api/2/issue", body=CREATE)
    assert status == 201 and json.loads(body)["path"] == "/rest/api/2/issue"
    assert json.loads(fake.seen[0].body) == CREATE
    [record] = stack.decisions()
    assert record["effect"] == "write" and record["arguments"] == CREATE


async def test_write_denied_by_rule(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    status, headers, raw = await send(stack, "DELETE", "/apis/jira/rest/api/2/issue/OPS-1")
    assert status == 403 and headers["x-should-retry"] == "false"
    error = error_of(raw)
    assert error["rule"] == "no-issue-deletes" and error["code"] == "request_denied"
    assert error["message"] == ("[tether] The request DELETE /rest/api/2/issue/OPS-1 "
                                "(jira.deleteIssue) was denied by no-issue-deletes: Agents "
                                "never delete issues. It was not forwarded.")
    assert fake.seen == []
    [record] = stack.decisions()
    assert record["action"] == "deny" and record["rules"] == ["no-issue-deletes"]


async def test_effect_rules_apply_to_tool_apis(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    reader = {"X-Tether-Agent": "reader"}
    status, _, raw = await send(stack, "POST", "/apis/jira/rest/api/2/issue", body=CREATE,
                                headers=reader)
    assert status == 403 and error_of(raw)["rule"] == "readers-only-read"
    status, _, _ = await send(stack, "GET", "/apis/jira/rest/api/2/search?jql=project%3DOPS",
                              headers=reader)
    assert status == 200
    assert [s.method for s in fake.seen] == ["GET"]


@pytest.mark.parametrize(("method", "path"), [
    ("PATCH", "/apis/jira/rest/api/2/issue/OPS-1"),
    ("GET", "/apis/jira/rest/api/2/admin/users"),
    ("GET", "/apis/jira/"),
    ("GET", "/apis/jira/rest/api/2/issue/OPS-1/"),
])
async def test_unknown_operation_is_denied(jira: tuple[Stack, FakeToolApi], method: str,
                                           path: str) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, method, path)
    assert status == 403
    error = error_of(raw)
    assert error["rule"] == "tether:unknown-operation" and error["code"] == "unknown_operation"
    assert "is not an operation of the jira API" in error["message"]
    assert fake.seen == []
    [record] = stack.decisions()
    assert record["action"] == "deny" and "tether:unknown-operation" in record["rules"]
    assert record["tool"].startswith(f"jira:{method} /")


async def test_invalid_body_is_denied_with_the_list(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    body = {"projectKey": "OPS", "summary": 42, "assignee_email": "bob@example.com"}
    status, _, raw = await send(stack, "POST", "/apis/jira/rest/api/2/issue", body=body)
    assert status == 403
    error = error_of(raw)
    assert error["rule"] == "tether:invalid-request" and error["code"] == "invalid_request"
    for problem in ("unknown body property 'assignee_email'",
                    "missing required body property 'issueType'",
                    "body property 'summary' must be string, not integer"):
        assert problem in error["message"]
    assert fake.seen == []
    status, _, raw = await send(stack, "GET", "/apis/jira/rest/api/2/search?jql=x&maxResults=x1")
    assert status == 403 and "query parameter 'maxResults' must be integer" in error_of(raw)[
        "message"]
    assert fake.seen == []


@pytest.mark.parametrize("headers", [
    {"X-HTTP-Method-Override": "DELETE"},
    {"X-HTTP-Method": "delete"},
    {"X-Method-Override": "Delete"},
])
async def test_method_override_is_judged_as_the_override(
        jira: tuple[Stack, FakeToolApi], headers: dict[str, str]) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1",
                                headers=headers)
    assert status == 403 and error_of(raw)["rule"] == "no-issue-deletes"
    assert fake.seen == []
    [record] = stack.decisions()
    assert record["tool"] == "jira.deleteIssue" and record["endpoint"].startswith("DELETE ")


async def test_method_override_in_query_or_form(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1?_method=DELETE")
    assert status == 403 and error_of(raw)["rule"] == "no-issue-deletes"
    status, _, raw = await send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1",
                                data=b"_method=DELETE",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403 and error_of(raw)["rule"] == "no-issue-deletes"
    assert fake.seen == []


async def test_allowed_override_is_forwarded_as_sent(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    status, _, _ = await send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1",
                              headers={"X-HTTP-Method-Override": "GET"})
    assert status == 201
    [seen] = fake.seen
    assert seen.method == "POST" and seen.headers["X-HTTP-Method-Override"] == "GET"
    assert stack.decisions()[0]["tool"] == "jira.getIssue"


@pytest.mark.parametrize(("path", "headers"), [
    ("/apis/jira/rest/api/2/issue/OPS-1?_method=GET", {"X-HTTP-Method-Override": "DELETE"}),
    ("/apis/jira/rest/api/2/issue/OPS-1", {"X-HTTP-Method-Override": "GET",
                                           "X-HTTP-Method": "DELETE"}),
])
async def test_conflicting_overrides_are_denied(jira: tuple[Stack, FakeToolApi], path: str,
                                                headers: dict[str, str]) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, "POST", path, headers=headers)
    assert status == 403
    error = error_of(raw)
    assert error["rule"] == "tether:method-override" and error["code"] == "method_override"
    assert "method overrides disagree" in error["message"]
    assert fake.seen == []
    assert stack.decisions()[0]["action"] == "deny"


async def test_override_on_a_non_post_is_denied(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, "DELETE", "/apis/jira/rest/api/2/issue/OPS-1",
                                headers={"X-HTTP-Method-Override": "GET"})
    assert status == 403 and error_of(raw)["rule"] == "tether:method-override"
    assert fake.seen == []


@pytest.mark.parametrize("path", [
    "/apis/jira/rest/api/2/issue/%2e%2e/issue",
    "/apis/jira/rest/api/2/issue/../issue/OPS-1",
    "/apis/jira/rest/api/2/issue/OPS-1%2Fcomment",
    "/apis/jira/rest//api/2/issue/OPS-1",
    "/apis/jira/rest/api/2/iss%75e/OPS-1",
    "/apis/jira/rest/api/2/issue/OPS-1;jsessionid=x",
    "/apis/jira/rest/api/2/issue/OPS-1%00",
    "/apis/jira/rest/api/2/issue\\OPS-1",
    "/apis/jira/rest/api/2/issue/OPS-1%zz",
    "/apis/ji%72a/rest/api/2/issue/OPS-1",
    "/apis/jira/rest/api/2/search?jql=a;_method=DELETE",
    "/apis/jira/rest/api/2/search?jql=%ff",
])
async def test_ambiguous_paths_are_refused(jira: tuple[Stack, FakeToolApi], path: str) -> None:
    stack, fake = jira
    status, _, raw = await send(stack, "GET", path)
    assert status == 400
    error = error_of(raw)
    assert error["code"] == "ambiguous_request" and "ambiguous" in error["message"]
    assert fake.seen == []
    [record] = [r for r in stack.audit() if r["kind"] == "request"]
    assert record["status"] == 400 and record["code"] == "ambiguous_request"


async def test_unknown_api_and_unreachable_upstream(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, _ = jira
    status, _, raw = await send(stack, "GET", "/apis/confluence/wiki")
    assert status == 404 and "no tool API named 'confluence'" in error_of(raw)["message"]
    status, _, raw = await send(stack, "GET", "/apis/down/v1/volumes")
    assert status == 502 and "the down API could not be reached" in error_of(raw)["message"]


async def test_redirects_are_returned_not_followed(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    fake.push(ToolReply(302, b"", headers={"Location": "http://127.0.0.1:1/steal"}))
    status, headers, _ = await send(stack, "GET", "/apis/jira/rest/api/2/issue/OPS-1")
    assert status == 302 and headers["Location"] == "http://127.0.0.1:1/steal"
    assert len(fake.seen) == 1


async def test_held_write_waits_for_approval_then_is_forwarded(
        jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    comment = {"body": "Resized to 50 GB", "visibility": None}
    task = asyncio.create_task(send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1/comment",
                                    body=comment, headers={"X-Tether-Session": "s9"}))
    [approval] = await pending(stack)
    assert approval["tool"] == "jira.addComment" and approval["provider"] == "api:jira"
    assert approval["rules"] == ["comments-need-approval"]
    assert json.loads(approval["arguments"]) == {"issueIdOrKey": "OPS-1", **comment}
    await asyncio.sleep(0.1)
    assert not task.done() and fake.seen == []
    status, body = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                               {"by": "alice"})
    assert status == 200 and body["state"] == "approved"
    status, _, _ = await asyncio.wait_for(task, 10)
    assert status == 201
    [seen] = fake.seen
    assert seen.path == "/rest/api/2/issue/OPS-1/comment" and json.loads(seen.body) == comment
    events = [(r["event"], r.get("decided_by")) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", None), ("approved", "alice")]


async def test_held_write_denied_by_a_human(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    task = asyncio.create_task(send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1/comment",
                                    body={"body": "x"}))
    [approval] = await pending(stack)
    await admin(stack, "POST", f"/v1/approvals/{approval['id']}/deny",
                {"by": "carol", "reason": "not now"})
    status, _, raw = await asyncio.wait_for(task, 10)
    assert status == 403
    error = error_of(raw)
    assert error["rule"] == "comments-need-approval"
    assert "denied by carol" in error["message"] and "not now" in error["message"]
    assert fake.seen == []


async def test_agent_that_leaves_while_held_gets_nothing_run(
        jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    task = asyncio.create_task(send(stack, "POST", "/apis/jira/rest/api/2/issue/OPS-1/comment",
                                    body={"body": "x"}))
    [approval] = await pending(stack)
    task.cancel()
    for _ in range(200):
        _, body = await admin(stack, "GET", f"/v1/approvals/{approval['id']}")
        if body["state"] != "pending":
            break
        await asyncio.sleep(0.02)
    assert body["state"] == "abandoned" and "disconnected while it waited" in body["reason"]
    status, _ = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                            {"by": "late"})
    assert status == 409
    await asyncio.sleep(0.1)
    assert fake.seen == []


# --- the LLM side: tool calls linked to OpenAPI operations -----------------------------

TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("create_issue", "get_issue", "get_weather")
]
HALLUCINATED = Call("create_issue", json.dumps({**CREATE, "assignee_email": "bob@example.com"}))


async def test_hallucinated_parameter_is_denied_with_its_name(
        jira: tuple[Stack, FakeToolApi]) -> None:
    stack, fake = jira
    stack.fake.push(Reply(calls=(HALLUCINATED, Call("get_weather", '{"city": "Oslo"}'))))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    message = r.choices[0].message
    assert [c.function.name for c in message.tool_calls or [] if c.type == "function"] == [
        "get_weather"]
    text = message.content or ""
    assert "[tether] The tool call 'create_issue' was denied by tether:invalid-arguments" in text
    assert "unknown argument 'assignee_email'" in text
    assert "jira.createIssue takes: projectKey, summary, issueType" in text
    denied = [d for d in stack.decisions() if d["tool"] == "create_issue"]
    assert denied[0]["action"] == "deny" and denied[0]["api"] == "jira.createIssue"
    assert denied[0]["rules"] == ["tether:invalid-arguments"]
    assert fake.seen == []


async def test_hallucinated_parameter_in_a_stream(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, _ = jira
    stack.fake.push(Reply(content="Filing it.", calls=(
        Call("get_issue", '{"issueIdOrKey": "OPS-1", "fields": "summary"}'),)))
    stream = await stack.client().chat.completions.create(model="m", messages=MESSAGES,
                                                          tools=TOOLS, stream=True)
    text, calls, finishes = await collect(stream)
    assert calls == {} and finishes == ["stop"]
    assert "argument 'fields' must be array, not string" in text


async def test_fitting_arguments_pass_unchanged(jira: tuple[Stack, FakeToolApi]) -> None:
    stack, _ = jira
    args = '{ "projectKey": "OPS", "summary": "Disk full", "issueType": "Task" }'
    stack.fake.push(Reply(calls=(Call("create_issue", args),)))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    [call] = r.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.arguments == args
    [record] = stack.decisions()
    assert record["action"] == "allow" and record["effect"] == "write"
    assert record["api"] == "jira.createIssue"


async def test_rules_on_an_operation_reach_its_llm_tool(make_stack: MakeStack) -> None:
    """`match: {api: jira.createIssue}` judges the LLM tool linked to it, too."""
    policy = POLICY + """
  - id: no-bugs-by-agents
    match: {api: jira.createIssue, args: {issueType: {equals: Bug}}}
    action: deny
    message: Agents file tasks, not bugs
"""
    stack = await make_stack(policy=policy, extra=APIS, upstreams={"jira": FakeToolApi()})
    stack.fake.push(Reply(calls=(Call("create_issue", json.dumps(CREATE)),)))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert "denied by no-bugs-by-agents: Agents file tasks, not bugs" in (
        r.choices[0].message.content or "")
