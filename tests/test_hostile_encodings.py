"""Hostile encodings on every front end: lone UTF-16 surrogates, overlong UTF-8 and NUL.

One table of payloads (the bytes inside a JSON string, or a form value), sent
through a running tether to each front end: the LLM routes (raw sockets for the
bytes no SDK sends, to OpenAI, Anthropic and Gemini; the openai and anthropic SDKs
for what a model returns), `/apis/`, MCP (raw HTTP, and the mcp SDK for what must
still pass), the forward proxy (HTTPS through it with `requests`, to OpenAI, a tool
API and EC2; raw sockets), transparent mode (network namespaces and curl, as
tests/test_transparent.py) and the admin port's approvals. Every case ends with an
answer in the caller's own protocol (a refusal, or a correct governed answer where
the input is legitimately text), an audit record, the audit chain still verifying
(`tether audit verify`), and `/readyz` still 200 with no audit write error: before
the fix, the lone surrogates left no record and took the pod out of its Service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
import requests
from aiohttp import web
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from proxy.audit.chain import verify_targets
from proxy.demo.fake_anthropic import Call as AnthropicCall
from proxy.demo.fake_anthropic import FakeAnthropic
from proxy.demo.fake_anthropic import Reply as AnthropicReply
from proxy.demo.fake_gemini import FakeGemini
from proxy.demo.fake_mcp import FakeMcp
from proxy.demo.fake_tool_api import FakeToolApi
from proxy.egress import Egress
from proxy.forward.ca import export_pem
from proxy.forward.master import ForwardProxy, start_forward
from proxy.forward.targets import Address
from proxy.policy.engine import MALFORMED
from proxy.policy.mcp import INVALID_PARAMS, PARSE_ERROR
from proxy.server.app import bound_port
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, RawReply, Reply
from tests.fakes.tls import make_fake_ca
from tests.test_e2e_approvals import TOKEN, admin, pending
from tests.test_forward_egress import EC2, JIRA, FakeUpstream
from tests.test_transparent import (
    REDIRECT,
    ROOT,
    TPORT,
    Pod,
    free_subnet,
    in_ns,
    preconditions,
    run,
    setup_netns,
    start,
    teardown,
)

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
MODEL = "claude-test"


# -- the table -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Payload:
    """`raw`: the bytes placed inside a JSON string literal, as they go on the wire.
    `form`: the same as a percent-encoded form value (None: a form cannot say it).
    `text`: what a JSON reader makes of it when it is text (None: it is not text, so
    every front end refuses it)."""

    name: str
    raw: bytes
    form: str | None
    text: str | None


PAYLOADS = [
    Payload("lone-surrogate-escape", rb"a\ud800b", None, None),
    Payload("lone-low-surrogate-escape", rb"\udc00", None, None),
    Payload("surrogate-as-utf8", b"\xed\xa0\x80", "%ED%A0%80", None),
    Payload("overlong-utf8", b"\xc0\xaf", "%C0%AF", None),
    Payload("truncated-utf8", b"\xe2\x82", "%E2%82", None),
    Payload("raw-nul", b"a\x00b", None, None),
    # What must still pass: NUL escaped in JSON is text, and so is an escaped pair.
    Payload("nul-escape", rb"a\u0000b", "a%00b", "a\x00b"),
    Payload("surrogate-pair-escape", rb"\ud83d\ude00", "%F0%9F%98%80", "\U0001f600"),
]
IDS = [p.name for p in PAYLOADS]

# What each front end answers a payload that is not text: (status, error code in the
# protocol's own shape). Bodies that are not UTF-8 fail to parse; JSON that parses to a
# lone surrogate is refused as what it is.
LLM_REFUSAL = (400, "invalid_request")
APIS_REFUSAL = {  # /apis/ and the forward proxy to an `apis:` host share the shape
    "lone-surrogate-escape": (400, "ambiguous_request"),
    "lone-low-surrogate-escape": (400, "ambiguous_request"),
    "surrogate-as-utf8": (403, "invalid_request"),    # not UTF-8: "the body is not valid JSON"
    "overlong-utf8": (403, "invalid_request"),
    "truncated-utf8": (403, "invalid_request"),
    "raw-nul": (403, "invalid_request"),
}
MCP_REFUSAL = {
    "lone-surrogate-escape": INVALID_PARAMS,
    "lone-low-surrogate-escape": INVALID_PARAMS,
    "surrogate-as-utf8": PARSE_ERROR,
    "overlong-utf8": PARSE_ERROR,
    "truncated-utf8": PARSE_ERROR,
    "raw-nul": PARSE_ERROR,
}


def in_json(payload: Payload, template: bytes) -> bytes:
    """`template` with `@@` replaced by the payload's bytes (inside a JSON string)."""
    assert template.count(b"@@") == 1
    return template.replace(b"@@", payload.raw)


# -- after every case ------------------------------------------------------------------------

async def healthy(stack: Stack) -> None:
    """/readyz 200, no audit write error, and the chain on disk verifies."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.admin_url}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{stack.admin_url}/metrics") as resp:
            metrics = await resp.text()
    assert "tether_audit_write_errors_total 0.0" in metrics
    assert verify_targets([str(stack.audit_path)]) == []


def records(stack: Stack, kind: str) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == kind]


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange over a plain socket: the bytes go exactly as written."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2:]
    return out


def post_bytes(path: str, body: bytes, host: str = "127.0.0.1", **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def proxy_port(stack: Stack) -> int:
    return int(stack.proxy_url.rsplit(":", 1)[1])


# -- LLM routes: the agent's request ---------------------------------------------------------

CHAT = b'{"model": "gpt-x", "messages": [{"role": "user", "content": "@@"}]}'
MESSAGES_BODY = (b'{"model": "claude-test", "max_tokens": 64, '
                 b'"messages": [{"role": "user", "content": "@@"}]}')
GEMINI_BODY = b'{"contents": [{"role": "user", "parts": [{"text": "@@"}]}]}'


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
async def test_llm_request_bodies(make_stack: MakeStack, payload: Payload) -> None:
    fake_anthropic, fake_gemini = FakeAnthropic(), FakeGemini()
    stack = await make_stack(upstreams={"anthropic": fake_anthropic, "gemini": fake_gemini})
    chat = await raw_http(proxy_port(stack), post_bytes("/openai/v1/chat/completions",
                                                        in_json(payload, CHAT)))
    messages = await raw_http(proxy_port(stack), post_bytes(
        "/anthropic/v1/messages", in_json(payload, MESSAGES_BODY), x_api_key="k",
        anthropic_version="2023-06-01"))
    gemini = await raw_http(proxy_port(stack), post_bytes(
        "/gemini/v1beta/models/gemini-x:generateContent", in_json(payload, GEMINI_BODY),
        x_goog_api_key="k"))
    if payload.text is None:
        status, body = chat[0], json.loads(chat[2])
        assert (status, body["error"]["code"]) == LLM_REFUSAL, body
        assert body["error"]["type"] == "invalid_request_error"
        status, body = messages[0], json.loads(messages[2])
        assert status == 400 and body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error"
        status, body = gemini[0], json.loads(gemini[2])
        assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT", body
        assert (stack.fake.requests, fake_anthropic.requests, fake_gemini.requests) == ([], [], [])
        refused = records(stack, "request")
        assert [(r["provider"], r["status"]) for r in refused] == [
            ("openai", 400), ("anthropic", 400), ("gemini", 400)]
    else:  # text: forwarded as sent, answered by the upstream
        assert (chat[0], messages[0], gemini[0]) == (200, 200, 200), (chat, messages, gemini)
        assert stack.fake.requests[0]["messages"][0]["content"] == payload.text
        assert fake_anthropic.requests[0]["messages"][0]["content"] == payload.text
        assert fake_gemini.requests[0]["contents"][0]["parts"][0]["text"] == payload.text
        assert records(stack, "request") == []
    await healthy(stack)


async def test_an_llm_request_in_utf16_with_a_lone_surrogate_is_refused(
        stack: Stack) -> None:
    """json.loads reads UTF-16 and UTF-32 bodies too (and a lone surrogate code unit in
    them): the refusal looks where the parser does."""
    for body in ('{"model": "gpt-x", "messages": [{"role": "user", "content": "\\ud800"}]}'
                 .encode("utf-16-le"),
                 '{"model": "gpt-x", "messages": [{"role": "user", "content": "\ud800"}]}'
                 .encode("utf-16-be", "surrogatepass")):
        status, _, raw = await raw_http(proxy_port(stack), post_bytes(
            "/openai/v1/chat/completions", body))
        assert status == 400 and "surrogate" in json.loads(raw)["error"]["message"]
    assert stack.fake.requests == []
    assert len(records(stack, "request")) == 2
    await healthy(stack)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16", "utf-32-le", "utf-32",
                                      "utf-8-sig"])
async def test_an_llm_request_not_in_utf8_is_refused(stack: Stack, encoding: str) -> None:
    """A body Python's parser reads (it sniffs UTF-16 and UTF-32) but a provider may read
    otherwise is refused, not forwarded as sent, and so is UTF-8 behind a byte order mark
    (RFC 8259 forbids it; the parser skips it, a provider may not); plain UTF-8 is governed."""
    text = ('{"model": "gpt-x", "messages": [{"role": "user", "content": "clean up"}], '
            '"tools": [{"type": "function", "function": {"name": "get_weather"}}]}')
    status, _, raw = await raw_http(proxy_port(stack), post_bytes(
        "/openai/v1/chat/completions", text.encode(encoding)))
    assert status == 400 and "not UTF-8" in json.loads(raw)["error"]["message"]
    assert stack.fake.requests == []
    assert len(records(stack, "request")) == 1
    status, _, raw = await raw_http(proxy_port(stack), post_bytes(
        "/openai/v1/chat/completions", text.encode()))
    assert status == 200, raw
    assert len(stack.fake.requests) == 1
    await healthy(stack)


# -- LLM routes: what the model returns -------------------------------------------------------

WEATHER = '{"city": "Oslo"}'
# A model's argument text that escapes half a pair, or (once the outer JSON is read)
# holds the surrogate itself.
MODEL_ARGS = {"escaped": '{"volume_id": "v\\ud800"}', "decoded": '{"volume_id": "v\ud800"}'}


def denied_malformed(stack: Stack, args: str) -> None:
    """Two decisions: the weather call allowed, the hostile one denied as malformed, its
    argument text recorded exactly as the model wrote it."""
    decisions = stack.decisions()
    assert [(d["tool"], d["action"]) for d in decisions] == [
        ("get_weather", "allow"), ("delete_volume", "deny")]
    bad = decisions[1]
    assert bad["rules"] == [MALFORMED] and "surrogate" in bad["message"]
    assert bad["arguments"] == args


@pytest.mark.parametrize("spelling", MODEL_ARGS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_chat_tool_arguments_with_a_lone_surrogate(stack: Stack, stream: bool,
                                                         spelling: str) -> None:
    args = MODEL_ARGS[spelling]
    stack.fake.push(Reply(content="Cleaning \ud800 up.", calls=(
        Call("get_weather", WEATHER), Call("delete_volume", args))))
    tools: Any = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                  for n in ("get_weather", "delete_volume")]
    client = stack.client()
    kw: Any = {"model": "gpt-x", "messages": [{"role": "user", "content": "go"}], "tools": tools}
    if stream:
        text, names = "", []
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                names += [tc.function.name for tc in choice.delta.tool_calls or []
                          if tc.function is not None and tc.function.name]
    else:
        r = await client.chat.completions.create(**kw)
        text = r.choices[0].message.content or ""
        names = [c.function.name for c in r.choices[0].message.tool_calls or []
                 if c.type == "function"]
    assert names == ["get_weather"]                  # the other call is kept
    assert text.startswith("Cleaning \ud800 up.")    # the model's text, as the model wrote it
    assert MALFORMED in text and "delete_volume" in text
    denied_malformed(stack, args)
    await healthy(stack)


@pytest.mark.parametrize("spelling", MODEL_ARGS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_responses_tool_arguments_with_a_lone_surrogate(stack: Stack, stream: bool,
                                                              spelling: str) -> None:
    args = MODEL_ARGS[spelling]
    stack.fake.push(Reply(calls=(Call("get_weather", WEATHER), Call("delete_volume", args))))
    tools: Any = [{"type": "function", "name": n, "parameters": {"type": "object"},
                   "strict": False} for n in ("get_weather", "delete_volume")]
    client = stack.client()
    kw: Any = {"model": "gpt-x", "input": "go", "tools": tools}
    if stream:
        done = [e for e in [e async for e in await client.responses.create(stream=True, **kw)]
                if e.type == "response.completed"]
        output = done[0].response.output
    else:
        output = (await client.responses.create(**kw)).output
    assert [i.name for i in output if i.type == "function_call"] == ["get_weather"]
    shown = json.dumps([i.to_dict() for i in output if i.type == "message"])
    assert MALFORMED in shown
    denied_malformed(stack, args)
    await healthy(stack)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_messages_tool_input_with_a_lone_surrogate(make_stack: MakeStack,
                                                         stream: bool) -> None:
    fake = FakeAnthropic()
    stack = await make_stack(upstreams={"anthropic": fake})
    args = MODEL_ARGS["escaped"]  # the fake splices this text in as the input object
    fake.push(AnthropicReply(calls=(AnthropicCall("get_weather", WEATHER),
                                    AnthropicCall("delete_volume", args))))
    client = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0)
    kw: Any = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "go"}],
               "tools": [{"name": n, "input_schema": {"type": "object"}}
                         for n in ("get_weather", "delete_volume")]}
    try:
        if stream:
            async with client.messages.stream(**kw) as s:
                message = await s.get_final_message()
        else:
            message = await client.messages.create(**kw)
    finally:
        await client.close()
    assert [b.name for b in message.content if b.type == "tool_use"] == ["get_weather"]
    assert MALFORMED in "".join(b.text for b in message.content if b.type == "text")
    decisions = stack.decisions()
    assert [(d["tool"], d["action"], d["rules"]) for d in decisions] == [
        ("get_weather", "allow", []), ("delete_volume", "deny", [MALFORMED])]
    assert json.loads(decisions[1]["arguments"]) == {"volume_id": "v\ud800"}
    await healthy(stack)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_model_answer_that_is_not_utf8_is_refused_as_unreadable(stack: Stack,
                                                                         stream: bool) -> None:
    """Overlong UTF-8 from the upstream: tether cannot read the answer, so it releases
    nothing of it: a 502 in OpenAI's shape (whole) or an error event (stream), audited."""
    text = b'"content": "bad \xc0\xaf", "tool_calls": []'
    if stream:
        chunk = (b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, '
                 b'"model": "m", "choices": [{"index": 0, "delta": {' + text + b'}, '
                 b'"finish_reason": null}]}\n\n')
        stack.fake.push(RawReply(content_type="text/event-stream", chunks=(chunk,)))
    else:
        body = (b'{"id": "c", "object": "chat.completion", "created": 0, "model": "m", '
                b'"choices": [{"index": 0, "message": {"role": "assistant", ' + text + b'}, '
                b'"finish_reason": "stop"}]}')
        stack.fake.push(RawReply(chunks=(body,)))
    kw: Any = {"model": "gpt-x", "messages": [{"role": "user", "content": "go"}]}
    with pytest.raises(openai.APIError) as e:
        if stream:
            async for _ in await stack.client().chat.completions.create(stream=True, **kw):
                pass
        else:
            await stack.client().chat.completions.create(**kw)
    assert "UTF-8" in str(e.value) or "utf-8" in str(e.value), e.value
    [refused] = records(stack, "request")
    assert (refused["status"], refused["code"]) == (
        (200, "stream_error") if stream else (502, "bad_upstream_response"))
    await healthy(stack)


HOLD = """
rules:
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 30s
"""


async def test_an_approver_name_with_a_lone_surrogate_is_recorded(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin port takes JSON too: an approval decided `by` a name that is not text is
    recorded, listed and sent to the agent like any other."""
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    stack = await make_stack(policy=HOLD)
    stack.fake.push(Reply(calls=(Call("resize_volume", '{"size_gb": 50}'),)))
    task = asyncio.create_task(stack.client().chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "go"}],
        tools=[{"type": "function", "function": {"name": "resize_volume"}}]))
    [approval] = await pending(stack)
    status, body = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                               {"by": "ops-\ud800", "reason": "fine \udfff"})
    assert status == 200 and body["decided_by"] == "ops-\ud800"
    answer = await asyncio.wait_for(task, 10)
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []
            if c.type == "function"] == ["resize_volume"]
    status, listed = await admin(stack, "GET", "/v1/approvals")
    assert status == 200 and listed["recent"][0]["reason"] == "fine \udfff"
    approved = [r for r in records(stack, "approval") if r["event"] == "approved"]
    assert [r["decided_by"] for r in approved] == ["ops-\ud800"]
    await healthy(stack)


# -- /apis/ ----------------------------------------------------------------------------------

APIS = f"apis:\n  jira: {{url: https://jira.invalid, spec: {SPECS / 'jira.yaml'}}}\n"
ISSUE = b'{"projectKey": "OPS", "summary": "@@", "issueType": "Bug"}'


def tool_api_error(status: int, raw: bytes, expected: tuple[int, str]) -> dict[str, Any]:
    """The `/apis/` refusal shape: {"error": {"message", "rule", "rules", "code"}}."""
    body = json.loads(raw)
    assert set(body["error"]) == {"message", "rule", "rules", "code"}, body
    assert (status, body["error"]["code"]) == expected, body
    return dict(body["error"])


def judged(stack: Stack, payload: Payload, provider: str) -> None:
    """The audit of one judged tool-API request: a refusal (kind request, 400) or a
    decision (403 deny, or an allow of the text)."""
    if payload.text is not None:
        [decision] = stack.decisions()
        assert decision["action"] == "allow" and decision["provider"] == provider
        assert decision["arguments"]["summary"] == payload.text
        return
    status = APIS_REFUSAL[payload.name][0]
    if status == 400:
        [refused] = records(stack, "request")
        assert (refused["provider"], refused["status"]) == (provider, 400)
        assert "surrogate" in refused["message"] and stack.decisions() == []
    else:
        [decision] = stack.decisions()
        assert decision["action"] == "deny" and decision["rules"] == ["tether:invalid-request"]


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
async def test_apis_bodies(make_stack: MakeStack, payload: Payload) -> None:
    fake = FakeToolApi()
    stack = await make_stack(policy="", extra=APIS, upstreams={"jira": fake})
    status, _, raw = await raw_http(proxy_port(stack), post_bytes(
        "/apis/jira/rest/api/2/issue", in_json(payload, ISSUE)))
    if payload.text is None:
        tool_api_error(status, raw, APIS_REFUSAL[payload.name])
        assert fake.seen == []
    else:
        assert status == 201, raw
        [seen] = fake.seen
        assert seen.body == in_json(payload, ISSUE)  # forwarded byte for byte
    judged(stack, payload, "api:jira")
    await healthy(stack)


async def test_apis_identity_headers_that_are_not_utf8(make_stack: MakeStack) -> None:
    """aiohttp decodes header bytes that are not UTF-8 with `surrogateescape`, so a
    session or agent header can hold lone surrogates too; they are recorded (escaped),
    and budgets and the audit chain take them. (Such bytes in the path are refused by
    aiohttp's own parser, 400, before tether sees the request.)"""
    fake = FakeToolApi()
    stack = await make_stack(policy="", extra=APIS + "budgets: {session: {tokens: 1000}}\n",
                             upstreams={"jira": fake})
    body = in_json(PAYLOADS[-1], ISSUE)
    request = (b"POST /apis/jira/rest/api/2/issue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nX-Tether-Session: s-\xc0\xaf\r\n"
               b"X-Tether-Agent: a-\xed\xa0\x80\r\nConnection: close\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, _, raw = await raw_http(proxy_port(stack), request)
    assert status == 201, raw
    [decision] = stack.decisions()
    assert (decision["session"], decision["agent"]) == ("s-\udcc0\udcaf", "a-\udced\udca0\udc80")
    line = stack.audit_path.read_bytes().splitlines()[-1]
    assert b'"session":"s-\\udcc0\\udcaf"' in line  # the escape, in valid UTF-8
    status, _, _ = await raw_http(proxy_port(stack), request.replace(
        b"POST /apis/jira/rest/api/2/issue", b"POST /apis/jira/rest/api/2/issue\xc0\xaf"))
    assert status == 400 and len(fake.seen) == 1
    await healthy(stack)


# -- MCP -------------------------------------------------------------------------------------

MCP = "mcp:\n  tools: {url: http://mcp.invalid/mcp}\n"
TOOLS_CALL = (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", '
              b'"params": {"name": "get_weather", "arguments": {"city": "@@"}}}')


async def mcp_session(stack: Stack) -> str:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}
    async with aiohttp.ClientSession() as http, http.post(
            stack.proxy_url + "/mcp/tools", json=init,
            headers={"Accept": "application/json, text/event-stream"}) as resp:
        assert resp.status == 200
        return resp.headers["Mcp-Session-Id"]


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
async def test_mcp_tools_call_bodies(make_stack: MakeStack, payload: Payload) -> None:
    fake = FakeMcp()
    stack = await make_stack(policy="", extra=MCP, upstreams={"tools": fake})
    sid = await mcp_session(stack)
    status, headers, raw = await raw_http(proxy_port(stack), post_bytes(
        "/mcp/tools", in_json(payload, TOOLS_CALL), accept="application/json, text/event-stream",
        mcp_session_id=sid, mcp_protocol_version="2025-06-18"))
    answer = json.loads(raw)
    assert answer["jsonrpc"] == "2.0"
    if payload.text is None:
        assert status == 400 and answer["error"]["code"] == MCP_REFUSAL[payload.name], answer
        assert answer["error"]["message"].startswith("[tether]")
        assert fake.calls() == []
        [refused] = records(stack, "request")
        assert (refused["provider"], refused["status"]) == ("mcp:tools", 400)
        assert stack.decisions() == []
    else:
        assert status == 200 and answer["id"] == 7 and "result" in answer, answer
        assert fake.calls() == ["get_weather"]
        [decision] = stack.decisions()
        assert decision["action"] == "allow" and decision["arguments"] == {"city": payload.text}
    await healthy(stack)


async def test_mcp_sdk_still_sends_nul_and_astral_text(make_stack: MakeStack) -> None:
    """The negative side through the official SDK: text that merely looks odd passes."""
    fake = FakeMcp(sse=True)
    stack = await make_stack(policy="", extra=MCP, upstreams={"tools": fake})
    async with httpx2.AsyncClient(timeout=30) as http, \
            streamable_http_client(f"{stack.proxy_url}/mcp/tools", http_client=http) as (r, w), \
            ClientSession(r, w) as client:
        await client.initialize()
        for city in ("a\x00b", "\U0001f600", "Zürich\u200b"):
            result = await client.call_tool("get_weather", {"city": city})
            assert not result.is_error
    assert [d["arguments"]["city"] for d in stack.decisions()] == [
        "a\x00b", "\U0001f600", "Zürich\u200b"]
    await healthy(stack)


# -- the forward proxy -----------------------------------------------------------------------

@dataclass
class Forward:
    stack: Stack
    proxy: ForwardProxy
    url: str
    ca_file: Path
    fake: FakeUpstream
    port: int

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"https": self.url, "http": self.url}
        s.verify = str(self.ca_file)
        return s


@pytest.fixture
async def forward(make_stack: MakeStack, tmp_path: Path) -> AsyncIterator[Forward]:
    """jira.example.com (an `apis:` host) and EC2 through the forward proxy, both served
    by one fake over TLS on loopback (as tests/test_forward_egress.py)."""
    test_ca = make_fake_ca(tmp_path / "fake-ca", names=("localhost", EC2, JIRA))

    async def resolver(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")] if host in (EC2, JIRA) else []

    fake = FakeUpstream()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=test_ca.server_context()).start()
    stack = await make_stack(policy="", extra=(
        f"forward: {{ca_dir: {tmp_path / 'ca'}, upstream_ca: {test_ca.ca_file}, "
        f"allow_private: [{EC2}, {JIRA}]}}\n"
        f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}}}\n"))
    cfg = stack.tether.config
    proxy = await start_forward(
        stack.tether.governor, stack.tether.governor.metrics, cfg.forward, host="127.0.0.1",
        port=0, reverse=("127.0.0.1", proxy_port(stack)), own_ports=(), resolver=resolver,
        egress=Egress(cfg.apis, cfg.cloud, stack.tether.holds, cfg.agent_keys,
                      cfg.trust_identity_headers, cfg.lookups))
    ca_file = tmp_path / "tether-ca.pem"
    ca_file.write_text(export_pem(cfg.forward.ca_dir))
    try:
        yield Forward(stack, proxy, f"http://127.0.0.1:{proxy.port}", ca_file, fake,
                      bound_port(runner))
    finally:
        await proxy.stop()
        await runner.cleanup()


async def send(fwd: Forward, url: str, body: bytes, ctype: str) -> requests.Response:
    return await asyncio.to_thread(lambda: fwd.session().post(
        url, data=body, headers={"content-type": ctype}, timeout=20))


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
async def test_forward_tool_api_bodies(forward: Forward, payload: Payload) -> None:
    r = await send(forward, f"https://{JIRA}:{forward.port}/rest/api/2/issue",
                   in_json(payload, ISSUE), "application/json")
    if payload.text is None:
        tool_api_error(r.status_code, r.content, APIS_REFUSAL[payload.name])
        assert forward.fake.seen == []
    else:
        assert r.status_code == 200, r.text
        [seen] = forward.fake.seen
        assert seen["body"] == in_json(payload, ISSUE).decode()
    judged(forward.stack, payload, "api:jira")
    await healthy(forward.stack)


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
async def test_forward_llm_bodies(forward: Forward, payload: Payload) -> None:
    """An LLM host through HTTP_PROXY is governed on the reverse route: the same answer."""
    r = await send(forward, "https://api.openai.com/v1/chat/completions",
                   in_json(payload, CHAT), "application/json")
    stack = forward.stack
    if payload.text is None:
        assert (r.status_code, r.json()["error"]["code"]) == LLM_REFUSAL, r.text
        assert stack.fake.requests == []
        [refused] = records(stack, "request")
        assert (refused["provider"], refused["status"]) == ("openai", 400)
    else:
        assert r.status_code == 200, r.text
        assert stack.fake.requests[0]["messages"][0]["content"] == payload.text
    await healthy(stack)


EC2_FORM = "Action=DescribeVolumes&Version=2016-11-15&Filter.1.Name=tag:env&Filter.1.Value.1="


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if p.form is not None],
                         ids=[p.name for p in PAYLOADS if p.form is not None])
async def test_forward_cloud_form_bodies(forward: Forward, payload: Payload) -> None:
    assert payload.form is not None
    r = await send(forward, f"https://{EC2}:{forward.port}/", (EC2_FORM + payload.form).encode(),
                   "application/x-www-form-urlencoded")
    stack = forward.stack
    if payload.text is None:
        assert r.status_code == 403, r.text
        assert r.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors>')
        assert "<Code>TetherAmbiguousRequest</Code>" in r.text and "UTF-8" in r.text
        assert forward.fake.seen == []
        [refused] = records(stack, "request")
        assert refused["status"] == 403 and refused["code"] == "tether:ambiguous-request"
    else:
        assert r.status_code == 200 and "<DescribeVolumesResponse" in r.text, r.text
        [decision] = stack.decisions()
        assert decision["api"] == "aws.ec2.DescribeVolumes" and decision["action"] == "allow"
        assert decision["arguments"]["Filter"] == [{"Name": "tag:env", "Value": [payload.text]}]
    await healthy(stack)


async def test_forward_request_line_and_headers_that_are_not_utf8(forward: Forward) -> None:
    """Plain HTTP through the proxy from a raw socket. A header that is not UTF-8 is read
    as Latin-1 (judge.py, refusals.py): recorded, refused in the forward proxy's shape.
    A request line that is not ASCII never reaches tether: mitmproxy answers 400 itself
    (no record: there was no request to judge), and nothing is forwarded."""
    status, headers, raw = await raw_http(forward.proxy.port, (
        "GET http://unknown.example/x HTTP/1.1\r\nHost: unknown.example\r\n"
        "X-Tether-Agent: a-\xc0\xaf\xed\xa0\x80\r\nConnection: close\r\n\r\n").encode("latin-1"))
    assert status == 403 and headers["x-tether-refused"] == "tether:host-not-allowed"
    assert json.loads(raw)["error"]["type"] == "tether_forward_refused"
    [refused] = records(forward.stack, "request")
    assert refused["agent"] == "a-\xc0\xaf\xed\xa0\x80" and refused["status"] == 403
    status, _, _ = await raw_http(forward.proxy.port, (
        f"GET http://{JIRA}/rest/api/2/issue/OPS-\xc0\xaf HTTP/1.1\r\nHost: {JIRA}\r\n"
        "Connection: close\r\n\r\n").encode("latin-1"))
    assert status == 400 and forward.fake.seen == []
    await healthy(forward.stack)


# -- transparent mode ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """tests/test_transparent.py's namespaces, with jira.example.com (an `apis:` host)
    next to EC2 on the fake cloud; tether runs with the default policy (allow)."""
    python = preconditions()
    work = tmp_path_factory.mktemp("hostile-transparent")
    shared = Path(tempfile.mkdtemp(prefix="tether-hostile-"))
    shared.chmod(0o755)
    pid = os.getpid()
    p = Pod(f"tether-hpod-{pid}", f"tether-hcloud-{pid}", free_subnet(), python, shared, work)
    try:
        setup_netns(p)
        with (Path("/etc/netns") / p.pod / "hosts").open("a") as hosts:
            hosts.write(f"{p.fake_ip} {JIRA}\n")
        fake_ca = make_fake_ca(work / "fake-ca", names=(EC2, JIRA))
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent", "fake",
                       str(work / "fake.jsonl"), str(fake_ca.cert_file), str(fake_ca.key_file)),
              "ready", 15)
        config = work / "tether.yaml"
        config.write_text(
            f"audit: {{path: {work / 'audit.jsonl'}}}\n"
            f"forward: {{ca_dir: {work / 'ca'}, upstream_ca: {fake_ca.ca_file}, "
            f"allow_private: [{EC2}, {JIRA}]}}\n"
            f"apis:\n  jira: {{url: 'https://{JIRA}', spec: {SPECS / 'jira.yaml'}}}\n")
        start(p, in_ns(p.pod, sys.executable, "-m", "proxy", "serve", "--config", str(config),
                       "--host", "127.0.0.1", "--port", "8080", "--admin-port", "9090",
                       "--transparent-port", str(TPORT)), "tether: proxy on", 15)
        run(*in_ns(p.pod, "sh", str(REDIRECT)),
            env={**os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT)})
        ca = run(sys.executable, "-m", "proxy", "ca", "export", "--config", str(config),
                 env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        (shared / "tether-ca.pem").write_text(ca)
        (shared / "tether-ca.pem").chmod(0o644)
        yield p
    finally:
        teardown(p)


def pod_healthy(p: Pod) -> None:
    ready = run(*in_ns(p.pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       "http://127.0.0.1:9090/readyz"), check=False)
    assert ready.stdout == "200", ready
    metrics = run(*in_ns(p.pod, "curl", "-s", "http://127.0.0.1:9090/metrics")).stdout
    assert "tether_audit_write_errors_total 0.0" in metrics
    assert verify_targets([str(p.work / "audit.jsonl")]) == []


def pod_post(p: Pod, url: str, body: bytes, ctype: str) -> tuple[int, str, dict[str, str]]:
    """curl as the agent (uid 65534, no proxy settings): the packets are redirected."""
    file = p.shared / f"body-{len(list(p.shared.iterdir()))}"
    file.write_bytes(body)
    file.chmod(0o644)
    return p.curl(url, "--cacert", str(p.shared / "tether-ca.pem"), "-H",
                  f"content-type: {ctype}", "--data-binary", f"@{file}")


def reached(p: Pod, marker: str) -> list[dict[str, Any]]:
    """The requests the fake cloud saw whose body holds `marker`."""
    return [r for r in p.fake_log() if r["kind"] == "request" and marker in r["body"]]


@pytest.mark.parametrize("payload", PAYLOADS, ids=IDS)
def test_transparent_tool_api_bodies(pod: Pod, payload: Payload) -> None:
    before = len(pod.audit())
    marker = f"HX{PAYLOADS.index(payload)}"  # a project key the spec accepts
    body = in_json(payload, ISSUE).replace(b'"OPS"', f'"{marker}"'.encode())
    status, answer, _ = pod_post(pod, f"https://{JIRA}/rest/api/2/issue", body,
                                 "application/json")
    new = pod.audit()[before:]
    assert len(new) == 1, new
    if payload.text is None:
        tool_api_error(status, answer.encode(), APIS_REFUSAL[payload.name])
        assert new[0]["kind"] == ("request" if status == 400 else "decision")
    else:
        assert status == 200, answer
        [seen] = reached(pod, marker)
        assert json.loads(seen["body"])["summary"] == payload.text
        assert new[0]["action"] == "allow" and new[0]["arguments"]["summary"] == payload.text
    assert len(reached(pod, marker)) == (payload.text is not None)
    pod_healthy(pod)


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if p.form is not None],
                         ids=[p.name for p in PAYLOADS if p.form is not None])
def test_transparent_cloud_form_bodies(pod: Pod, payload: Payload) -> None:
    assert payload.form is not None
    before = len(pod.audit())
    status, body, _ = pod_post(pod, f"http://{EC2}/?case={payload.name}",
                               (EC2_FORM + payload.form).encode(),
                               "application/x-www-form-urlencoded")
    new = pod.audit()[before:]
    assert len(new) == 1, new
    if payload.text is None:
        assert status == 403 and "<Code>TetherAmbiguousRequest</Code>" in body, body
        assert pod.seen(f"case={payload.name}") == []
        assert new[0]["kind"] == "request" and new[0]["code"] == "tether:ambiguous-request"
    else:
        assert status == 200 and "<DescribeVolumesResponse" in body, body
        assert new[0]["action"] == "allow"
    pod_healthy(pod)
