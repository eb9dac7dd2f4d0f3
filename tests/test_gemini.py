from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from proxy.demo.fake_gemini import SIGNATURE, Call, Reply, response, stream_chunks
from proxy.errors import BadRequest, ProtocolError, UpstreamError
from proxy.model import Action, Decision, Exchange, OnDeny, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import load_yaml
from proxy.providers.base import Route, RouteKind
from proxy.providers.gemini import (
    GEMINI,
    GeminiProvider,
    parse_request,
    parse_response,
    render_response,
)
from proxy.providers.gemini_stream import GeminiStream
from proxy.providers.jsonarray import JSONArraySplitter
from proxy.providers.openai_chat import CHAT
from proxy.providers.sse import SSEDecoder
from tests.streaming import Run, run_stream, split_at

RULES = """
- id: no-prod
  match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
  action: deny
  message: not production
"""
DECLARED = ("get_weather", "delete_volume", "list_volumes")
ODD_ARGS = '{ "city":"Zürich",\n  "note": "tab\\there \\u00e9 \\"q\\" ]} 漢字", "n": 1.50e2 }'
PROD = '{"volume_id": "vol-1", "tags": {"env": "production"}}'


def engine() -> PolicyEngine:
    raw = load_yaml(RULES, "rules.yaml")
    assert isinstance(raw, list)
    return PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 1) for r in raw)))


EXCHANGE = Exchange(provider="gemini", model="m", declared_tools=DECLARED)
ENGINE = engine()


def decide(call: ToolCall) -> Decision:
    return ENGINE.decide(call, EXCHANGE)


def strict(call: ToolCall) -> Decision:
    return Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)


TURN = Reply(
    content="Checking, then cleaning up. Ünïcödé ✓ 漢字",
    calls=(Call("get_weather", ODD_ARGS, id="call-1"), Call("delete_volume", PROD),
           Call("list_volumes", "{}")),
)
ROUTE = GeminiProvider().route("POST", "v1beta/models/m:streamGenerateContent", {})


def decisions_of(body: bytes) -> list[tuple[str, str, str]]:
    parsed = parse_response(body)
    return [(c.name, c.raw_arguments, decide(c).action.value) for c in parsed.calls]


def parts_of(obj: dict[str, Any], candidate: int = 0) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = obj["candidates"][candidate]["content"]["parts"]
    return parts


# --- routes -----------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, model, stream", [
    ("POST", "v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash", False),
    ("POST", "v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini-2.5-flash", True),
    ("POST", "v1/models/gemini-2.0-flash-001:generateContent", "gemini-2.0-flash-001", False),
    ("POST", "v1alpha/models/m:streamGenerateContent", "m", True),
    ("POST", "v1beta/tunedModels/my-model-x1:generateContent", "tunedModels/my-model-x1", False),
])
def test_governed_routes(method: str, path: str, model: str, stream: bool) -> None:
    route = GeminiProvider().route(method, path, {})
    assert route.kind is RouteKind.GOVERNED and route.format is GEMINI
    assert (route.model, route.stream, route.upstream_path) == (model, stream, path)


@pytest.mark.parametrize("query, alt", [({}, None), ({"alt": "sse"}, "sse"), ({"alt": "json"}, None),
                                        ({"$alt": "sse"}, "sse"), ({"key": "k"}, None)])
def test_alt_picks_the_stream_form(query: dict[str, str], alt: str | None) -> None:
    route = GeminiProvider().route("POST", "v1beta/models/m:streamGenerateContent", query)
    assert route.kind is RouteKind.GOVERNED and route.params.get("alt") == alt


@pytest.mark.parametrize("query", [
    {"alt": "proto"}, {"alt": "media"}, {"ALT": "sse"}, {"alt": "SSE"},
    MultiDict([("alt", "sse"), ("alt", "json")]), {"alt": "sse", "$alt": "json"},
])
def test_unreadable_alt_is_refused(query: dict[str, str]) -> None:
    route = GeminiProvider().route("POST", "v1beta/models/m:generateContent", query)
    assert (route.kind, route.status) == (RouteKind.REFUSE, 400)


def test_openai_compatible_chat_is_governed_as_chat_completions() -> None:
    route = GeminiProvider().route("POST", "v1beta/openai/chat/completions", {})
    assert route.kind is RouteKind.GOVERNED and route.format is CHAT


@pytest.mark.parametrize("method, path", [
    ("POST", "v1beta/models/m:countTokens"),
    ("POST", "v1beta/models/m:embedContent"),
    ("POST", "v1beta/models/m:batchEmbedContents"),
    ("POST", "v1beta/models/m:asyncBatchEmbedContent"),
    ("GET", "v1beta/models"),
    ("GET", "v1beta/models/gemini-2.5-flash"),
    ("POST", "v1beta/cachedContents"),
    ("GET", "v1beta/cachedContents/abc"),
    ("GET", "v1beta/files/abc"),
    ("POST", "upload/v1beta/files"),
    ("GET", "v1beta/tunedModels"),
    ("GET", "v1beta/operations/op-1"),
    ("GET", "v1beta/openai/models"),
    ("POST", "v1beta/openai/embeddings"),
])
def test_passed_routes(method: str, path: str) -> None:
    route = GeminiProvider().route(method, path, {})
    assert route.kind is RouteKind.PASS and route.upstream_path == path


@pytest.mark.parametrize("method, path, status", [
    ("POST", "v1beta/models/m:batchGenerateContent", 501),
    ("POST", "v1beta/models/m:bidiGenerateContent", 501),
    ("GET", "ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent", 501),
    ("POST", "v1beta/models/aqa:generateAnswer", 501),
    ("POST", "v1beta/models/text-bison:generateText", 501),
    ("POST", "v1beta/models/imagen:predict", 501),
    ("POST", "v1beta/models/veo:predictLongRunning", 501),
    ("GET", "v1beta/batches/b-1", 501),
    ("POST", "v1beta/interactions", 501),
    ("GET", "v1beta/interactions/i-1", 501),
    ("POST", "v1beta/agents", 501),
    ("POST", "v1alpha/auth_tokens", 501),
    ("POST", "v1beta/openai/responses", 501),
    ("POST", "v1beta/openai/images/generations", 501),
    ("POST", "openai/responses", 501),
    ("GET", "v1beta/models/m:generateContent", 404),
    ("POST", "v2/models/m:generateContent", 404),
    ("POST", "models/m:generateContent", 404),
    ("POST", "v1beta/models/m:GenerateContent", 404),
    ("POST", "v1beta/models/m:generatecontent", 404),
    ("POST", "V1beta/models/m:generateContent", 404),
    ("POST", "v1beta/Models/m:generateContent", 404),
    ("POST", "v1beta/models/m%3AgenerateContent", 404),
    ("POST", "v1beta/models/m:generateContent/", 404),
    ("POST", "v1beta/models/m:generateContent/x", 404),
    ("POST", "v1beta/models/a/b:generateContent", 404),
    ("POST", "v1beta/models/:generateContent", 404),
    ("POST", "v1beta/models/m:generateContentX", 404),
    ("POST", "v1beta/cachedContents/c:generateContent", 404),
    ("POST", "x/v1beta/models/m:generateContent", 404),
    ("POST", "v1beta/chat/completions", 404),
    ("POST", "v1beta/openai/chat/completions/", 404),
    ("GET", "v1beta/openai/chat/completions", 404),
])
def test_refused_routes(method: str, path: str, status: int) -> None:
    route = GeminiProvider().route(method, path, {})
    assert (route.kind, route.status) == (RouteKind.REFUSE, status)
    assert route.message


@pytest.mark.parametrize("status, kind", [
    (400, "INVALID_ARGUMENT"), (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"),
    (413, "INVALID_ARGUMENT"), (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL"),
    (501, "UNIMPLEMENTED"), (502, "UNAVAILABLE"), (503, "UNAVAILABLE"), (418, "INVALID_ARGUMENT"),
])
def test_errors_have_googles_shape(status: int, kind: str) -> None:
    reply = GeminiProvider().error(status, "what went wrong", "some_code")
    assert reply.status == status and reply.content_type == "application/json"
    error = json.loads(reply.body)["error"]
    assert (error["code"], error["message"], error["status"]) == (status, "what went wrong", kind)
    assert error["details"][0]["reason"] == "SOME_CODE"
    assert list(json.loads(reply.body)) == ["error"]  # the SDK spots errors by the first key


# --- requests ---------------------------------------------------------------------------


def test_parse_request_reads_declarations_in_either_spelling() -> None:
    body = json.dumps({
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "tools": [{"functionDeclarations": [{"name": "a"}, {"name": "b"}]},
                  {"function_declarations": [{"name": "c"}]}, {"googleSearch": {}}],
        "generationConfig": {"maxOutputTokens": 100, "candidateCount": 2},
    }).encode()
    req = parse_request(body, ROUTE)
    assert (req.model, req.stream, req.declared_tools) == ("m", True, ("a", "b", "c"))
    assert req.max_output_tokens == 200


def test_fingerprint_is_stable_across_turns() -> None:
    system = {"parts": [{"text": "be careful"}]}
    turn: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": "clean up"}]}]
    first = {"systemInstruction": system, "contents": turn}
    later = {"systemInstruction": system, "contents": turn + [
        {"role": "model", "parts": [{"text": "ok"}]}, {"role": "user", "parts": [{"text": "go"}]}]}
    other = {"systemInstruction": system, "contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    a = parse_request(json.dumps(first).encode(), ROUTE).fingerprint
    b = parse_request(json.dumps(later).encode(), ROUTE).fingerprint
    assert a is not None and a == b
    assert parse_request(json.dumps(other).encode(), ROUTE).fingerprint != a


@pytest.mark.parametrize("body, message", [
    (b'{"contents": [', "not valid JSON"),
    (b'[1, 2]', "must be a JSON object"),
    (b'{"contents": [], "contents": []}', "duplicate key"),
    (b'{"tools": {}}', "'tools' must be an array"),
    (b'{"tools": [5]}', "tools\\[0\\] must be an object"),
    (b'{"tools": [{"functionDeclarations": {}}]}', "must be an array"),
    (b'{"tools": [{"functionDeclarations": [{"description": "x"}]}]}', "has no name"),
    (b'{"tools": [{"functionDeclarations": [], "function_declarations": []}]}', "both"),
    (b'{"tools": [], "tools ": [], "generationConfig": {"maxOutputTokens": -1}}', "whole number"),
    (b'{"generationConfig": {"maxOutputTokens": "many"}}', "whole number"),
    (b'{"generationConfig": [], "contents": []}', "must be an object"),
])
def test_bad_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body, ROUTE)


# --- whole responses --------------------------------------------------------------------


def test_parse_response_reads_every_candidate_and_keeps_argument_text() -> None:
    body = response((TURN, Reply(calls=(Call("get_weather", '{"city": "Rome"}'),))), "m")
    parsed = parse_response(body)
    assert [(c.choice, c.index, c.name, c.id) for c in parsed.calls] == [
        (0, 0, "get_weather", "call-1"), (0, 1, "delete_volume", ""),
        (0, 2, "list_volumes", ""), (1, 0, "get_weather", "")]
    assert parsed.calls[0].raw_arguments == ODD_ARGS
    assert parsed.calls[0].arguments is not None and parsed.calls[0].arguments["n"] == 150
    assert parsed.usage is not None and parsed.usage.total_tokens == 36


def test_render_keeps_allowed_call_bytes_and_explains_denied_ones() -> None:
    body = response(TURN, "m")
    parsed = parse_response(body)
    decisions = [decide(c) for c in parsed.calls]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.DENY, Action.ALLOW]
    out = render_response(parsed, decisions)
    assert ODD_ARGS.encode() in out and PROD.encode() not in out
    obj = json.loads(out)
    parts = parts_of(obj)
    assert [next(iter(p)) for p in parts] == ["text", "functionCall", "text", "functionCall"]
    assert parts[0]["text"] == TURN.content
    assert parts[2]["text"].startswith("\n\n[tether] The tool call 'delete_volume' was denied by "
                                       "no-prod: not production")
    assert obj["candidates"][0]["finishReason"] == "STOP"


def test_render_all_allowed_returns_the_upstream_bytes() -> None:
    body = response(Reply(calls=(Call("get_weather", "{ }"),)), "m")
    parsed = parse_response(body)
    assert render_response(parsed, [decide(c) for c in parsed.calls]) is body


def test_a_denied_calls_signature_moves_to_the_next_allowed_call() -> None:
    turn = Reply(calls=(Call("delete_volume", PROD), Call("get_weather", ODD_ARGS)))
    parsed = parse_response(response(turn, "m", signatures=True))
    parts = parts_of(json.loads(render_response(parsed, [decide(c) for c in parsed.calls])))
    assert "thoughtSignature" not in parts[0] and "delete_volume" in parts[0]["text"]
    assert parts[1]["thoughtSignature"] == SIGNATURE
    assert parts[1]["functionCall"]["name"] == "get_weather"


def test_a_signature_stays_on_the_text_when_no_call_is_left() -> None:
    parsed = parse_response(response(Reply(calls=(Call("delete_volume", PROD),)), "m",
                                     signatures=True))
    [part] = parts_of(json.loads(render_response(parsed, [decide(c) for c in parsed.calls])))
    assert part["thoughtSignature"] == SIGNATURE and "denied" in part["text"]


@pytest.mark.parametrize("finish", ["MAX_TOKENS", "MALFORMED_FUNCTION_CALL", "SAFETY", "OTHER"])
def test_a_call_under_any_finish_but_stop_is_denied(finish: str) -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Pa"}'),), finish_reason=finish)
    [call] = parse_response(response(turn, "m")).calls
    assert call.problem is not None and finish in call.problem
    assert decide(call).action is Action.DENY


def _one_part(part: str) -> bytes:
    return ('{"candidates": [{"content": {"parts": [' + part
            + ']}, "finishReason": "STOP"}]}').encode()


@pytest.mark.parametrize("part, problem", [
    ('{"functionCall": {"name": "get_weather", "args": {"city": "a", "city": "b"}}}',
     "duplicate key"),
    ('{"functionCall": {"name": "get_weather", "args": {"n": NaN}}}', "not valid JSON"),
    ('{"functionCall": {"name": "get_weather", "args": [1]}}', "must be a JSON object"),
    ('{"functionCall": {"name": "get_weather", "args": null}}', "must be a JSON object"),
    ('{"functionCall": {"name": "get_weather", "args": {}, "willContinue": true}}', "in pieces"),
    ('{"functionCall": {"name": "get_weather", "partialArgs": [{"jsonPath": "$.a"}]}}',
     "in pieces"),
])
def test_bad_arguments_are_a_problem(part: str, problem: str) -> None:
    [call] = parse_response(_one_part(part)).calls
    assert call.problem is not None and problem in call.problem and call.arguments is None
    assert decide(call).action is Action.DENY


def test_snake_case_function_call_is_a_call_too() -> None:
    # Google's parser and the SDK accept both spellings, so tether must see both.
    [call] = parse_response(_one_part('{"function_call": {"name": "delete_volume", "args": '
                                      + PROD + '}, "thought_signature": "c2ln"}')).calls
    assert call.name == "delete_volume" and decide(call).action is Action.DENY


def test_no_args_is_an_empty_object() -> None:
    [call] = parse_response(_one_part('{"functionCall": {"name": "list_volumes"}}')).calls
    assert call.raw_arguments == "" and call.arguments == {} and call.problem is None


@pytest.mark.parametrize("body", [
    b"<html>oops</html>",
    b'{"modelVersion": "m"}',
    b'{"candidates": {}}',
    b'{"candidates": [5]}',
    b'{"candidates": [], "candidates": []}',
    b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "a"}, '
    b'"functionCall": {"name": "b"}}]}}]}',
    b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": "a"}, '
    b'"function_call": {"name": "b"}}]}}]}',
    b'{"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]}',
    b'{"candidates": [{"content": {"parts": [{"functionCall": {"name": 5}}]}}]}',
    b'{"candidates": [{"index": 0}, {"index": 0}]}',
    b'{"candidates": [{"finishReason": 1}]}',
    b'{"candidates": []} {"candidates": []}',
    b'{"candidates": [], "usageMetadata": {"promptTokenCount": 1, "promptTokenCount": 2}}',
    b'{"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}',
    b'{"candidates": [{"content": {"parts": [{"text": "\xff"}]}}]}',
    b'{"candidates": [{"content": {"parts": [{"text": NaN}]}}]}',
])
def test_unreadable_responses_fail_closed(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response(body)


def test_a_blocked_prompt_without_candidates_is_a_valid_answer() -> None:
    parsed = parse_response(b'{"promptFeedback": {"blockReason": "SAFETY"}}')
    assert parsed.calls == ()


# --- the JSON array splitter ------------------------------------------------------------

ARRAY = ('[{"a": "]},[{\\"\\\\", "b": [1, {"c": {}}]}\n,\r\n{"u": "漢字 ✓"}\n, {}\n]\n').encode()


def test_splitter_finds_elements_and_keeps_the_framing() -> None:
    splitter = JSONArraySplitter()
    elements = splitter.feed(ARRAY)
    assert [(e.lead, json.loads(e.text)) for e in elements] == [
        ("[", {"a": ']},[{"\\', "b": [1, {"c": {}}]}), ("\n,\r\n", {"u": "漢字 ✓"}),
        ("\n, ", {})]
    assert splitter.ended and splitter.take_framing() == "\n]\n"
    splitter.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(ARRAY)), max_size=40))
def test_splitter_any_chunking_gives_the_same_elements(cuts: list[int]) -> None:
    splitter = JSONArraySplitter()
    elements = [e for piece in split_at(ARRAY, cuts) for e in splitter.feed(piece)]
    assert elements == JSONArraySplitter().feed(ARRAY)
    assert splitter.ended


@pytest.mark.parametrize("data, message", [
    (b'{"a": 1}', "'\\{' where '\\[' was expected"),
    (b'[1, 2]', "'1' where an object or"),
    (b'[{} {}]', "'\\{' where ',' or"),
    (b'[{},]', "'\\]' where an object"),
    (b'[{}] x', "nothing after"),
    (b'[{"a": "\xff"}]', "not valid UTF-8"),
    (b"[" + b" " * 70000, "whitespace"),
])
def test_splitter_refuses_what_is_not_an_array_of_objects(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        JSONArraySplitter().feed(data)


def test_splitter_limits_an_element_and_notices_a_cut() -> None:
    with pytest.raises(ProtocolError, match="longer than"):
        JSONArraySplitter(max_element=100).feed(b'[{"a": "' + b"x" * 200)
    splitter = JSONArraySplitter()
    splitter.feed(b'[{"a": 1}, {"b":')
    with pytest.raises(ProtocolError, match="before its closing"):
        splitter.close()


# --- streams ----------------------------------------------------------------------------


def chunks_of(run: Run, sse: bool) -> list[dict[str, Any]]:
    """The response chunks the client receives; an array's output must be valid JSON."""
    if sse:
        return [json.loads(e.data) for e in SSEDecoder().feed(run.output)]
    value = json.loads(run.output)
    assert isinstance(value, list)
    return value


def released(data: bytes, sse: bool) -> str:
    """What the client reads: the events' data (SSE), or the body (array)."""
    if sse:
        return "\n".join(e.data for e in SSEDecoder().feed(data))
    return data.decode()


def calls_and_text(chunks: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], str]:
    calls, text = [], ""
    for chunk in chunks:
        for cand in chunk.get("candidates", []):
            content = cand.get("content") if isinstance(cand, dict) else None
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                if "functionCall" in part:
                    fc = part["functionCall"]
                    calls.append((fc["name"], json.dumps(fc.get("args", {}))))
                text += part.get("text", "")
    return calls, text


FORMS = pytest.mark.parametrize("sse", [True, False], ids=["sse", "array"])


@FORMS
def test_stream_releases_text_at_once_and_holds_calls_until_the_finish(sse: bool) -> None:
    pieces = stream_chunks(TURN, "m", sse=sse, finish_apart=True)
    stream = GeminiStream(sse)
    step = stream.feed(pieces[0])
    assert b"Chec" in step.data and not step.pending
    call_at = next(i for i, p in enumerate(pieces) if b"get_weather" in p)
    step = stream.feed(b"".join(pieces[1:call_at + 1]))
    assert b"get_weather" not in step.data and not step.pending
    step = stream.feed(b"".join(pieces[call_at + 1:]))
    assert [c.name for c in step.pending] == ["get_weather", "delete_volume", "list_volumes"]
    step = stream.decide([decide(c) for c in step.pending])
    assert ODD_ARGS in released(step.data, sse) and "denied by no-prod" in released(step.data, sse)


@FORMS
@pytest.mark.parametrize("split_calls", [False, True])
def test_stream_rewrites_denied_call_and_keeps_allowed_ones(sse: bool, split_calls: bool) -> None:
    pieces = stream_chunks(TURN, "m", sse=sse, split_calls=split_calls, signatures=True)
    run = run_stream(GeminiStream(sse), pieces, decide)
    assert [(n, a) for n, _, a in run.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]
    assert ODD_ARGS in released(run.output, sse) and PROD not in released(run.output, sse)
    calls, text = calls_and_text(chunks_of(run, sse))
    assert [n for n, _ in calls] == ["get_weather", "list_volumes"]
    assert text.startswith(TURN.content or "") and "'delete_volume' was denied by no-prod" in text


@FORMS
def test_stream_with_nothing_denied_passes_the_upstream_bytes(sse: bool) -> None:
    turn = Reply(content="Hi ✓", calls=(Call("get_weather", ODD_ARGS),))
    pieces = stream_chunks(turn, "m", sse=sse, signatures=True)
    run = run_stream(GeminiStream(sse), pieces, decide)
    expected = b"".join(pieces).replace(b"\r\n", b"\n") if sse else b"".join(pieces)
    assert run.output == expected


@FORMS
def test_stream_on_deny_error_ends_with_a_403_error_chunk(sse: bool) -> None:
    run = run_stream(GeminiStream(sse), stream_chunks(TURN, "m", sse=sse), strict)
    chunks = chunks_of(run, sse)
    assert chunks[-1]["error"]["code"] == 403
    assert chunks[-1]["error"]["status"] == "PERMISSION_DENIED"
    assert b"functionCall" not in run.output
    assert calls_and_text(chunks[:-1])[1] == TURN.content


@FORMS
def test_stream_cut_after_a_call_releases_nothing_of_it(sse: bool) -> None:
    pieces = stream_chunks(TURN, "m", sse=sse, finish_apart=True)
    cut = next(i for i, p in enumerate(pieces) if b"get_weather" in p) + 1
    run = run_stream(GeminiStream(sse), pieces[:cut], decide)
    assert b"get_weather" not in run.output
    chunks = chunks_of(run, sse)
    assert chunks[-1]["error"]["code"] == 502
    assert chunks[-1]["error"]["details"][0]["reason"] == "UPSTREAM_TRUNCATED"
    assert [(n, a) for n, _, a in run.decided] == [
        ("get_weather", "deny"), ("delete_volume", "deny"), ("list_volumes", "deny")]


@FORMS
def test_stream_cut_mid_chunk_is_an_error(sse: bool) -> None:
    data = b"".join(stream_chunks(TURN, "m", sse=sse))
    run = run_stream(GeminiStream(sse), [data[:data.index(b"delete_volume")]], decide)
    assert b"get_weather" not in run.output
    assert chunks_of(run, sse)[-1]["error"]["code"] == 502


def test_sse_stream_without_a_finish_is_cut() -> None:
    turn = Reply(content="Hello there")
    pieces = stream_chunks(turn, "m", sse=True)
    run = run_stream(GeminiStream(True), pieces[:-1], decide)
    assert chunks_of(run, True)[-1]["error"]["details"][0]["reason"] == "UPSTREAM_TRUNCATED"
    whole = run_stream(GeminiStream(True), pieces, decide)
    assert b"error" not in whole.output


@FORMS
def test_error_chunk_inside_a_200_denies_held_calls_and_passes_the_error(sse: bool) -> None:
    pieces = stream_chunks(TURN, "m", sse=sse, finish_apart=True)
    cut = next(i for i, p in enumerate(pieces) if b"get_weather" in p) + 1
    error = '{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}'
    tail = f"data: {error}\r\n\r\n" if sse else f"\n,\r\n{error}\n]"
    run = run_stream(GeminiStream(sse), pieces[:cut] + [tail.encode()], decide)
    chunks = chunks_of(run, sse)
    assert chunks[-1]["error"]["message"] == "overloaded"
    assert b"get_weather" not in run.output
    assert {a for _, _, a in run.decided} == {"deny"}


@FORMS
def test_max_tokens_with_a_call_denies_it(sse: bool) -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Pa"}'),), finish_reason="MAX_TOKENS")
    run = run_stream(GeminiStream(sse), stream_chunks(turn, "m", sse=sse, finish_apart=True),
                     decide)
    assert run.decided == [("get_weather", '{"city": "Pa"}', "deny")]
    calls, text = calls_and_text(chunks_of(run, sse))
    assert calls == [] and "MAX_TOKENS" in text


@FORMS
@pytest.mark.parametrize("bad", [
    '{"candidates": [{"content": {"parts": [{"functionCall": {"name": "x"}, '
    '"functionCall": {"name": "y"}}]}}]}',
    '{"candidates": [{"content": {"parts": [{"text": }]}}]}',
    '{"candidates": "no"}',
])
def test_malformed_chunk_fails_closed(sse: bool, bad: str) -> None:
    pieces = stream_chunks(TURN, "m", sse=sse, finish_apart=True)
    cut = next(i for i, p in enumerate(pieces) if b"get_weather" in p) + 1
    tail = f"data: {bad}\n\n" if sse else f",{bad}]"
    run = run_stream(GeminiStream(sse), pieces[:cut] + [tail.encode()], decide)
    assert b"get_weather" not in run.output
    error = chunks_of(run, sse)[-1]["error"]
    assert error["details"][0]["reason"] == "BAD_UPSTREAM_STREAM"
    assert len(run.decided) == 3 and {a for _, _, a in run.decided} == {"deny"}


@FORMS
def test_a_call_after_its_candidate_finished_fails_the_stream(sse: bool) -> None:
    pieces = stream_chunks(Reply(content="done"), "m", sse=sse)
    late = stream_chunks(Reply(calls=(Call("get_weather", "{}"),)), "m", sse=sse)
    if not sse:
        pieces = pieces[:-1] + [b"," + late[0][1:]] + late[1:]
    else:
        pieces = pieces + late
    run = run_stream(GeminiStream(sse), pieces, decide)
    assert b"get_weather" not in run.output
    assert "after candidate 0 finished" in chunks_of(run, sse)[-1]["error"]["message"]


def test_garbage_after_the_array_is_noted_not_sent() -> None:
    pieces = stream_chunks(Reply(content="done"), "m", sse=False)
    stream = GeminiStream(False)
    run = run_stream(stream, pieces + [b"\n", b"x"], decide)
    assert json.loads(run.output)[0]["candidates"][0]["content"]["parts"] == [{"text": "done"}]
    assert run.output.endswith(b"]\n") and stream.failed is not None


def test_two_candidates_are_decided_each_at_its_finish() -> None:
    other = Reply(calls=(Call("delete_volume", PROD), Call("get_weather", '{"city": "Rome"}')))
    body = response((TURN, other), "m")
    for sse in (True, False):
        run = run_stream(GeminiStream(sse), stream_chunks((TURN, other), "m", sse=sse), decide)
        assert run.decided == decisions_of(body)
        kept = [[p["functionCall"]["name"] for p in c["candidates"][0]["content"]["parts"]
                 if "functionCall" in p] for c in chunks_of(run, sse)]
        assert [k for k in kept if k] == [["get_weather", "list_volumes"], ["get_weather"]]


def test_usage_comes_from_the_last_chunk() -> None:
    stream = GeminiStream(True)
    run_stream(stream, stream_chunks(TURN, "m", sse=True), decide)
    assert stream.usage is not None and stream.usage.output_tokens == 12


# --- any chunking: same output, same decisions as the whole answer ----------------------

LAYOUTS = [(sse, split, apart) for sse in (True, False) for split in (False, True)
           for apart in (False, True)]
RECORDED = {layout: b"".join(stream_chunks(TURN, "m", sse=layout[0], split_calls=layout[1],
                                           finish_apart=layout[2], signatures=True))
            for layout in LAYOUTS}
WHOLE = {layout: run_stream(GeminiStream(layout[0]), [data], decide)
         for layout, data in RECORDED.items()}
NONSTREAM = decisions_of(response(TURN, "m", signatures=True))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_rechunking_gives_same_output_and_decisions(data: st.DataObject) -> None:
    layout = data.draw(st.sampled_from(LAYOUTS))
    recorded = RECORDED[layout]
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(recorded)), max_size=80))
    run = run_stream(GeminiStream(layout[0]), split_at(recorded, cuts), decide)
    assert run.output == WHOLE[layout].output
    assert run.decided == WHOLE[layout].decided == NONSTREAM


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_byte_per_read_gives_same_output_and_decisions(layout: tuple[bool, bool, bool]
                                                           ) -> None:
    recorded = RECORDED[layout]
    run = run_stream(GeminiStream(layout[0]), [recorded[i:i + 1] for i in range(len(recorded))],
                     decide)
    assert run.output == WHOLE[layout].output
    assert run.decided == NONSTREAM
    chunks_of(run, layout[0])  # and it is still a valid stream


def test_route_picks_the_stream_form() -> None:
    provider = GeminiProvider()
    for query, sse in (({"alt": "sse"}, True), ({}, False)):
        route: Route = provider.route("POST", "v1beta/models/m:streamGenerateContent", query)
        stream = GEMINI.stream(route)
        run = run_stream(stream, stream_chunks(TURN, "m", sse=sse), decide)
        assert stream.failed is None and len(run.decided) == 3


@FORMS
def test_stream_moves_a_denied_calls_signature_across_chunks(sse: bool) -> None:
    turn = Reply(calls=(Call("delete_volume", PROD), Call("get_weather", '{"city": "Oslo"}')))
    pieces = stream_chunks(turn, "m", sse=sse, split_calls=True, signatures=True)
    run = run_stream(GeminiStream(sse), pieces, decide)
    parts = [p for c in chunks_of(run, sse) for p in c["candidates"][0]["content"]["parts"]]
    denied = next(p for p in parts if "denied" in p.get("text", ""))
    kept = next(p for p in parts if "functionCall" in p)
    assert "thoughtSignature" not in denied and kept["thoughtSignature"] == SIGNATURE


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mangled_stream_never_leaks_an_undecided_call(data: st.DataObject) -> None:
    """Bytes replaced anywhere: no exception, a valid stream out, and every call the
    client sees was decided and allowed."""
    layout = data.draw(st.sampled_from(LAYOUTS))
    recorded = RECORDED[layout]
    start = data.draw(st.integers(min_value=0, max_value=len(recorded)))
    end = data.draw(st.integers(min_value=start, max_value=min(len(recorded), start + 40)))
    junk = data.draw(st.binary(max_size=6) | st.sampled_from(
        [b"", b'"', b"}", b"{", b"]", b",", b"\n\n", b"\\", b'"functionCall": {"name": "x"}, ']))
    mangled = recorded[:start] + junk + recorded[end:]
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(mangled)), max_size=10))
    run = run_stream(GeminiStream(layout[0]), split_at(mangled, cuts), decide)
    calls, _ = calls_and_text(chunks_of(run, layout[0]))
    released = Counter(name for name, _ in calls)
    assert released <= Counter(name for name, _, action in run.decided if action == "allow")
