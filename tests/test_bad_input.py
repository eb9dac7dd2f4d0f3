"""Bad input from either side: a clear OpenAI-shaped error or deny, an audit record,
and nothing forwarded or released that should not be."""

from __future__ import annotations

import io
import json
from pathlib import Path

import aiohttp
import openai
import pytest
from yarl import URL

from proxy import config as config_mod
from proxy.server.app import bound_port, build, start
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, RawReply, Reply, stream_events
from tests.test_e2e_openai import MESSAGES, TOOLS, collect


async def post(stack: Stack, body: bytes, path: str = "/openai/v1/chat/completions",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        url = URL(stack.proxy_url + path, encoded=True)  # sent as written, no normalising
        async with http.post(url, data=io.BytesIO(body),
                             headers={"Content-Type": "application/json", **(headers or {})}
                             ) as resp:
            return resp.status, await resp.json()


def rejected(stack: Stack) -> list[dict[str, object]]:
    return [r for r in stack.audit() if r["kind"] == "request"]


@pytest.mark.parametrize("body, needle", [
    (b'{"model": "gpt-x", "messages": [', "not valid JSON"),
    (b'"just a string"', "must be a JSON object"),
    (b'{"model": "gpt-x", "stream": "true", "messages": []}', "'stream' must be a boolean"),
    (b'{"model": "gpt-x", "stream": false, "stream": true, "messages": []}', "duplicate key"),
    (b'{"model": "gpt-x", "tools": "all", "messages": []}', "'tools' must be an array"),
])
async def test_malformed_request_is_400_and_not_forwarded(stack: Stack, body: bytes,
                                                          needle: str) -> None:
    status, error = await post(stack, body)
    assert status == 400
    err = error["error"]
    assert isinstance(err, dict) and needle in err["message"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    assert stack.fake.requests == []
    [record] = rejected(stack)
    assert record["status"] == 400 and record["code"] == "invalid_request"


async def test_sdk_sees_a_bad_request_error(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError, match="must be an array"):
        await stack.client().chat.completions.create(
            model="gpt-x", messages=MESSAGES, extra_body={"tools": {"x": 1}})


async def test_body_over_the_limit_is_413(make_stack: MakeStack) -> None:
    stack = await make_stack(extra="limits: {max_body_bytes: 4096}\n")
    big = json.dumps({"model": "gpt-x", "messages": [{"role": "user", "content": "x" * 5000}]})
    with pytest.raises(openai.APIStatusError) as info:
        await stack.client().chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "x" * 5000}])
    assert info.value.status_code == 413
    status, error = await post(stack, big.encode())
    assert status == 413 and "4096-byte limit" in str(error["error"])
    assert stack.fake.requests == []
    assert [r["status"] for r in rejected(stack)] == [413, 413]


async def test_default_limit_is_10_mib(stack: Stack) -> None:
    assert stack.tether.config.max_body_bytes == 10 * 1024 * 1024
    body = b'{"model": "gpt-x", "messages": [], "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    status, _ = await post(stack, body)
    assert status == 413


@pytest.mark.parametrize("raw, why", [
    ('{"volume_id": "vol-1", "volume_id": "vol-2"}', "duplicate key"),
    ("{'volume_id': 'vol-1'}", "not valid JSON"),
    ('["vol-1"]', "must be a JSON object"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_tool_arguments_are_denied(stack: Stack, raw: str, why: str,
                                             stream: bool) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", raw), Call("list_volumes", "{}"))))
    client = stack.client()
    if stream:
        s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS,
                                                 stream=True)
        text, calls, _ = await collect(s)
        names = [c[1] for c in calls.values()]
    else:
        r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
        text = r.choices[0].message.content or ""
        names = [c.function.name for c in r.choices[0].message.tool_calls or []
                 if c.type == "function"]
    assert names == ["list_volumes"]
    assert why in text
    first = stack.decisions()[0]
    assert first["action"] == "deny" and first["rules"] == ["tether:malformed-call"]
    assert first["arguments"] == raw


@pytest.mark.parametrize("status", [200, 502])
async def test_html_from_upstream_is_a_502(stack: Stack, status: int) -> None:
    stack.fake.push(RawReply(status=status, content_type="text/html",
                             chunks=(b"<html><body>Bad Gateway</body></html>",)))
    with pytest.raises(openai.InternalServerError) as info:
        await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                     tools=TOOLS)
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "bad_upstream_response"
    assert "text/html" in info.value.message
    [record] = rejected(stack)
    assert record["status"] == 502


async def test_json_error_from_upstream_passes_through(stack: Stack) -> None:
    body = b'{"error": {"message": "Incorrect API key", "type": "invalid_request_error", ' \
           b'"code": "invalid_api_key"}}'
    stack.fake.push(RawReply(status=401, chunks=(body,)))
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert rejected(stack)[0]["status"] == 401


async def test_unreadable_json_from_upstream_is_a_502(stack: Stack) -> None:
    stack.fake.push(RawReply(chunks=(b'{"id": "x", "object": "chat.completion"}',)))
    with pytest.raises(openai.InternalServerError, match="no 'choices'"):
        await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES)


async def test_upstream_stream_cut_mid_tool_call(stack: Stack) -> None:
    turn = Reply(content="Deleting.", calls=(
        Call("get_weather", '{"city": "Oslo"}'),
        Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "temporary"}}')))
    events = stream_events(turn, "gpt-x")
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 3
    stack.fake.push(RawReply(content_type="text/event-stream", chunks=tuple(events[:cut]),
                             cut=True))
    stream = await stack.client().chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                          tools=TOOLS, stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="ended before the response was complete"):
        async for chunk in stream:
            for choice in chunk.choices:
                for tc in choice.delta.tool_calls or []:
                    seen.append(tc.function.name if tc.function and tc.function.name else "")
    # The complete call before the cut was released; the cut one never was.
    assert seen == ["get_weather"]
    decisions = [(r["tool"], r["action"], r["rules"]) for r in stack.decisions()]
    assert decisions == [("get_weather", "allow", []),
                         ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(r["code"] == "stream_error" for r in rejected(stack))


async def test_unreachable_upstream_is_a_502(tmp_path: Path) -> None:
    path = tmp_path / "dead.yaml"
    path.write_text(f"audit: {{path: {tmp_path / 'dead.jsonl'}}}\n")
    cfg = config_mod.load(path, env={"TETHER_UPSTREAM_OPENAI": "http://127.0.0.1:9"})
    tether = build(cfg)
    runners = await start(tether, host="127.0.0.1", port=0, admin_port=0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{bound_port(runners[0])}/openai/v1", api_key="k",
        max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError, match="could not be reached"):
            await client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
        await tether.close()
    records = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert records[0]["status"] == 502


@pytest.mark.parametrize("path, status", [
    ("/elsewhere/v1/chat/completions", 404),
    ("/openai/v1/responses/", 404),
    ("/openai/v1/responses/resp_1", 501),
    ("/openai/v1/conversations/c1/items", 501),
    ("/openai/v1/chat/completions/chatcmpl-1/messages", 501),
    ("/openai/v1/threads/t1/runs", 501),
    ("/openai/v1/chat/completions/", 404),
    ("/openai/v1/Chat/Completions", 404),
    ("/openai/v1/chat%2fcompletions", 400),
    ("/openai/v1/models/../chat/completions", 400),
    ("/openai/v1//chat/completions", 400),
    ("/openai/chat/completions", 404),
    ("/openai/v2/chat/completions", 404),
    ("/openai/v1/responses/r1/input_items", 501),
    ("/openai/v1/chat/complet%69ons", 400),
    ("/openai/v1/chat/completions%3b", 400),
    ("/openai/v1/chat/completions;x=1", 400),
    ("/openai/v1/chat/%2e%2e/chat/completions", 400),
    ("/openai/v1/chat/completions%", 400),
])
async def test_routes_that_are_refused(stack: Stack, path: str, status: int) -> None:
    got, error = await post(stack, b'{"model": "gpt-x", "messages": []}', path)
    assert got == status
    assert isinstance(error["error"], dict) and error["error"]["message"]
    assert stack.fake.requests == []
