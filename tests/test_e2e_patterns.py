"""`$` is the end of the text, through a running tether: a rule's `matches` on an LLM tool
call (the official openai SDK, streamed and not, and a hand-written HTTP request), an
OpenAPI `pattern` on `/apis/` query, path and body (aiohttp and raw sockets, 3.0 and 3.1
specs) and on the tool call linked to the operation; `tether explain` and `tether check`
show the same. The clean value still passes everywhere."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai.types.chat import ChatCompletionToolParam
from yarl import URL

from proxy.demo.fake_tool_api import FakeToolApi
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_openai import MESSAGES, collect

ROOT = Path(__file__).resolve().parent.parent
VOLUMES = """
defaults: {action: deny}
rules:
  - id: temp-volumes-may-go
    description: Only temporary volumes may be deleted
    match:
      tool: delete_volume
      args: {volume_id: {matches: "^vol-temp-[0-9]+$"}}
    action: allow
"""
NEWLINE = Call("delete_volume", json.dumps({"volume_id": "vol-temp-1\n"}), id="call_nl")
CRLF = Call("delete_volume", json.dumps({"volume_id": "vol-temp-3\r\n"}), id="call_crlf")
CLEAN = Call("delete_volume", json.dumps({"volume_id": "vol-temp-2"}), id="call_ok")
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("delete_volume", "file_ticket")]
TICKET = {"type": "string", "pattern": "^T-[0-9]+$"}


def ticket_spec(version: str) -> str:
    body = {"type": "object", "required": ["ticket"], "properties": {"ticket": TICKET}}
    return json.dumps({
        "openapi": version, "info": {"title": "tickets", "version": "1"},
        "paths": {
            "/tickets": {
                "get": {"operationId": "findTicket", "responses": {}, "parameters": [
                    {"name": "ticket", "in": "query", "required": True, "schema": TICKET}]},
                "post": {"operationId": "fileTicket", "responses": {}, "requestBody": {
                    "required": True, "content": {"application/json": {"schema": body}}}},
            },
            "/tickets/{ticket}": {"get": {"operationId": "getTicket", "responses": {},
                                          "parameters": [{"name": "ticket", "in": "path",
                                                          "required": True, "schema": TICKET}]}},
        }})


async def tickets(make_stack: MakeStack, tmp_path: Path, version: str
                  ) -> tuple[Stack, FakeToolApi]:
    spec = tmp_path / f"tickets-{version}.json"
    spec.write_text(ticket_spec(version))
    fake = FakeToolApi()
    stack = await make_stack(
        policy="tools:\n  file_ticket: {api: tix.fileTicket}\n",
        extra=f"apis:\n  tix: {{url: https://tix.invalid, spec: {spec}}}\n",
        upstreams={"tix": fake})
    return stack, fake


async def raw_http(stack: Stack, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written by hand: the target goes on the wire as written."""
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(stack.proxy_url).port)
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    writer.write(f"{head} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{length}"
                 "Content-Type: application/json\r\n\r\n".encode() + body)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in top.lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            out, rest = out + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        payload = out
    return int(top.split(b" ", 2)[1]), payload


async def send(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.request(
            method, URL(stack.proxy_url + path, encoded=True), json=body) as resp:
        return resp.status, await resp.read()


def denied_calls(stack: Stack, tool: str) -> list[dict[str, Any]]:
    return [d for d in stack.decisions() if d["tool"] == tool and d["action"] == "deny"]


# --- a rule's `matches` on LLM tool calls ------------------------------------------------

async def test_a_trailing_newline_does_not_satisfy_an_allow_rule(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=VOLUMES)
    stack.fake.push(Reply(calls=(NEWLINE, CRLF, CLEAN)))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    message = r.choices[0].message
    kept = [c for c in message.tool_calls or [] if c.type == "function"]
    assert [(c.id, json.loads(c.function.arguments)) for c in kept] == [
        ("call_ok", {"volume_id": "vol-temp-2"})]
    assert (message.content or "").count("The tool call 'delete_volume' was denied") == 2
    decisions = [d for d in stack.decisions() if d["tool"] == "delete_volume"]
    # No rule matched the first two: defaults.action denied them.
    assert [(d["action"], d["rules"]) for d in decisions] == [
        ("deny", []), ("deny", []), ("allow", ["temp-volumes-may-go"])]


async def test_a_trailing_newline_in_a_stream(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=VOLUMES)
    stack.fake.push(Reply(calls=(NEWLINE, CLEAN)))
    stream = await stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, stream=True)
    text, calls, _ = await collect(stream)
    assert [json.loads(args) for _, _, args in calls.values()] == [{"volume_id": "vol-temp-2"}]
    assert "The tool call 'delete_volume' was denied by policy" in text
    assert len(denied_calls(stack, "delete_volume")) == 1


async def test_a_trailing_newline_from_a_hand_written_request(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=VOLUMES)
    stack.fake.push(Reply(calls=(NEWLINE, CLEAN)))
    body = json.dumps({"model": "m", "messages": MESSAGES, "tools": TOOLS}).encode()
    status, raw = await raw_http(stack, "POST /openai/v1/chat/completions", body)
    assert status == 200, raw
    message = json.loads(raw)["choices"][0]["message"]
    assert [c["id"] for c in message["tool_calls"]] == ["call_ok"]
    assert "The tool call 'delete_volume' was denied by policy" in message["content"]


# --- OpenAPI `pattern` on /apis/ and on linked tool calls --------------------------------

@pytest.mark.parametrize("version", ["3.0.3", "3.1.0"])
async def test_apis_refuse_a_trailing_newline_and_forward_the_clean_value(
        make_stack: MakeStack, tmp_path: Path, version: str) -> None:
    stack, fake = await tickets(make_stack, tmp_path, version)
    for method, path, body in [("GET", "/apis/tix/tickets?ticket=T-1%0A", None),
                               ("GET", "/apis/tix/tickets?ticket=T-1%0D%0A", None),
                               ("POST", "/apis/tix/tickets", {"ticket": "T-1\n"})]:
        status, raw = await send(stack, method, path, body)
        assert status == 403, (path, raw)
        error = json.loads(raw)["error"]
        assert error["rule"] == "tether:invalid-request"
        assert "does not match '^T-[0-9]+$'" in error["message"], error
    # In the path a control character is refused before any pattern is read.
    status, raw = await send(stack, "GET", "/apis/tix/tickets/T-1%0A")
    assert status == 400 and json.loads(raw)["error"]["code"] == "ambiguous_request"
    assert fake.seen == []
    for method, path, body in [("GET", "/apis/tix/tickets?ticket=T-1", None),
                               ("GET", "/apis/tix/tickets/T-1", None),
                               ("POST", "/apis/tix/tickets", {"ticket": "T-1"})]:
        status, raw = await send(stack, method, path, body)
        assert status in (200, 201), (path, raw)
    assert [(s.method, s.path, s.query) for s in fake.seen] == [
        ("GET", "/tickets", "ticket=T-1"), ("GET", "/tickets/T-1", ""), ("POST", "/tickets", "")]
    assert json.loads(fake.seen[2].body) == {"ticket": "T-1"}


@pytest.mark.parametrize("version", ["3.0.3", "3.1.0"])
async def test_apis_over_a_raw_socket(make_stack: MakeStack, tmp_path: Path,
                                      version: str) -> None:
    stack, fake = await tickets(make_stack, tmp_path, version)
    assert (await raw_http(stack, "GET /apis/tix/tickets?ticket=T-1%0a"))[0] == 403
    assert (await raw_http(stack, "GET /apis/tix/tickets?ticket=T-1%0D%0A"))[0] == 403
    status, raw = await raw_http(stack, "POST /apis/tix/tickets", b'{"ticket": "T-1\\n"}')
    assert status == 403 and b"does not match" in raw
    status, raw = await raw_http(stack, "POST /apis/tix/tickets", b'{"ticket": "T-1\\u000a"}')
    assert status == 403
    assert fake.seen == []
    assert (await raw_http(stack, "GET /apis/tix/tickets?ticket=T-1"))[0] == 200
    assert (await raw_http(stack, "POST /apis/tix/tickets", b'{"ticket": "T-1"}'))[0] == 201
    assert len(fake.seen) == 2


async def test_a_linked_tool_call_is_judged_by_the_same_pattern(
        make_stack: MakeStack, tmp_path: Path) -> None:
    stack, fake = await tickets(make_stack, tmp_path, "3.0.3")
    stack.fake.push(Reply(calls=(Call("file_ticket", '{"ticket": "T-1\\n"}', id="call_nl"),
                                 Call("file_ticket", '{"ticket": "T-1"}', id="call_ok"))))
    r = await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    message = r.choices[0].message
    assert [c.id for c in message.tool_calls or []] == ["call_ok"]
    text = message.content or ""
    assert "denied by tether:invalid-arguments" in text
    assert "argument 'ticket': 'T-1\\n' does not match '^T-[0-9]+$'" in text
    assert [d["rules"] for d in denied_calls(stack, "file_ticket")] == [
        ["tether:invalid-arguments"]]
    assert fake.seen == []


# --- the CLI shows the same ------------------------------------------------------------

def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_explain_shows_why_the_newline_does_not_match(tmp_path: Path) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text(f"audit: {{path: null}}\n{VOLUMES}")
    out = tether("explain", "--config", str(config), "--tool", "delete_volume",
                 "--args", json.dumps({"volume_id": "vol-temp-1\n"}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "decision: deny"
    assert ("no    temp-volumes-may-go: args.volume_id matches '^vol-temp-[0-9]+$' does not "
            "hold (value: 'vol-temp-1\\n')") in out.stdout
    out = tether("explain", "--config", str(config), "--tool", "delete_volume",
                 "--args", json.dumps({"volume_id": "vol-temp-1"}))
    assert out.stdout.splitlines()[0] == "decision: allow"
    assert "MATCH temp-volumes-may-go -> allow: args.volume_id matches" in out.stdout


def test_check_refuses_patterns_that_would_not_mean_what_they_say(tmp_path: Path) -> None:
    rules = tmp_path / "tether.yaml"
    rules.write_text(f"audit: {{path: null}}\n{VOLUMES.replace('+$', '+\\\\Z')}")
    out = tether("check", str(rules))
    assert out.returncode == 1
    assert (f"{rules}:9:14: error: rule temp-volumes-may-go: match.args.volume_id: bad regular "
            "expression '^vol-temp-[0-9]+\\\\Z': invalid escape sequence: \\Z (RE2 has no \\Z: "
            "$ (or \\z) is the end of the text)") in out.stderr
    spec = tmp_path / "tickets.yaml"      # JSON is YAML: one key a line, so lines are known
    spec.write_text(json.dumps(json.loads(ticket_spec("3.1.0").replace("+$", "+$(?!x)")),
                               indent=1))
    config = tmp_path / "apis.yaml"
    config.write_text(f"audit: {{path: null}}\napis:\n  tix: {{url: https://t.invalid, "
                      f"spec: {spec}}}\n")
    out = tether("check", str(config))
    assert out.returncode == 1
    assert (f"{spec}:19:8: error: /paths/~1tickets/get/parameters/0/schema/pattern: pattern "
            "'^T-[0-9]+$(?!x)': lookahead") in out.stderr
