"""The official google-genai SDK (and raw HTTP for the JSON-array stream), through a real
tether, against the fake Gemini upstream."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from google import genai
from google.genai import errors, types
from yarl import URL

from proxy.demo.fake_gemini import Call, FakeGemini, RawReply, Reply, stream_chunks
from tests.conftest import MakeStack, Stack

# google-genai subclasses aiohttp.ClientSession, which aiohttp warns about; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning")

TOOL_NAMES = ("get_weather", "delete_volume", "drop_database", "list_volumes")
CONFIG = types.GenerateContentConfig(
    tools=[types.Tool(function_declarations=[
        types.FunctionDeclaration(name=n, parameters_json_schema={"type": "object"})
        for n in TOOL_NAMES])],
    # The SDK must hand the calls back, not run python functions itself.
    automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
)
MODEL = "gemini-2.5-flash"
ODD_ARGS = '{ "city":"Zürich", "note": "tab\\there \\u00e9 \\"q\\" 漢字", "n": 1.50e2 }'
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')


@dataclass
class Gemini:
    stack: Stack
    fake: FakeGemini
    client: genai.Client

    async def generate(self, contents: str = "clean up") -> types.GenerateContentResponse:
        return await self.client.aio.models.generate_content(model=MODEL, contents=contents,
                                                             config=CONFIG)

    async def stream(self) -> list[types.GenerateContentResponse]:
        chunks = []
        async for chunk in await self.client.aio.models.generate_content_stream(
                model=MODEL, contents="clean up", config=CONFIG):
            chunks.append(chunk)
        return chunks


def sdk_client(stack: Stack, **headers: str) -> genai.Client:
    return genai.Client(api_key="k-agent", http_options=types.HttpOptions(
        base_url=stack.proxy_url + "/gemini", headers=headers or None,
        retry_options=types.HttpRetryOptions(attempts=1)))


async def start(make_stack: MakeStack, fake: FakeGemini | None = None, extra: str = ""
                ) -> Gemini:
    fake = fake or FakeGemini()
    stack = await make_stack(upstreams={"gemini": fake}, extra=extra)
    return Gemini(stack, fake, sdk_client(stack))


@pytest.fixture
async def gemini(make_stack: MakeStack) -> AsyncIterator[Gemini]:
    g = await start(make_stack)
    yield g
    await g.client.aio.aclose()


def function_calls(response: types.GenerateContentResponse) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name or "", c.args or {}) for c in response.function_calls or []]


def text_of(response: types.GenerateContentResponse) -> str:
    parts = response.candidates[0].content.parts if response.candidates and \
        response.candidates[0].content else None
    return "".join(p.text or "" for p in parts or [])


def merged(chunks: list[types.GenerateContentResponse]
           ) -> tuple[str, list[tuple[str, dict[str, Any]]], str | None]:
    """A streamed answer the way agents accumulate it: text, calls, the last finish."""
    text, calls, finish = "", [], None
    for chunk in chunks:
        text += text_of(chunk)
        calls += function_calls(chunk)
        if chunk.candidates and chunk.candidates[0].finish_reason:
            finish = chunk.candidates[0].finish_reason.value
    return text, calls, finish


async def raw_post(stack: Stack, path: str, body: bytes, **headers: str
                   ) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http:
        url = URL(stack.proxy_url + path, encoded=True)
        async with http.post(url, data=io.BytesIO(body), headers={
                "Content-Type": "application/json", "x-goog-api-key": "k-agent", **headers}) as resp:
            return resp.status, resp.headers.get("content-type", ""), await resp.read()


REQUEST = json.dumps({
    "contents": [{"role": "user", "parts": [{"text": "clean up"}]}],
    "tools": [{"functionDeclarations": [{"name": n} for n in TOOL_NAMES]}],
}).encode()
STREAM_PATH = f"/gemini/v1beta/models/{MODEL}:streamGenerateContent"


# --- the SDK ----------------------------------------------------------------------------


async def test_single_allowed_call_non_streaming(gemini: Gemini) -> None:
    gemini.fake.push(Reply(calls=(Call("get_weather", ODD_ARGS, id="fc-1"),)))
    r = await gemini.generate()
    [call] = r.function_calls or []
    assert (call.name, call.args, call.id) == ("get_weather", json.loads(ODD_ARGS), "fc-1")
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    assert gemini.fake.paths == [f"/v1/models/{MODEL}:generateContent"]
    assert "x-goog-api-key" not in {k.lower() for k in gemini.fake.headers[-1]}  # stripped
    [record] = gemini.stack.decisions()
    assert (record["provider"], record["model"], record["action"]) == ("gemini", MODEL, "allow")
    assert record["arguments"]["city"] == "Zürich" and record["call_id"] == "fc-1"


async def test_single_allowed_call_streaming(gemini: Gemini) -> None:
    gemini.fake.push(Reply(content="Let me check.", calls=(Call("get_weather", ODD_ARGS),)))
    text, calls, finish = merged(await gemini.stream())
    assert text == "Let me check."
    assert calls == [("get_weather", json.loads(ODD_ARGS))]
    assert finish == "STOP"
    assert gemini.fake.paths == [f"/v1/models/{MODEL}:streamGenerateContent?alt=sse"]
    [record] = gemini.stack.decisions()
    assert record["stream"] is True and record["action"] == "allow"


@pytest.mark.parametrize("split_calls", [False, True])
async def test_parallel_calls_all_allowed(make_stack: MakeStack, split_calls: bool) -> None:
    g = await start(make_stack, FakeGemini(split_calls=split_calls))
    turn = Reply(calls=(Call("get_weather", '{"city": "Oslo"}'), Call("get_weather",
                        '{"city": "Lima"}'), Call("list_volumes", "{}")))
    g.fake.push(turn, turn)
    expected = [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Lima"}),
                ("list_volumes", {})]
    assert function_calls(await g.generate()) == expected
    assert merged(await g.stream())[1] == expected
    assert len(g.stack.decisions()) == 6
    await g.client.aio.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_denied_call_rewritten_and_allowed_call_kept(gemini: Gemini, stream: bool) -> None:
    gemini.fake.push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE, Call("list_volumes", "{}"))))
    if stream:
        text, calls, finish = merged(await gemini.stream())
    else:
        r = await gemini.generate()
        text, calls = text_of(r), function_calls(r)
        finish = r.candidates[0].finish_reason.value if r.candidates and \
            r.candidates[0].finish_reason else None
    assert calls == [("get_weather", json.loads(ODD_ARGS)), ("list_volumes", {})]
    assert text.startswith("Cleaning up.\n\n[tether]")
    assert "'delete_volume' was denied by no-prod-deletes" in text
    assert "Deleting production resources is not allowed" in text
    assert finish == "STOP"
    actions = [(r["tool"], r["action"], r["rules"], r["stream"]) for r in gemini.stack.decisions()]
    assert actions == [("get_weather", "allow", [], stream),
                       ("delete_volume", "deny", ["no-prod-deletes"], stream),
                       ("list_volumes", "allow", [], stream)]


async def test_denied_call_keeps_gemini_3_thought_signature_on_the_next_call(
        make_stack: MakeStack) -> None:
    g = await start(make_stack, FakeGemini(signatures=True))
    g.fake.push(Reply(calls=(PROD_DELETE, Call("get_weather", "{}"))))
    r = await g.generate()
    parts = r.candidates[0].content.parts if r.candidates and r.candidates[0].content else []
    assert parts and parts[0].function_call is None and parts[0].thought_signature is None
    assert parts[1].function_call is not None and parts[1].thought_signature is not None
    await g.client.aio.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_on_deny_error_is_a_403_client_error(gemini: Gemini, stream: bool) -> None:
    gemini.fake.push(Reply(content="ok", calls=(Call("drop_database", '{"name": "prod"}'),)))
    with pytest.raises(errors.ClientError) as info:
        await (gemini.stream() if stream else gemini.generate())
    assert info.value.code == 403 and info.value.status == "PERMISSION_DENIED"
    assert "Dropping databases is never allowed" in (info.value.message or "")
    [record] = gemini.stack.decisions()
    assert (record["tool"], record["action"]) == ("drop_database", "deny")


async def test_undeclared_tool_is_denied(gemini: Gemini) -> None:
    gemini.fake.push(Reply(calls=(Call("format_disk", "{}"),)))
    r = await gemini.generate()
    assert r.function_calls is None and "tether:undeclared-tool" in text_of(r)


async def test_text_only_answers_pass_untouched(gemini: Gemini) -> None:
    gemini.fake.push(Reply(content="Hello ✓"), Reply(content="Hello ✓"))
    assert text_of(await gemini.generate()) == "Hello ✓"
    assert merged(await gemini.stream()) == ("Hello ✓", [], "STOP")
    assert gemini.stack.decisions() == []


async def test_other_methods_pass_through(gemini: Gemini) -> None:
    tokens = await gemini.client.aio.models.count_tokens(model=MODEL, contents="hello")
    assert tokens.total_tokens == 7
    async with aiohttp.ClientSession() as http:
        async with http.get(gemini.stack.proxy_url + "/gemini/v1beta/models") as resp:
            assert resp.status == 200
            assert (await resp.json())["models"][0]["name"] == "models/gemini-fake"
    assert gemini.fake.paths[-1] == "/v1beta/models"


async def test_tether_headers_reach_the_audit_not_the_upstream(make_stack: MakeStack) -> None:
    g = await start(make_stack)
    client = sdk_client(g.stack, **{"X-Tether-Session": "s-1", "X-Tether-Agent": "janitor"})
    g.fake.push(Reply(calls=(Call("get_weather", "{}"),)))
    await client.aio.models.generate_content(model=MODEL, contents="hi", config=CONFIG)
    [record] = g.stack.decisions()
    assert (record["session"], record["agent"]) == ("s-1", "janitor")
    assert not {k.lower() for k in g.fake.headers[-1]} & {"x-tether-session", "x-tether-agent"}
    await client.aio.aclose()
    await g.client.aio.aclose()


async def test_upstream_key_replaces_the_agents_key(make_stack: MakeStack,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_GEMINI_KEY", "k-real-upstream")
    g = await start(make_stack, extra="upstreams:\n  gemini: {url: 'http://unused', "
                                      "api_key_env: TETHER_TEST_GEMINI_KEY}\n")
    g.fake.push(Reply(content="hi"))
    await g.generate()
    assert g.fake.headers[-1]["x-goog-api-key"] == "k-real-upstream"
    await g.client.aio.aclose()


async def test_upstream_key_replaces_a_key_in_the_query(make_stack: MakeStack,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_GEMINI_KEY", "k-real-upstream")
    g = await start(make_stack, extra="upstreams:\n  gemini: {url: 'http://unused', "
                                      "api_key_env: TETHER_TEST_GEMINI_KEY}\n")
    g.fake.push(Reply(content="hi"))
    status, _, _ = await raw_post(g.stack, f"/gemini/v1beta/models/{MODEL}:generateContent"
                                           "?key=k-agent-secret", REQUEST)
    assert status == 200
    assert "k-agent-secret" not in g.fake.paths[-1]
    await g.client.aio.aclose()


async def test_openai_compatible_endpoint_is_governed(gemini: Gemini) -> None:
    gemini.fake.push(Reply(calls=(PROD_DELETE, Call("get_weather", "{}"))))
    client = openai.AsyncOpenAI(base_url=gemini.stack.proxy_url + "/gemini/v1beta/openai",
                                api_key="k-agent", max_retries=0)
    r = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "clean up"}],
        tools=[{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
               for n in TOOL_NAMES])
    await client.close()
    assert [c.function.name for c in r.choices[0].message.tool_calls or []
            if c.type == "function"] == ["get_weather"]
    assert "denied by no-prod-deletes" in (r.choices[0].message.content or "")
    assert gemini.fake.paths == ["/v1beta/openai/chat/completions"]


# --- the JSON-array stream (no alt=sse), as raw HTTP ------------------------------------


async def test_json_array_stream_rewrites_and_keeps_argument_bytes(gemini: Gemini) -> None:
    gemini.fake.push(Reply(content="Cleaning up.", calls=(
        Call("get_weather", ODD_ARGS), PROD_DELETE, Call("list_volumes", "{}"))))
    status, ctype, body = await raw_post(gemini.stack, STREAM_PATH, REQUEST)
    assert status == 200 and ctype.startswith("application/json")
    assert gemini.fake.paths == [STREAM_PATH.removeprefix("/gemini")]
    assert ODD_ARGS.encode() in body and b"vol-9" not in body
    chunks = json.loads(body)
    parts = [p for c in chunks for p in c["candidates"][0]["content"]["parts"]]
    assert [p["functionCall"]["name"] for p in parts if "functionCall" in p] == [
        "get_weather", "list_volumes"]
    text = "".join(p.get("text", "") for p in parts)
    assert text.startswith("Cleaning up.") and "denied by no-prod-deletes" in text
    assert [r["action"] for r in gemini.stack.decisions()] == ["allow", "deny", "allow"]


async def test_json_array_stream_passes_untouched_when_nothing_is_denied(gemini: Gemini) -> None:
    turn = Reply(content="Hi ✓", calls=(Call("get_weather", ODD_ARGS),))
    gemini.fake.push(turn)
    _, _, body = await raw_post(gemini.stack, STREAM_PATH, REQUEST)
    expected = b"".join(stream_chunks(turn, MODEL, sse=False))
    # Byte for byte, but for the response id the fake numbers.
    def unnumbered(data: bytes) -> bytes:
        return re.sub(rb'"responseId": "fake-\d+"', b"", data)

    assert ODD_ARGS.encode() in body and unnumbered(body) == unnumbered(expected)


async def test_json_array_stream_on_deny_error_ends_with_an_error_element(gemini: Gemini) -> None:
    gemini.fake.push(Reply(content="ok", calls=(Call("drop_database", '{"name": "prod"}'),)))
    status, _, body = await raw_post(gemini.stack, STREAM_PATH, REQUEST)
    chunks = json.loads(body)
    assert status == 200 and chunks[-1]["error"]["code"] == 403
    assert b"drop_database\"" not in body.replace(b"'drop_database'", b"")


# --- bad input from either side ---------------------------------------------------------


def rejected(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.audit() if r["kind"] == "request"]


async def collect(g: Gemini, seen: list[types.GenerateContentResponse]) -> None:
    async for chunk in await g.client.aio.models.generate_content_stream(
            model=MODEL, contents="clean up", config=CONFIG):
        seen.append(chunk)


CUT_TURN = Reply(content="Deleting.", calls=(
    Call("get_weather", '{"city": "Oslo"}'),
    Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "temporary"}}')))


def cut_before_finish(sse: bool) -> tuple[bytes, ...]:
    pieces = stream_chunks(CUT_TURN, MODEL, sse=sse, split_calls=True, finish_apart=True)
    return tuple(pieces[:next(i for i, p in enumerate(pieces) if b"delete_volume" in p) + 1])


async def test_sse_stream_cut_before_the_finish(gemini: Gemini) -> None:
    gemini.fake.push(RawReply(content_type="text/event-stream", chunks=cut_before_finish(True),
                              cut=True))
    seen: list[types.GenerateContentResponse] = []
    with pytest.raises(errors.ServerError, match="ended before the response was complete") as info:
        await collect(gemini, seen)
    assert info.value.code == 502
    text, calls, _ = merged(seen)
    # Text before the calls was released; calls waiting for their finishReason never were.
    assert text == "Deleting." and calls == []
    decisions = [(r["tool"], r["action"], r["rules"]) for r in gemini.stack.decisions()]
    assert decisions == [("get_weather", "deny", ["tether:malformed-call"]),
                         ("delete_volume", "deny", ["tether:malformed-call"])]
    assert any(r["code"] == "stream_error" for r in rejected(gemini.stack))


async def test_json_array_stream_cut_before_its_end(gemini: Gemini) -> None:
    gemini.fake.push(RawReply(content_type="application/json", chunks=cut_before_finish(False),
                              cut=True))
    status, _, body = await raw_post(gemini.stack, STREAM_PATH, REQUEST)
    chunks = json.loads(body)  # still one valid JSON array
    assert status == 200 and b"get_weather" not in body
    error = chunks[-1]["error"]
    assert (error["code"], error["details"][0]["reason"]) == (502, "UPSTREAM_TRUNCATED")
    assert [r["action"] for r in gemini.stack.decisions()] == ["deny", "deny"]


OVERLOADED = '{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}'


async def test_error_chunk_inside_a_200_sse(gemini: Gemini) -> None:
    chunks = cut_before_finish(True) + (f"data: {OVERLOADED}\r\n\r\n".encode(),)
    gemini.fake.push(RawReply(content_type="text/event-stream", chunks=chunks))
    seen: list[types.GenerateContentResponse] = []
    with pytest.raises(errors.ServerError, match="The model is overloaded") as info:
        await collect(gemini, seen)
    assert info.value.code == 503 and merged(seen)[1] == []
    assert [r["action"] for r in gemini.stack.decisions()] == ["deny", "deny"]


async def test_error_chunk_inside_a_200_json_array(gemini: Gemini) -> None:
    chunks = cut_before_finish(False) + (f"\n,\r\n{OVERLOADED}\n]".encode(),)
    gemini.fake.push(RawReply(content_type="application/json", chunks=chunks))
    _, _, body = await raw_post(gemini.stack, STREAM_PATH, REQUEST)
    assert json.loads(body)[-1]["error"]["message"] == "The model is overloaded."
    assert b"get_weather" not in body


@pytest.mark.parametrize("continued", [False, True], ids=["rewrite", "continue"])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_with_a_call_is_denied(make_stack: MakeStack, stream: bool,
                                                continued: bool) -> None:
    """Rewrite mode keeps the cut answer's finish reason; the default sends the model the
    denial as the call's result and the agent gets its next answer after the text."""
    gemini = await start(make_stack, extra="" if continued else "defaults: {on_deny: rewrite}")
    try:
        await _max_tokens_with_a_call(gemini, stream, continued)
    finally:
        await gemini.client.aio.aclose()


async def _max_tokens_with_a_call(gemini: Gemini, stream: bool, continued: bool) -> None:
    gemini.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),),
                           finish_reason="MAX_TOKENS"), Reply(content="Shorter next time."))
    if stream:
        text, calls, finish = merged(await gemini.stream())
    else:
        r = await gemini.generate()
        text, calls = text_of(r), function_calls(r)
        finish = r.candidates[0].finish_reason.value if r.candidates and \
            r.candidates[0].finish_reason else None
    assert calls == [] and "MAX_TOKENS" in text
    [record] = gemini.stack.decisions()
    assert (record["action"], record["rules"]) == ("deny", ["tether:malformed-call"])
    if not continued:
        assert finish == "MAX_TOKENS" and len(gemini.fake.requests) == 1
        return
    assert finish == "STOP" and text.endswith("Shorter next time.")
    [result] = gemini.fake.requests[1]["contents"][-1]["parts"]
    assert "finishReason MAX_TOKENS" in result["functionResponse"]["response"]["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_duplicate_argument_keys_are_denied(gemini: Gemini, stream: bool) -> None:
    raw = '{"volume_id": "vol-1", "volume_id": "vol-2"}'
    gemini.fake.push(Reply(calls=(Call("get_weather", raw), Call("list_volumes", "{}"))))
    if stream:
        text, calls, _ = merged(await gemini.stream())
    else:
        r = await gemini.generate()
        text, calls = text_of(r), function_calls(r)
    assert calls == [("list_volumes", {})] and "duplicate key" in text
    first = gemini.stack.decisions()[0]
    assert (first["action"], first["rules"], first["arguments"]) == (
        "deny", ["tether:malformed-call"], raw)


async def test_snake_case_function_call_from_upstream_is_governed(gemini: Gemini) -> None:
    body = (b'{"candidates": [{"content": {"role": "model", "parts": [{"function_call": '
            b'{"name": "delete_volume", "args": {"tags": {"env": "production"}}}}]}, '
            b'"finishReason": "STOP"}]}')
    gemini.fake.push(RawReply(chunks=(body,)))
    r = await gemini.generate()
    assert r.function_calls is None and "denied by no-prod-deletes" in text_of(r)


@pytest.mark.parametrize("body, needle", [
    (b'{"contents": [', "not valid JSON"),
    (b'"just a string"', "must be a JSON object"),
    (b'{"contents": [], "contents": []}', "duplicate key"),
    (b'{"contents": [], "tools": "all"}', "'tools' must be an array"),
    (b'{"tools": [{"functionDeclarations": [{}]}]}', "has no name"),
])
async def test_malformed_request_is_a_400_and_not_forwarded(gemini: Gemini, body: bytes,
                                                            needle: str) -> None:
    status, ctype, raw = await raw_post(gemini.stack, f"/gemini/v1beta/models/{MODEL}"
                                                      ":generateContent", body)
    error = json.loads(raw)["error"]
    assert status == 400 and ctype.startswith("application/json")
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert needle in error["message"]
    assert gemini.fake.requests == []
    [record] = rejected(gemini.stack)
    assert (record["status"], record["code"]) == (400, "invalid_request")


@pytest.mark.parametrize("status", [200, 502])
async def test_html_from_upstream_is_a_502(gemini: Gemini, status: int) -> None:
    gemini.fake.push(RawReply(status=status, content_type="text/html",
                              chunks=(b"<html><body>Bad Gateway</body></html>",)))
    with pytest.raises(errors.ServerError, match="text/html") as info:
        await gemini.generate()
    assert info.value.code == 502 and info.value.status == "UNAVAILABLE"


async def test_unreadable_json_from_upstream_is_a_502(gemini: Gemini) -> None:
    gemini.fake.push(RawReply(chunks=(b'{"modelVersion": "m"}',)))
    with pytest.raises(errors.ServerError, match="no 'candidates'"):
        await gemini.generate()


async def test_json_error_from_upstream_passes_through(gemini: Gemini) -> None:
    body = b'{"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}'
    gemini.fake.push(RawReply(status=429, chunks=(body,)))
    with pytest.raises(errors.ClientError, match="Resource exhausted") as info:
        await gemini.generate()
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("path, status", [
    (f"/gemini/v1beta/models/{MODEL}:batchGenerateContent", 501),
    (f"/gemini/v1beta/models/{MODEL}:bidiGenerateContent", 501),
    ("/gemini/v1beta/interactions", 501),
    ("/gemini/v1beta/openai/responses", 501),
    (f"/gemini/v1beta/models/{MODEL}:GenerateContent", 404),
    (f"/gemini/v2/models/{MODEL}:generateContent", 404),
    (f"/gemini/models/{MODEL}:generateContent", 404),
    (f"/gemini/v1beta/models/{MODEL}%3AgenerateContent", 404),
    (f"/gemini/v1beta/models/{MODEL}:generateContent/", 404),
    (f"/gemini/v1beta/models/{MODEL}:generateContent?alt=proto", 400),
    (f"/gemini/v1beta/models/{MODEL}:generateContent?alt=sse&alt=json", 400),
    (f"/gemini/v1beta/models/{MODEL}%2F:generateContent", 400),
    (f"/gemini/v1beta/models/x/../{MODEL}:generateContent", 400),
])
async def test_routes_that_are_refused(gemini: Gemini, path: str, status: int) -> None:
    got, _, raw = await raw_post(gemini.stack, path, REQUEST)
    error = json.loads(raw)["error"]
    assert got == status and error["code"] == status and error["message"]
    assert gemini.fake.requests == []
