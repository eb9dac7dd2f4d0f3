"""Bedrock InvokeModel for Anthropic models (providers/bedrock_invoke.py), without a socket:
routes, requests, whole answers, and the stream engine reading Messages events out of
AWS event-stream `chunk` frames, re-chunked at random."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.fake_bedrock_invoke import invoke_body, invoke_frames, invoke_problem
from proxy.errors import BadRequest
from proxy.model import Action, Decision, OnDeny, ToolCall
from proxy.providers.base import RouteKind
from proxy.providers.bedrock import BedrockProvider
from proxy.providers.bedrock_invoke import INVOKE, is_anthropic
from proxy.providers.bedrock_stream import exception_frame
from proxy.providers.eventstream import EventStreamDecoder, encode, event
from tests.fakes import Call, Reply
from tests.streaming import Run, run_stream, split_at
from tests.test_bedrock import decide

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROVIDER = BedrockProvider()
TURN = Reply(
    content="Checking the weather, then cleaning up. Ünïcödé ✓ 漢字",
    calls=(
        Call("get_weather", '{"city": "Zürich", "units": "metric"}'),
        Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}'),
        Call("list_volumes", "{}"),
    ),
)
FRAMES = invoke_frames(TURN, MODEL, fragment=2)
RECORDED = b"".join(FRAMES)
ROUTE = PROVIDER.route("POST", f"model/{MODEL}/invoke-with-response-stream", {})
BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 512,
        "messages": [{"role": "user", "content": "clean up"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}


def frames(output: bytes) -> list[tuple[str, Any]]:
    """(Messages event type, event) per chunk frame; exceptions as ('!' + name, message)."""
    decoder = EventStreamDecoder()
    out: list[tuple[str, Any]] = []
    for m in decoder.feed(output):
        body = json.loads(m.payload)
        if m.text(":message-type") == "event":
            assert m.text(":event-type") == "chunk"
            inner = json.loads(base64.b64decode(body["bytes"]))
            out.append((inner["type"], inner))
        else:
            out.append(("!" + (m.text(":exception-type") or m.text(":error-code") or ""),
                        body["message"]))
    decoder.flush()
    return out


def blocks(output: bytes) -> dict[int, dict[str, Any]]:
    """Content blocks by index, as the Anthropic SDK builds them from the events."""
    out: dict[int, dict[str, Any]] = {}
    for kind, e in frames(output):
        if kind == "content_block_start":
            out[e["index"]] = {**e["content_block"], "partial": ""}
        elif kind == "content_block_delta":
            delta = e["delta"]
            block = out[e["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                block["partial"] += delta["partial_json"]
    return out


def run(pieces: list[bytes], how: Any = decide) -> Run:
    return run_stream(INVOKE.stream(ROUTE), pieces, how)


# --- routes and requests ------------------------------------------------------------------


@pytest.mark.parametrize("model, governed", [
    (MODEL, True),
    ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", True),
    ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
     "us.anthropic.claude-3-5-sonnet-20240620-v1:0", True),
    ("meta.llama3-70b-instruct-v1:0", False),
    ("amazon.titan-text-express-v1", False),
    ("arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123", False),
    ("anthropicfoo.x", False),
])
@pytest.mark.parametrize("operation, stream", [("invoke", False),
                                               ("invoke-with-response-stream", True)])
def test_invoke_is_governed_for_anthropic_models_only(model: str, governed: bool,
                                                      operation: str, stream: bool) -> None:
    assert is_anthropic(model) is governed
    path = f"model/{model.replace(':', '%3A').replace('/', '%2F')}/{operation}"
    route = PROVIDER.route("POST", path, {})
    if governed:
        assert (route.kind, route.format, route.model, route.stream, route.upstream_path) == (
            RouteKind.GOVERNED, INVOKE, model, stream, path)
    else:
        assert (route.kind, route.status) == (RouteKind.REFUSE, 501)
        assert "Anthropic models" in route.message


def test_a_near_miss_of_invoke_is_not_found() -> None:
    for path in (f"model/{MODEL}/x/invoke", "model/invoke", f"model/{MODEL}/Invoke"):
        route = PROVIDER.route("POST", path, {})
        assert (route.kind, route.status) == (RouteKind.REFUSE, 404), path
    assert PROVIDER.route("GET", f"model/{MODEL}/invoke", {}).status == 404


def test_parse_request_takes_model_and_stream_from_the_route() -> None:
    parsed = INVOKE.parse_request(json.dumps(BODY).encode(), ROUTE)
    assert (parsed.model, parsed.stream, parsed.declared_tools, parsed.max_output_tokens) == (
        MODEL, True, ("get_weather",), 512)
    assert invoke_problem(BODY) is None


@pytest.mark.parametrize("body, needle", [
    (b"[]", "JSON object"),
    (b"{", "not valid JSON"),
    (json.dumps({"prompt": "\n\nHuman: hi"}).encode(), "anthropic_version"),
    (json.dumps({**BODY, "tools": {}}).encode(), "'tools' must be an array"),
])
def test_bad_invoke_bodies_are_refused(body: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        INVOKE.parse_request(body, ROUTE)


@pytest.mark.parametrize("edit, needle", [
    ({"model": MODEL}, "extraneous key [model]"),
    ({"stream": True}, "extraneous key [stream]"),
    ({"anthropic_version": "2023-06-01"}, "anthropic_version"),
])
def test_the_fake_refuses_what_bedrock_refuses(edit: dict[str, object], needle: str) -> None:
    problem = invoke_problem({**BODY, **edit})
    assert problem is not None and needle in problem


def test_whole_answers_are_read_and_rewritten_as_anthropic_ones() -> None:
    parsed = INVOKE.parse_response(invoke_body(TURN, MODEL))
    decisions = [decide(c) for c in parsed.calls]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.DENY, Action.ALLOW]
    out = json.loads(INVOKE.render_response(parsed, decisions))
    assert [b["type"] for b in out["content"]] == ["text", "tool_use", "text", "tool_use"]
    assert out["content"][2]["text"].startswith("[tether] The tool call 'delete_volume'")
    error = INVOKE.denied_error(parsed.calls, decisions)
    assert (error.status, error.headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException")


# --- streams ------------------------------------------------------------------------------


def test_stream_rewrites_the_denied_call_and_releases_the_allowed_ones() -> None:
    result = run([RECORDED])
    got = blocks(result.output)
    assert [b["type"] for b in got.values()] == ["text", "tool_use", "text", "tool_use"]
    assert json.loads(got[1]["partial"]) == {"city": "Zürich", "units": "metric"}
    assert got[2]["text"].startswith("[tether] The tool call 'delete_volume' was denied")
    assert got[3]["partial"] == "{}"
    kinds = [k for k, _ in frames(result.output)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    stop = [e for k, e in frames(result.output) if k == "message_stop"][0]
    assert "amazon-bedrock-invocationMetrics" in stop  # the upstream's own event, passed on
    assert [(n, a) for n, _, a in result.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]


def test_on_deny_error_ends_the_stream_with_access_denied() -> None:
    def refuse(call: ToolCall) -> Decision:
        return Decision(Action.DENY, ("r",), "no", on_deny=OnDeny.ERROR)

    stream = INVOKE.stream(ROUTE)
    result = run_stream(stream, [RECORDED], refuse)
    last = frames(result.output)[-1]
    assert last[0] == "!AccessDeniedException" and "'get_weather' was denied by r" in last[1]
    assert stream.failed == "tool call denied"


def test_a_cut_stream_releases_nothing_of_the_open_call() -> None:
    cut = next(i for i, f in enumerate(FRAMES) if b"input_json_delta" in base64.b64decode(
        json.loads(EventStreamDecoder().feed(f)[0].payload)["bytes"]))
    stream = INVOKE.stream(ROUTE)
    result = run_stream(stream, [b"".join(FRAMES[:cut + 1])], decide)
    out = frames(result.output)
    assert out[-1][0] == "!modelStreamErrorException"
    assert "ended before the response was complete" in out[-1][1]
    assert all(b["type"] == "text" for b in blocks(result.output).values())
    [(name, raw, action)] = result.decided
    assert (name, action) == ("get_weather", "deny") and raw == ""  # its first delta is empty


def test_an_upstream_exception_frame_is_passed_on_and_open_calls_denied() -> None:
    exc = exception_frame("slow down", "throttlingException")
    stream = INVOKE.stream(ROUTE)
    result = run_stream(stream, [b"".join(FRAMES[:6]), exc, b"".join(FRAMES[6:])], decide)
    assert frames(result.output)[-1] == ("!throttlingException", "slow down")
    assert stream.failed == "the upstream sent an error event mid-stream"
    assert all(a == "deny" for _, _, a in result.decided)


@pytest.mark.parametrize("frame, needle", [
    (encode(event("chunk", b'{"bytes": "not base64!"}')), "cannot be read"),
    (encode(event("chunk", b'{"bytes": "e30=", "bytes": "e30="}')), "cannot be read"),
    (encode(event("metadata", b"{}")), "is not a chunk event"),
    (encode(event("chunk", json.dumps({"bytes": base64.b64encode(
        b'{"type": "message_stop"}').decode()}).encode())), "message_stop"),
])
def test_unreadable_frames_fail_closed(frame: bytes, needle: str) -> None:
    stream = INVOKE.stream(ROUTE)
    result = run_stream(stream, [frame], decide)
    assert stream.failed is not None and needle in stream.failed
    assert frames(result.output)[-1][0] == "!modelStreamErrorException"


WHOLE = run([RECORDED])


def _whole_decisions(turn: Reply) -> list[tuple[str, str, str]]:
    parsed = INVOKE.parse_response(invoke_body(turn, MODEL))
    return [(c.name, c.raw_arguments, decide(c).action.value) for c in parsed.calls]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=60))
def test_any_rechunking_gives_same_output_and_decisions(cuts: list[int]) -> None:
    result = run(split_at(RECORDED, cuts))
    assert result.output == WHOLE.output
    assert result.decided == WHOLE.decided == _whole_decisions(TURN)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(RECORDED) - 1), st.integers(1, 255),
       st.booleans(), st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=10))
def test_any_corruption_or_cut_releases_only_allowed_calls(
        at: int, xor: int, truncate: bool, cuts: list[int]) -> None:
    data = RECORDED[:at] if truncate else (
        RECORDED[:at] + bytes((RECORDED[at] ^ xor,)) + RECORDED[at + 1:])
    stream = INVOKE.stream(ROUTE)
    result = run_stream(stream, split_at(data, cuts), decide)
    out = frames(result.output)  # always a well-formed event stream
    allowed = {n for n, _, a in result.decided if a == "allow"}
    released = {e["content_block"]["name"] for k, e in out
                if k == "content_block_start" and e["content_block"]["type"] == "tool_use"}
    assert released <= allowed
    if stream.failed is not None:
        assert out[-1][0].startswith("!")
    else:
        assert out[-1][0] == "message_stop"
