from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from anthropic.types.parsed_message import ParsedMessage
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.fake_anthropic import Call, Message, Reply, ServerCall, Thinking, message, stream_events
from proxy.errors import BadRequest, UpstreamError
from proxy.model import Action, Decision, Exchange, OnDeny, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import load_yaml
from proxy.providers.anthropic import AnthropicProvider, parse_request, parse_response, render_response
from proxy.providers.anthropic_stream import MessagesStream
from proxy.providers.base import RouteKind
from proxy.providers.sse import SSEDecoder, SSEEvent, encode
from tests.streaming import Run, run_stream, split_at

RULES = """
- id: no-prod
  match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
  action: deny
  message: not production
"""
DECLARED = ("get_weather", "delete_volume", "list_volumes", "web_search")


def engine() -> PolicyEngine:
    raw = load_yaml(RULES, "rules.yaml")
    assert isinstance(raw, list)
    return PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 1) for r in raw)))


EXCHANGE = Exchange(provider="anthropic", model="m", declared_tools=DECLARED)
ENGINE = engine()


def decide(call: ToolCall) -> Decision:
    return ENGINE.decide(call, EXCHANGE)


WEATHER = Call("get_weather", '{"city": "Zürich", "units": "metric"}')
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}')
TURN = Message((
    Thinking("The user wants the weather, then a clean-up."),
    "Checking the weather, then cleaning up. Ünïcödé ✓ 漢字",
    ServerCall("web_search", '{"query": "weather Zürich"}'),
    WEATHER,
    PROD_DELETE,
    Call("list_volumes", "{}"),
))
RECORDED = b"".join(stream_events(TURN, "m", fragment=2))


def events(run: Run) -> list[SSEEvent]:
    return SSEDecoder().feed(run.output)


def final_message(output: bytes) -> ParsedMessage[Any]:
    """What the official SDK's stream accumulator makes of the filtered stream."""
    snapshot: ParsedMessage[Any] | None = None
    bufs: dict[int, bytes] = {}
    for e in SSEDecoder().feed(output):
        if e.event in ("ping", "error"):
            continue
        event: RawMessageStreamEvent = json.loads(e.data)  # constructed by the SDK
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot


def error_of(run: Run) -> dict[str, Any]:
    last = events(run)[-1]
    assert last.event == "error"
    body = json.loads(last.data)
    assert body["type"] == "error"
    error: dict[str, Any] = body["error"]
    return error


# --- routes and errors ------------------------------------------------------------------


@pytest.mark.parametrize("method, path, kind, status", [
    ("POST", "v1/messages", RouteKind.GOVERNED, 0),
    ("POST", "v1/messages/count_tokens", RouteKind.PASS, 0),
    ("GET", "v1/models", RouteKind.PASS, 0),
    ("GET", "v1/models/claude-fake", RouteKind.PASS, 0),
    # Batches are judged by `upstreams.anthropic.batches` (tests/test_batches.py).
    ("POST", "v1/messages/batches", RouteKind.BATCH, 0),
    ("GET", "v1/messages/batches/msgbatch_1/results", RouteKind.BATCH, 0),
    ("POST", "v1/messages/batches/", RouteKind.REFUSE, 404),
    ("POST", "v1/Messages/Batches", RouteKind.REFUSE, 404),
    ("POST", "v1/messages/", RouteKind.REFUSE, 404),
    ("POST", "v1/Messages", RouteKind.REFUSE, 404),
    ("POST", "v2/messages", RouteKind.REFUSE, 404),
    ("POST", "messages", RouteKind.REFUSE, 404),
    ("POST", "v1/beta/messages", RouteKind.REFUSE, 404),
    ("GET", "v1/messages", RouteKind.REFUSE, 404),
])
def test_routes(method: str, path: str, kind: RouteKind, status: int) -> None:
    route = AnthropicProvider().route(method, path, {})
    assert route.kind is kind
    if kind is RouteKind.REFUSE:
        assert route.status == status and route.message
    else:
        assert route.upstream_path == path


@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error"),
    (500, "api_error"), (501, "api_error"), (502, "api_error"), (529, "overloaded_error"),
])
def test_errors_have_anthropics_shape_and_type(status: int, kind: str) -> None:
    reply = AnthropicProvider().error(status, "bad thing", "some_code")
    assert reply.status == status
    assert json.loads(reply.body) == {"type": "error",
                                      "error": {"type": kind, "message": "bad thing"}}


# --- requests ---------------------------------------------------------------------------


def test_parse_request_reads_tools_stream_and_user() -> None:
    body = json.dumps({
        "model": "claude-x", "stream": True, "max_tokens": 10, "messages": [],
        "metadata": {"user_id": "u-1"},
        "tools": [{"name": "a", "input_schema": {"type": "object"}},
                  {"type": "web_search_20250305", "name": "web_search"},
                  {"type": "mcp_toolset", "mcp_server_name": "s"}],
    }).encode()
    req = parse_request(body)
    assert (req.model, req.stream, req.user) == ("claude-x", True, "u-1")
    assert req.declared_tools == ("a", "web_search")


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "model": "n"}', "duplicate key"),
    (b'{"messages": []}', "'model' must be a string"),
    (b'{"model": 5}', "'model' must be a string"),
    (b'{"model": "m", "stream": "yes"}', "'stream' must be a boolean"),
    (b'{"model": "m", "tools": {}}', "'tools' must be an array"),
    (b'{"model": "m", "tools": [5]}', "tools\\[0\\] must be an object"),
    (b'{"model": "m", "tools": [{"name": 5}]}', "tools\\[0\\].name must be a string"),
    (b'{"model": "m", "metadata": "u"}', "'metadata' must be an object"),
    (b'{"model": "m", "metadata": {"user_id": 5}}', "user_id' must be a string"),
])
def test_bad_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body)


# --- whole responses --------------------------------------------------------------------


def test_parse_response_reads_tool_use_blocks_only() -> None:
    parsed = parse_response(message(TURN, "m"))
    # thinking 0, text 1, server_tool_use 2, its result 3, then the three tool_use blocks
    assert [(c.index, c.name, c.id) for c in parsed.calls] == [
        (4, "get_weather", "toolu_000000000000000000000003"),
        (5, "delete_volume", "toolu_000000000000000000000004"),
        (6, "list_volumes", "toolu_000000000000000000000005")]
    assert parsed.calls[0].arguments == {"city": "Zürich", "units": "metric"}
    assert parsed.usage is not None and parsed.usage.total_tokens == 36


def test_cached_input_tokens_count_as_input() -> None:
    body = json.loads(message(Reply(content="hi"), "m"))
    body["usage"].update(cache_creation_input_tokens=100, cache_read_input_tokens=1000)
    parsed = parse_response(json.dumps(body).encode())
    assert parsed.usage is not None and parsed.usage.input_tokens == 1124


@pytest.mark.parametrize("body, needle", [
    (b"<html>oops</html>", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"type": "message"}', "no 'content' array"),
    (b'{"content": [{"text": "x"}]}', "has no type"),
    (b'{"content": [{"type": "tool_use", "id": "t", "name": "a"}]}', "no id, name or input"),
    (b'{"content": [{"type": "tool_use", "id": "t", "name": "a", "input": "{}"}]}', "input"),
    (b'{"content": [{"type": "tool_use", "id": "t", "name": "a", "name": "b", "input": {}}]}',
     "no id, name or input"),
    (b'{"content": [], "stop_reason": "end_turn", "stop_reason": "tool_use"}', "duplicate key"),
    (b'{"content": [{"type": "text", "text": "a", "text": "b"}]}', "duplicate key"),
])
def test_unreadable_responses_fail_closed(body: bytes, needle: str) -> None:
    with pytest.raises(UpstreamError, match=needle):
        parse_response(body)


def test_render_keeps_allowed_blocks_and_replaces_denied_ones_in_place() -> None:
    parsed = parse_response(message(TURN, "m"))
    decisions = [decide(c) for c in parsed.calls]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.DENY, Action.ALLOW]
    out = json.loads(render_response(parsed, decisions))
    assert [b["type"] for b in out["content"]] == [
        "thinking", "text", "server_tool_use", "web_search_tool_result", "tool_use", "text",
        "tool_use"]
    assert out["content"][4]["input"] == json.loads(WEATHER.arguments)
    assert "'delete_volume' was denied by no-prod: not production" in out["content"][5]["text"]
    assert out["stop_reason"] == "tool_use"


def test_render_with_every_call_denied_ends_the_turn() -> None:
    parsed = parse_response(message(Reply(content="Deleting.", calls=(PROD_DELETE,)), "m"))
    out = json.loads(render_response(parsed, [decide(c) for c in parsed.calls]))
    assert [b["type"] for b in out["content"]] == ["text", "text"]
    assert out["stop_reason"] == "end_turn"


def test_render_all_allowed_returns_the_upstream_bytes() -> None:
    body = message(Reply(calls=(Call("get_weather", '{ "city" :"Oslo",  "n": 1.50e2 }'),)), "m")
    parsed = parse_response(body)
    assert render_response(parsed, [decide(c) for c in parsed.calls]) is body


@pytest.mark.parametrize("reason", ["max_tokens", "model_context_window_exceeded", "refusal"])
def test_the_last_call_of_a_cut_answer_is_cut_off(reason: str) -> None:
    turn = Message((WEATHER, Call("get_weather", '{"city": "Pa"}')), stop_reason=reason)
    parsed = parse_response(message(turn, "m"))
    assert parsed.calls[0].problem is None
    assert parsed.calls[1].problem and f"stop_reason {reason}" in parsed.calls[1].problem
    assert decide(parsed.calls[1]).action is Action.DENY


@pytest.mark.parametrize("raw, problem", [
    ('{"volume_id": "a", "volume_id": "b"}', "duplicate key 'volume_id'"),
    ('{"tags": {"env": "dev", "env": "production"}}', "duplicate key 'env'"),
    ('{"n": NaN}', "not valid JSON"),
])
def test_bad_input_in_a_whole_response_is_a_problem(raw: str, problem: str) -> None:
    parsed = parse_response(message(Reply(calls=(Call("get_weather", raw),)), "m"))
    [call] = parsed.calls
    assert call.problem is not None and problem in call.problem
    assert decide(call).action is Action.DENY
    # the stream path reaches the same verdict on the same text
    run = run_stream(MessagesStream(), stream_events(Reply(calls=(Call("get_weather", raw),)),
                                                     "m"), decide)
    assert run.decided == [("get_weather", raw, "deny")]


# --- streams ----------------------------------------------------------------------------


def test_stream_releases_text_at_once_and_holds_the_call() -> None:
    stream = MessagesStream()
    evs = stream_events(TURN, "m", fragment=2)
    first_text = next(i for i, e in enumerate(evs) if b'"text": "Chec' in e)
    step = stream.feed(b"".join(evs[: first_text + 1]))
    assert b"Chec" in step.data and not step.pending
    weather = next(i for i, e in enumerate(evs) if b"get_weather" in e)
    stop = next(i for i, e in enumerate(evs) if i > weather and b"content_block_stop" in e)
    step = stream.feed(b"".join(evs[first_text + 1: stop + 1]))
    assert b"get_weather" not in step.data and not step.pending
    assert b"web_search" in step.data  # the server tool passed
    step = stream.feed(evs[stop + 1])  # the next block's start completes the call
    assert [c.name for c in step.pending] == ["get_weather"] and step.data == b""


def test_stream_rewrites_denied_block_and_keeps_allowed_ones() -> None:
    run = run_stream(MessagesStream(), [RECORDED], decide)
    assert [(n, a) for n, _, a in run.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]
    deltas: dict[int, list[str]] = {}
    for e in events(run):
        body = json.loads(e.data)
        if body.get("delta", {}).get("type") == "input_json_delta":
            deltas.setdefault(body["index"], []).append(body["delta"]["partial_json"])
    # server tool fragments pass as they came; allowed calls arrive in one piece
    assert deltas[4] == [WEATHER.arguments] and deltas[6] == ["{}"]
    assert "".join(deltas[2]) == '{"query": "weather Zürich"}' and len(deltas[2]) > 2
    final = final_message(run.output)
    assert [b.type for b in final.content] == [
        "thinking", "text", "server_tool_use", "web_search_tool_result", "tool_use", "text",
        "tool_use"]
    tool = final.content[4]
    assert tool.type == "tool_use" and tool.input == json.loads(WEATHER.arguments)
    denied = final.content[5]
    assert denied.type == "text" and "'delete_volume' was denied by no-prod" in denied.text
    assert final.stop_reason == "tool_use"
    assert final.content[1].type == "text" and final.content[1].text.startswith("Checking")


def test_stream_all_denied_ends_the_turn() -> None:
    run = run_stream(MessagesStream(), stream_events(Reply(calls=(PROD_DELETE,)), "m"), decide)
    final = final_message(run.output)
    assert [b.type for b in final.content] == ["text"]
    assert final.stop_reason == "end_turn"
    assert b"tool_use" not in run.output


def test_stream_without_tool_use_passes_byte_for_byte() -> None:
    turn = Message((Thinking("hmm"), "Searching.", ServerCall("web_search", '{"query": "x"}'),
                    "Found it."))
    recorded = b"".join(stream_events(turn, "m"))
    run = run_stream(MessagesStream(), [recorded], decide)
    assert run.output == recorded and run.decided == []


def test_stream_on_deny_error_ends_with_a_permission_error_event() -> None:
    def strict(call: ToolCall) -> Decision:
        return Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)

    run = run_stream(MessagesStream(), stream_events(TURN, "m"), strict)
    error = error_of(run)
    assert error["type"] == "permission_error" and "never" in error["message"]
    assert b'"tool_use"' not in run.output and b"message_stop" not in run.output
    assert len(run.decided) == 1


def test_stream_cut_mid_call_releases_nothing_of_it() -> None:
    evs = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(evs) if b"delete_volume" in e) + 3
    run = run_stream(MessagesStream(), [b"".join(evs[:cut])], decide)
    assert b'"name": "delete_volume"' not in run.output
    error = error_of(run)
    assert error["type"] == "api_error" and "ended before" in error["message"]
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"
    assert 0 < len(run.decided[-1][1]) < len(PROD_DELETE.arguments)


def test_stream_cut_after_a_block_stop_denies_the_call() -> None:
    evs = stream_events(Reply(calls=(WEATHER,)), "m")
    stop = max(i for i, e in enumerate(evs) if b"content_block_stop" in e)
    run = run_stream(MessagesStream(), evs[: stop + 1], decide)
    assert run.decided == [("get_weather", WEATHER.arguments, "deny")]
    assert b"tool_use" not in run.output and error_of(run)["type"] == "api_error"


def test_max_tokens_after_the_last_call_denies_it() -> None:
    turn = Message((WEATHER, Call("get_weather", '{"city": "Pa"}')), stop_reason="max_tokens")
    run = run_stream(MessagesStream(), stream_events(turn, "m"), decide)
    assert run.decided == [("get_weather", WEATHER.arguments, "allow"),
                           ("get_weather", '{"city": "Pa"}', "deny")]
    final = final_message(run.output)
    assert [b.type for b in final.content] == ["tool_use", "text"]
    assert "cut off (stop_reason max_tokens)" in final.content[1].text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"


def test_max_tokens_with_the_call_still_open_denies_it() -> None:
    turn = Message((Call("get_weather", '{"city": "Paris"}'),), stop_reason="max_tokens")
    # No content_block_stop: the input text happens to be valid JSON, the cut still counts.
    evs = [e for e in stream_events(turn, "m") if b"content_block_stop" not in e]
    run = run_stream(MessagesStream(), evs, decide)
    assert run.decided == [("get_weather", '{"city": "Paris"}', "deny")]
    final = final_message(run.output)
    assert [b.type for b in final.content] == ["text"] and final.stop_reason == "max_tokens"
    assert [e.event for e in events(run)][-2:] == ["message_delta", "message_stop"]


def test_error_event_inside_a_200_denies_the_open_call_and_passes_the_error() -> None:
    evs = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(evs) if b"delete_volume" in e) + 2
    error = (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
             b'"message": "Overloaded"}}\n\n')
    run = run_stream(MessagesStream(), [b"".join(evs[:cut]), error], decide)
    assert error_of(run) == {"type": "overloaded_error", "message": "Overloaded"}
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"
    assert b'"name": "delete_volume"' not in run.output
    assert run.output.endswith(error)


def _start(index: int, block: str) -> bytes:
    return (f'event: content_block_start\ndata: {{"type": "content_block_start", "index": '
            f'{index}, "content_block": {block}}}\n\n').encode()


TOOL = '{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}'


@pytest.mark.parametrize("tail, needle", [
    (b"event: ping\ndata: {not json}\n\n", "not valid JSON"),
    (b'data: {"type": "message_delta", "delta": {}}\n\n', "carries data of type"),
    (b'event: message_stop\ndata: {"type": "message_delta", "delta": {}}\n\n',
     "carries data of type"),
    (_start(5, TOOL), "out of order"),
    (_start(1, '{"type": "tool_use", "id": "t", "name": "get_weather", '
               '"input": {"city": "Oslo"}}'), "starts with input"),
    (_start(1, '{"type": "tool_use", "name": "get_weather", "input": {}}'), "no id or name"),
    (_start(1, TOOL) + b'event: content_block_delta\ndata: {"type": "content_block_delta", '
     b'"index": 1, "delta": {"type": "text_delta", "text": "x"}}\n\n', "not input_json_delta"),
    (_start(1, TOOL) + _start(2, '{"type": "text", "text": ""}'), "still open"),
    (_start(1, TOOL) + b'event: content_block_stop\ndata: {"type": "content_block_stop", '
     b'"index": 1}\n\nevent: content_block_delta\ndata: {"type": "content_block_delta", '
     b'"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}\n\n',
     "right after tool_use block 1"),
    (_start(1, TOOL) + b'event: content_block_stop\ndata: {"type": "content_block_stop", '
     b'"index": 1}\n\nevent: message_stop\ndata: {"type": "message_stop"}\n\n',
     "right after tool_use block 1"),
    (b'event: message_stop\ndata: {"type": "message_stop"}\n\n', "before message_delta"),
    (b'event: message_delta\ndata: {"type": "error", "error": {"type": "api_error"}}\n\n',
     "carries data of type 'error'"),
    (b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 7, '
     b'"delta": {"type": "text_delta", "text": "x"}}\n\n', "not open"),
    (b'event: message_stop\ndata: {"type": "message_stop", "type": "ping"}\n\n',
     "duplicate key"),
    (b"event: ping\ndata: \xff\n\n", "UTF-8"),
])
def test_malformed_stream_data_fails_closed(tail: bytes, needle: str) -> None:
    head = b"".join(stream_events(Reply(content="hi"), "m")[:5])  # start, ping, text block
    run = run_stream(MessagesStream(), [head, tail], decide)
    error = error_of(run)
    assert error["type"] == "api_error" and needle in error["message"]
    assert b'"tool_use"' not in run.output
    assert all(action == "deny" for _, _, action in run.decided)
    if _start(1, TOOL) in tail:  # the held call was decided, as denied
        assert [name for name, _, _ in run.decided] == ["get_weather"]


def test_an_error_event_passes_even_when_its_data_is_not_json() -> None:
    head = stream_events(Reply(calls=(WEATHER,)), "m")[:4]  # the call is open
    error = b"event: error\ndata: upstream exploded\n\n"
    run = run_stream(MessagesStream(), [*head, error], decide)
    assert run.output.endswith(error) and run.output.count(b"event: error") == 1
    assert run.decided == [("get_weather", "", "deny")]


def test_events_before_message_start_are_refused() -> None:
    run = run_stream(MessagesStream(), [_start(0, '{"type": "text", "text": ""}')], decide)
    assert "before message_start" in error_of(run)["message"]


def test_usage_is_cumulative() -> None:
    stream = MessagesStream()
    run_stream(stream, [RECORDED], decide)
    assert stream.usage is not None
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (24, 12)


def test_unknown_event_types_pass() -> None:
    evs = stream_events(Reply(content="hi"), "m")
    odd = encode(SSEEvent('{"type": "future_thing", "x": 1}', event="future_thing"))
    run = run_stream(MessagesStream(), evs[:2] + [odd] + evs[2:], decide)
    assert run.output == b"".join(evs[:2] + [odd] + evs[2:])


# --- the property: any chunking, same bytes, same decisions as the whole answer ---------


def _nonstream_decisions(turn: Message) -> list[tuple[str, object, str]]:
    parsed = parse_response(message(turn, "m"))
    return [(c.name, c.arguments, decide(c).action.value) for c in parsed.calls]


def _decided(run: Run) -> list[tuple[str, object, str]]:
    return [(name, json.loads(raw), action) for name, raw, action in run.decided]


WHOLE = run_stream(MessagesStream(), [RECORDED], decide)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=60))
def test_any_rechunking_gives_same_output_and_decisions(cuts: list[int]) -> None:
    run = run_stream(MessagesStream(), split_at(RECORDED, cuts), decide)
    assert run.output == WHOLE.output
    assert run.decided == WHOLE.decided
    assert _decided(run) == _nonstream_decisions(TURN)


def test_one_byte_per_read_gives_same_output_and_decisions() -> None:
    run = run_stream(MessagesStream(), [RECORDED[i:i + 1] for i in range(len(RECORDED))], decide)
    assert run.output == WHOLE.output
    assert _decided(run) == _nonstream_decisions(TURN)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(RECORDED) - 1),
       st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=20))
def test_a_stream_cut_anywhere_never_releases_a_partial_call(end: int, cuts: list[int]) -> None:
    cut = RECORDED[:end]
    run = run_stream(MessagesStream(), split_at(cut, cuts), decide)
    # an error event, unless only message_stop was lost (the answer was complete)
    assert events(run)[-1].event in ("error", "message_delta")
    whole = {json.loads(e.data)["index"]: e.data for e in events(WHOLE)
             if e.event == "content_block_delta"}
    for e in events(run):
        body = json.loads(e.data)
        if body.get("delta", {}).get("type") == "input_json_delta" and body["index"] >= 4:
            assert e.data == whole[body["index"]]  # governed calls: whole or not at all
