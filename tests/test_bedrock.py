"""The Bedrock Converse provider without a socket: routes, errors, requests, whole answers,
the event-stream filter, and property tests (any re-chunking, any corruption)."""

from __future__ import annotations

import json
from typing import Any

import botocore.session
import pytest
from botocore.parsers import RestJSONParser
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.fake_bedrock import converse_body, stream_frames
from proxy.errors import BadRequest, UpstreamError
from proxy.model import Action, Decision, Exchange, OnDeny, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import load_yaml
from proxy.providers.base import Route, RouteKind
from proxy.providers.bedrock import (
    CONVERSE,
    BedrockProvider,
    parse_request,
    parse_response,
    render_response,
)
from proxy.providers.bedrock_stream import ConverseStream
from proxy.providers.eventstream import EventStreamDecoder, Header, Message, encode, event
from tests.fakes import Call, Reply
from tests.streaming import Run, run_stream, split_at

RULES = """
- id: no-prod
  match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
  action: deny
  message: not production
"""
DECLARED = ("get_weather", "delete_volume", "list_volumes")
EXCHANGE = Exchange(provider="bedrock", model="m", declared_tools=DECLARED)
ENGINE: PolicyEngine | None = None


def decide(call: ToolCall) -> Decision:
    global ENGINE
    if ENGINE is None:
        raw = load_yaml(RULES, "rules.yaml")
        assert isinstance(raw, list)
        ENGINE = PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 1) for r in raw)))
    return ENGINE.decide(call, EXCHANGE)


TURN = Reply(
    content="Checking the weather, then cleaning up. Ünïcödé ✓ 漢字",
    calls=(
        Call("get_weather", '{"city": "Zürich", "units": "metric"}'),
        Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}'),
        Call("list_volumes", "{}"),
    ),
)
FRAMES = stream_frames(TURN, fragment=2)
RECORDED = b"".join(FRAMES)
PROVIDER = BedrockProvider()


def events(output: bytes) -> list[tuple[str, Any]]:
    """(event type, payload) per frame; exceptions as ('!' + name, message)."""
    decoder = EventStreamDecoder()
    out: list[tuple[str, Any]] = []
    for m in decoder.feed(output):
        body = json.loads(m.payload) if m.payload else {}
        if m.text(":message-type") == "event":
            out.append((m.text(":event-type") or "", body))
        else:
            name = m.text(":exception-type") or m.text(":error-code") or ""
            out.append(("!" + name, body.get("message")))
    decoder.flush()
    return out


def run(pieces: list[bytes], how: Any = decide) -> Run:
    return run_stream(ConverseStream(), pieces, how)


def blocks(output: bytes) -> dict[int, dict[str, Any]]:
    """The content blocks a client puts together from the stream."""
    out: dict[int, dict[str, Any]] = {}
    for kind, body in events(output):
        if kind == "contentBlockStart":
            start = body["start"]
            out[body["contentBlockIndex"]] = ({"tool": start["toolUse"]["name"], "input": ""}
                                              if "toolUse" in start else {"start": start})
        elif kind == "contentBlockDelta":
            block = out.setdefault(body["contentBlockIndex"], {})
            delta = body["delta"]
            if "text" in delta:
                block["text"] = block.get("text", "") + str(delta["text"])
            elif "toolUse" in delta:  # a toolUse delta without its start counts as released too
                block.setdefault("tool", None)
                block["input"] = block.get("input", "") + delta["toolUse"]["input"]
    return out


def stop_reason(output: bytes) -> str | None:
    return next((b["stopReason"] for k, b in events(output) if k == "messageStop"), None)


# --- routes and errors --------------------------------------------------------------------

ARN = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.x-v1%3A0"


@pytest.mark.parametrize("method, path, kind, status, model, stream", [
    ("POST", "model/anthropic.claude-v2%3A1/converse", RouteKind.GOVERNED, 0, "anthropic.claude-v2:1",
     False),
    ("POST", "model/m/converse-stream", RouteKind.GOVERNED, 0, "m", True),
    ("POST", f"model/{ARN}/converse-stream", RouteKind.GOVERNED, 0,
     "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.x-v1:0", True),
    ("GET", "model/m/converse", RouteKind.REFUSE, 404, None, None),
    ("POST", "model/m/CONVERSE", RouteKind.REFUSE, 404, None, None),
    ("POST", "model/m/x/converse-stream", RouteKind.REFUSE, 404, None, None),
    ("POST", "models/m/converse", RouteKind.REFUSE, 404, None, None),
    ("POST", "model/m/invoke", RouteKind.REFUSE, 501, None, None),
    ("POST", "model/m/invoke-with-response-stream", RouteKind.REFUSE, 501, None, None),
    ("POST", "guardrail/g/version/1/apply", RouteKind.REFUSE, 501, None, None),
    ("GET", "async-invoke", RouteKind.REFUSE, 501, None, None),
    ("POST", "model/%FF/converse", RouteKind.REFUSE, 400, None, None),
])
def test_routes(method: str, path: str, kind: RouteKind, status: int, model: str | None,
                stream: bool | None) -> None:
    route = PROVIDER.route(method, path, {})
    assert route.kind is kind
    if kind is RouteKind.GOVERNED:
        assert (route.format, route.upstream_path, route.model, route.stream) == (
            CONVERSE, path, model, stream)
    else:
        assert route.status == status and route.message


def test_only_the_slash_escape_is_allowed_in_paths() -> None:
    assert PROVIDER.path_escapes == frozenset({"/"})


_SERVICE = botocore.session.get_session().get_service_model("bedrock-runtime")


def botocore_reads(status: int, headers: dict[str, str], body: bytes, operation: str = "Converse"
                   ) -> dict[str, Any]:
    shape = _SERVICE.operation_model(operation).output_shape
    lowered = {k.lower(): v for k, v in headers.items()}  # as botocore's HTTP layer gives them
    parsed: dict[str, Any] = RestJSONParser().parse(
        {"status_code": status, "headers": lowered, "body": body}, shape)
    return parsed


@pytest.mark.parametrize("status, code", [
    (400, "ValidationException"), (403, "AccessDeniedException"),
    (404, "ResourceNotFoundException"), (413, "ValidationException"),
    (429, "ThrottlingException"), (500, "InternalServerException"),
    (501, "InternalServerException"), (502, "InternalServerException"),
    (503, "ServiceUnavailableException"),
])
def test_errors_have_bedrocks_shape(status: int, code: str) -> None:
    reply = PROVIDER.error(status, "what went wrong", "tether_code")
    assert reply.status == status and json.loads(reply.body) == {"message": "what went wrong"}
    error = botocore_reads(status, dict(reply.headers), reply.body)["Error"]
    assert error == {"Code": code, "Message": "what went wrong"}


# --- requests -----------------------------------------------------------------------------

GOVERNED = Route(RouteKind.GOVERNED, CONVERSE, model="m", stream=True)


def test_parse_request_reads_declared_tools_model_and_stream() -> None:
    body = json.dumps({"messages": [], "toolConfig": {"tools": [
        {"toolSpec": {"name": "a", "inputSchema": {"json": {}}}},
        {"cachePoint": {"type": "default"}},
        {"systemTool": {"name": "nova_grounding"}},
    ], "toolChoice": {"auto": {}}}}).encode()
    req = parse_request(body, GOVERNED)
    assert (req.model, req.stream, req.declared_tools) == ("m", True, ("a", "nova_grounding"))
    assert parse_request(b"{}", Route(RouteKind.GOVERNED, model="x", stream=False)).stream is False


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"x": {"a": 1, "a": 2}}', "duplicate key"),
    (b'{"toolConfig": []}', "'toolConfig' must be an object"),
    (b'{"toolConfig": {}}', "must be an array"),
    (b'{"toolConfig": {"tools": [1]}}', "tools\\[0\\] must be an object"),
    (b'{"toolConfig": {"tools": [{"toolSpec": {"name": 5}}]}}', "must be an object with a name"),
    (b"[" * 100000, "nested too deeply|not valid JSON"),
])
def test_bad_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body, GOVERNED)


# --- whole answers ------------------------------------------------------------------------


def test_parse_response_reads_tool_use_blocks_and_usage() -> None:
    parsed = parse_response(converse_body(TURN))
    assert [(c.index, c.name, c.arguments) for c in parsed.calls] == [
        (1, "get_weather", {"city": "Zürich", "units": "metric"}),
        (2, "delete_volume", {"volume_id": "vol-1", "tags": {"env": "production"}}),
        (3, "list_volumes", {}),
    ]
    assert parsed.calls[0].id == "tooluse_0000000000000000000000"
    assert parsed.usage is not None and (parsed.usage.input_tokens, parsed.usage.output_tokens) == (
        24, 12)


@pytest.mark.parametrize("body", [
    b"<html>oops</html>", b"[]", b'{"output": {}}', b'{"output": {"message": {"content": {}}}}',
    b'{"output": {"message": {"content": [1]}}}',
    b'{"output": {"message": {"content": [{"toolUse": {"name": "x"}}]}}}',
    b'{"output": {"message": {"content": []}}, "stopReason": "end_turn", "stopReason": "x"}',
])
def test_unreadable_answers_fail_closed(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response(body)


@pytest.mark.parametrize("raw, problem", [
    ('{"a": 1, "a": 2}', "duplicate key"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key"),
    ('["x"]', "must be a JSON object"),
    ('"text"', "must be a JSON object"),
    ("1e400", "not valid JSON"),
])
def test_bad_inputs_are_a_problem(raw: str, problem: str) -> None:
    parsed = parse_response(converse_body(Reply(calls=(Call("get_weather", raw),))))
    assert parsed.calls[0].problem is not None and problem in parsed.calls[0].problem
    assert decide(parsed.calls[0]).action is Action.DENY


def test_a_tool_use_without_input_is_a_problem() -> None:
    body = b'{"output": {"message": {"content": [{"toolUse": {"toolUseId": "t", "name": "n"}}]}}}'
    assert parse_response(body).calls[0].problem == "the toolUse block has no input"


def test_the_last_tool_use_of_a_cut_answer_is_a_problem() -> None:
    turn = Reply(calls=(Call("get_weather", "{}"), Call("list_volumes", "{}")),
                 finish_reason="max_tokens")
    parsed = parse_response(converse_body(turn))
    assert [c.problem for c in parsed.calls] == [
        None, "the response was cut off (stopReason max_tokens) at the end of a tool call"]


def test_render_replaces_denied_blocks_in_place_and_keeps_the_rest() -> None:
    body = converse_body(TURN)
    parsed = parse_response(body)
    out = json.loads(render_response(parsed, [decide(c) for c in parsed.calls]))
    content = out["output"]["message"]["content"]
    original = json.loads(body)["output"]["message"]["content"]
    assert content[0] == original[0] and content[1] == original[1] and content[3] == original[3]
    assert content[2] == {"text": "[tether] The tool call 'delete_volume' was denied by no-prod: "
                                  "not production. It was not executed."}
    assert out["stopReason"] == "tool_use"
    assert out["usage"] == json.loads(body)["usage"]


def test_render_with_every_call_denied_ends_the_turn() -> None:
    parsed = parse_response(converse_body(Reply(calls=(Call("delete_volume", "{}"),))))
    out = json.loads(render_response(parsed, [Decision(Action.DENY, ("r",), "no")]))
    assert out["stopReason"] == "end_turn"
    assert [list(b) for b in out["output"]["message"]["content"]] == [["text"]]


def test_render_all_allowed_returns_the_upstream_bytes() -> None:
    body = converse_body(Reply(calls=(Call("get_weather", '{ "city" :"Oslo"}'),)))
    parsed = parse_response(body)
    assert render_response(parsed, [decide(c) for c in parsed.calls]) is body


def test_denied_error_is_access_denied() -> None:
    parsed = parse_response(converse_body(Reply(calls=(Call("delete_volume", "{}"),))))
    decision = Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)
    reply = CONVERSE.denied_error(parsed.calls, [decision])
    error = botocore_reads(reply.status, dict(reply.headers), reply.body)["Error"]
    assert reply.status == 403 and error["Code"] == "AccessDeniedException"
    assert "'delete_volume' was denied by r: never" in error["Message"]


# --- streams ------------------------------------------------------------------------------


def test_text_is_released_at_once_and_tool_use_is_held() -> None:
    stream = ConverseStream()
    first_text = next(i for i, f in enumerate(FRAMES) if b'"text":"Chec' in f)
    step = stream.feed(b"".join(FRAMES[:first_text + 1]))
    assert b"Chec" in step.data and not step.pending
    start = next(i for i, f in enumerate(FRAMES) if b"get_weather" in f)
    step = stream.feed(b"".join(FRAMES[first_text + 1:start + 3]))
    assert b"get_weather" not in step.data and b"toolUse" not in step.data and not step.pending


def test_stream_rewrites_denied_block_and_re_emits_allowed_ones() -> None:
    result = run([RECORDED])
    assert [(n, a) for n, _, a in result.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]
    got = blocks(result.output)
    assert got[0] == {"text": TURN.content}
    assert got[1] == {"tool": "get_weather", "input": TURN.calls[0].arguments}
    assert got[2]["text"].startswith("[tether] The tool call 'delete_volume' was denied by no-prod")
    assert got[3] == {"tool": "list_volumes", "input": "{}"}
    kinds = [k for k, _ in events(result.output)]
    # An allowed block is re-emitted whole (start, one delta, stop); a denied one is text.
    assert kinds[kinds.index("contentBlockStop") + 1:] == [
        "contentBlockStart", "contentBlockDelta", "contentBlockStop",
        "contentBlockDelta", "contentBlockStop",
        "contentBlockStart", "contentBlockDelta", "contentBlockStop",
        "messageStop", "metadata"]
    assert stop_reason(result.output) == "tool_use"
    stream = ConverseStream()
    run_stream(stream, [RECORDED], decide)
    assert stream.usage is not None and stream.usage.output_tokens == 12 and stream.failed is None


def test_text_frames_pass_byte_for_byte() -> None:
    result = run([RECORDED])
    for frame in FRAMES:
        if b'"text"' in frame or b"messageStart" in frame or b"metadata" in frame:
            assert frame in result.output


def test_stream_with_every_call_denied_ends_the_turn() -> None:
    turn = Reply(calls=(Call("delete_volume", '{"tags": {"env": "production"}}'),))
    result = run(stream_frames(turn))
    assert stop_reason(result.output) == "end_turn"
    assert b"toolUse" not in result.output


def test_stream_on_deny_error_ends_with_access_denied() -> None:
    def strict(call: ToolCall) -> Decision:
        return Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)

    result = run(stream_frames(TURN), strict)
    last = events(result.output)[-1]
    assert last[0] == "!AccessDeniedException" and "never" in last[1]
    assert b"toolUse" not in result.output and len(result.decided) == 1


@pytest.mark.parametrize("cut_after", ["get_weather", "delete_volume"])
def test_stream_cut_mid_call_releases_nothing_of_it(cut_after: str) -> None:
    cut = next(i for i, f in enumerate(FRAMES) if cut_after.encode() in f) + 2
    result = run([b"".join(FRAMES[:cut])])
    assert cut_after.encode() not in result.output
    assert events(result.output)[-1][0] == "!modelStreamErrorException"
    assert result.decided[-1][0] == cut_after and result.decided[-1][2] == "deny"


def test_a_stopped_block_at_the_end_of_a_cut_stream_is_denied() -> None:
    """Its stop arrived, but nothing after it: the answer is not known to be whole."""
    stop = max(i for i, f in enumerate(FRAMES) if b"contentBlockStop" in f)
    result = run([b"".join(FRAMES[:stop + 1])])
    assert result.decided[-1] == ("list_volumes", "{}", "deny")
    assert b"list_volumes" not in result.output


def test_max_tokens_denies_the_call_it_cut() -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Pa"}'),), finish_reason="max_tokens")
    result = run(stream_frames(turn))
    assert result.decided == [("get_weather", '{"city": "Pa"}', "deny")]
    assert b"toolUse" not in result.output and stop_reason(result.output) == "max_tokens"


def test_message_stop_with_a_block_still_open_denies_it() -> None:
    frames = [f for f in stream_frames(Reply(calls=(Call("get_weather", "{}"),)))
              if b"contentBlockStop" not in f]
    result = run(frames)
    assert result.decided == [("get_weather", "{}", "deny")]
    assert b"toolUse" not in result.output
    assert stop_reason(result.output) == "end_turn"


def test_corrupted_crc_denies_open_calls_and_ends_with_an_error() -> None:
    cut = next(i for i, f in enumerate(FRAMES) if b"delete_volume" in f) + 1
    bad = bytearray(FRAMES[cut])
    bad[20] ^= 0x01
    result = run([b"".join(FRAMES[:cut]) + bytes(bad) + b"".join(FRAMES[cut + 1:])])
    last = events(result.output)[-1]
    assert last == ("!modelStreamErrorException", "event stream frame has a bad message checksum")
    assert result.decided[-1][:1] == ("delete_volume",) and result.decided[-1][2] == "deny"
    assert b"delete_volume" not in result.output


def test_exception_frame_is_passed_on_and_open_calls_denied() -> None:
    cut = next(i for i, f in enumerate(FRAMES) if b"delete_volume" in f) + 1
    exc = encode(Message((Header.string(":exception-type", "throttlingException"),
                          Header.string(":content-type", "application/json"),
                          Header.string(":message-type", "exception")), b'{"message":"slow"}'))
    stream = ConverseStream()
    result = run_stream(stream, [b"".join(FRAMES[:cut]), exc, b"".join(FRAMES[cut:])], decide)
    assert result.output.endswith(exc)
    assert events(result.output)[-1] == ("!throttlingException", "slow")
    assert result.decided[-1][0] == "delete_volume" and result.decided[-1][2] == "deny"
    assert stream.failed == "the upstream sent throttlingException mid-stream"


def _ev(kind: str, payload: object) -> bytes:
    return encode(event(kind, json.dumps(payload).encode()))


START = _ev("contentBlockStart", {"contentBlockIndex": 0,
                                  "start": {"toolUse": {"toolUseId": "t", "name": "get_weather"}}})


@pytest.mark.parametrize("frames, needle", [
    ([_ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": "{}"}}})],
     "did not start as a toolUse"),
    ([START, _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})],
     "got a 'text' delta"),
    ([START, _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": 1}}})],
     "has no input text"),
    ([START, START], "started twice"),
    ([_ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "a", "toolUse": {}}})],
     "exactly one member"),
    ([_ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"hologram": {}}})],
     "'hologram' is not one tether can read"),
    ([_ev("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"name": "x"}}})],
     "no toolUseId or name"),
    ([_ev("contentBlockStart", {"contentBlockIndex": 0, "start": {"hologram": {}}})],
     "'hologram' is not one tether can read"),
    ([_ev("contentBlockDelta", {"delta": {"text": "x"}})], "no valid contentBlockIndex"),
    ([_ev("contentBlockDelta", {"contentBlockIndex": True, "delta": {"text": "x"}})],
     "no valid contentBlockIndex"),
    ([_ev("contentBlockStop", {"contentBlockIndex": 0}),
      _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})],
     "continued after its stop"),
    ([_ev("messageStop", {"stopReason": "end_turn"}),
      _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})],
     "after messageStop"),
    ([_ev("toolCall", {})], "'toolCall' is not one tether can read"),
    ([encode(event("metadata", b"{not json"))], "not valid JSON"),
    ([encode(event("metadata", b'{"usage": {}, "usage": {}}'))], "duplicate key"),
    ([encode(Message((Header.string(":message-type", "rumour"),)))], "message type 'rumour'"),
    ([encode(Message((Header.string(":message-type", "event"),), b"{}"))], "no :event-type"),
])
def test_protocol_violations_fail_closed(frames: list[bytes], needle: str) -> None:
    head = _ev("messageStart", {"role": "assistant"})
    result = run([head, *frames, *stream_frames(Reply(calls=(Call("get_weather", "{}"),)))[1:]])
    kind, message = events(result.output)[-1]
    assert kind == "!modelStreamErrorException" and needle in message
    assert "contentBlockStart" not in [k for k, _ in events(result.output)]


def test_interleaved_blocks_are_decided_per_block() -> None:
    frames = [
        _ev("messageStart", {"role": "assistant"}),
        START,
        _ev("contentBlockStart", {"contentBlockIndex": 1, "start": {
            "toolUse": {"toolUseId": "u", "name": "delete_volume"}}}),
        _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '{"ci'}}}),
        _ev("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {
            "input": '{"tags": {"env": "production"}}'}}}),
        _ev("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"text": "hello"}}),
        _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": 'ty": "Oslo"}'}}}),
        _ev("contentBlockStop", {"contentBlockIndex": 1}),
        _ev("contentBlockStop", {"contentBlockIndex": 0}),
        _ev("contentBlockStop", {"contentBlockIndex": 2}),
        _ev("messageStop", {"stopReason": "tool_use"}),
    ]
    result = run(frames)
    assert result.decided == [("delete_volume", '{"tags": {"env": "production"}}', "deny"),
                              ("get_weather", '{"city": "Oslo"}', "allow")]
    got = blocks(result.output)
    assert got[0] == {"tool": "get_weather", "input": '{"city": "Oslo"}'}
    assert "denied by no-prod" in got[1]["text"] and got[2] == {"text": "hello"}
    assert stop_reason(result.output) == "tool_use"


def test_reasoning_and_other_blocks_pass() -> None:
    frames = [
        _ev("messageStart", {"role": "assistant"}),
        _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "hm"}}}),
        _ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {
            "signature": "sig"}}}),
        _ev("contentBlockStop", {"contentBlockIndex": 0}),
        _ev("contentBlockStart", {"contentBlockIndex": 1, "start": {"image": {"format": "png"}}}),
        _ev("contentBlockStop", {"contentBlockIndex": 1}),
        _ev("messageStop", {"stopReason": "end_turn"}),
    ]
    result = run(frames)
    assert result.output == b"".join(frames) and result.decided == []


def test_a_stream_without_message_stop_is_truncated() -> None:
    frames = stream_frames(Reply(content="hi"))
    result = run(frames[:-2])
    assert events(result.output)[-1] == (
        "!modelStreamErrorException", "the upstream stream ended before the response was complete")


# --- properties ---------------------------------------------------------------------------


def _nonstream_decisions(turn: Reply) -> list[tuple[str, str, str]]:
    parsed = parse_response(converse_body(turn))
    return [(c.name, c.raw_arguments, decide(c).action.value) for c in parsed.calls]


WHOLE = run([RECORDED])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=60))
def test_any_rechunking_gives_same_output_and_decisions(cuts: list[int]) -> None:
    result = run(split_at(RECORDED, cuts))
    assert result.output == WHOLE.output
    assert result.decided == WHOLE.decided == _nonstream_decisions(TURN)


def test_one_byte_per_read_gives_same_output_and_decisions() -> None:
    result = run([RECORDED[i:i + 1] for i in range(len(RECORDED))])
    assert result.output == WHOLE.output
    assert result.decided == _nonstream_decisions(TURN)


CUT_TURN = Reply(calls=(Call("get_weather", '{"city": "Oslo"}'), Call("list_volumes", "{}")),
                 finish_reason="max_tokens")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_rechunked_cut_answers_decide_like_the_whole_answer(cuts: list[int]) -> None:
    data = b"".join(stream_frames(CUT_TURN))
    result = run(split_at(data, cuts))
    assert result.decided == _nonstream_decisions(CUT_TURN) == [
        ("get_weather", '{"city": "Oslo"}', "allow"), ("list_volumes", "{}", "deny")]
    assert result.output == run([data]).output


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(RECORDED) - 1), st.integers(1, 255),
       st.booleans(), st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=10))
def test_any_corruption_or_cut_gives_a_valid_stream_that_releases_only_allowed_calls(
        at: int, xor: int, truncate: bool, cuts: list[int]) -> None:
    data = RECORDED[:at] if truncate else (
        RECORDED[:at] + bytes((RECORDED[at] ^ xor,)) + RECORDED[at + 1:])
    stream = ConverseStream()
    result = run_stream(stream, split_at(data, cuts), decide)
    out = events(result.output)  # always a well-formed event stream
    allowed = {n for n, _, a in result.decided if a == "allow"}
    assert {b["start"]["toolUse"]["name"] for k, b in out if k == "contentBlockStart"} <= allowed
    if stream.failed is not None:
        assert out[-1][0].startswith("!")
    else:  # the corruption fell in a payload byte that still parsed alike: the answer is whole
        assert "messageStop" in [k for k, _ in out]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 3) | st.sampled_from(["", "x", "tool_use", "{}"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["a", "input"]),
                                                                 inner, max_size=2),
    max_leaves=4)
_index_values = st.sampled_from([0, 1, 2]) | _json
_starts = st.fixed_dictionaries({"toolUse": st.fixed_dictionaries({
    "toolUseId": st.sampled_from(["t1", "t2"]) | _json,
    "name": st.sampled_from(["get_weather", "delete_volume", "list_volumes"]) | _json})}) | \
    st.dictionaries(st.sampled_from(["image", "toolResult", "toolUse", "hologram"]), _json,
                    max_size=2) | _json
_deltas = st.fixed_dictionaries({"toolUse": st.fixed_dictionaries({"input": st.sampled_from(
    ['{"tags": {"env": "production"}}', "{", "}", '"a": 1', "{}"]) | _json})}) | \
    st.fixed_dictionaries({"text": st.text(max_size=3)}) | \
    st.dictionaries(st.sampled_from(["text", "reasoningContent", "toolUse", "x"]), _json,
                    max_size=2) | _json
_events = st.one_of(
    st.tuples(st.just("messageStart"), st.fixed_dictionaries({"role": st.just("assistant")})),
    st.tuples(st.just("contentBlockStart"),
              st.fixed_dictionaries({"contentBlockIndex": _index_values, "start": _starts})),
    st.tuples(st.just("contentBlockDelta"),
              st.fixed_dictionaries({"contentBlockIndex": _index_values, "delta": _deltas})),
    st.tuples(st.just("contentBlockStop"),
              st.fixed_dictionaries({"contentBlockIndex": _index_values})),
    st.tuples(st.just("messageStop"), st.fixed_dictionaries({"stopReason": st.sampled_from(
        ["tool_use", "end_turn", "max_tokens"]) | _json})),
    st.tuples(st.just("metadata"), st.fixed_dictionaries({"usage": _json})),
    st.tuples(st.sampled_from(["hologram", "ping"]), _json),
)


_BASE = [(k, b) for k, b in events(b"".join(stream_frames(Reply(content="ok", calls=(
    Call("get_weather", '{"city": "Oslo"}'),
    Call("delete_volume", '{"tags": {"env": "production"}}'),
    Call("list_volumes", "{}"))), fragment=6)))]
_edits = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("duplicate"), st.integers(0, 40)),
    st.tuples(st.just("swap"), st.integers(0, 40)),
    st.tuples(st.just("insert"), st.integers(0, 40), _events),
)


def _edited(edits: list[Any]) -> list[tuple[str, object]]:
    sequence: list[tuple[str, object]] = list(_BASE)
    for edit in edits:
        at = edit[1] % (len(sequence) + 1)
        if edit[0] == "insert":
            sequence.insert(at, edit[2])
        elif sequence and at < len(sequence):
            if edit[0] == "delete":
                del sequence[at]
            elif edit[0] == "duplicate":
                sequence.insert(at, sequence[at])
            elif at + 1 < len(sequence):
                sequence[at], sequence[at + 1] = sequence[at + 1], sequence[at]
    return sequence


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(_events, max_size=14), st.lists(_edits, max_size=3).map(_edited)),
       st.booleans())
def test_any_sequence_of_well_framed_events_is_handled_and_fails_closed(
        sequence: list[tuple[str, object]], one_byte: bool) -> None:
    """Whatever JSON the upstream puts in valid frames, in whatever order: no crash, a
    well-formed stream out, and no toolUse reaches the client unless its exact input was
    decided allow."""
    data = b"".join(_ev(kind, payload) for kind, payload in sequence)
    stream = ConverseStream()
    pieces = [data[i:i + 1] for i in range(len(data))] if one_byte else [data]
    result = run_stream(stream, pieces, decide)
    allowed = [(n, a) for n, a, verdict in result.decided if verdict == "allow"]
    released = [(b["tool"], b["input"]) for b in blocks(result.output).values() if "tool" in b]
    assert sorted(released) == sorted(allowed)
    out = events(result.output)
    if stream.failed is not None:
        assert out[-1][0] == "!modelStreamErrorException"
    else:
        assert "messageStop" in [k for k, _ in out]
