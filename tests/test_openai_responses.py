from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.fake_responses import CustomCall, ServerCall, response, stream_events
from proxy.errors import BadRequest, NotGoverned, UpstreamError
from proxy.model import Action, Decision, Exchange, OnDeny, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import load_yaml
from proxy.providers.azure import AzureProvider
from proxy.providers.base import RouteKind
from proxy.providers.openai import OpenAIProvider
from proxy.providers.openai_responses import (
    RESPONSES,
    parse_request,
    parse_response,
    render_response,
)
from proxy.providers.openai_responses_stream import ResponsesStream
from tests.fakes import Call, Reply
from tests.streaming import Run, run_stream, split_at

RULES = """
- id: no-prod
  match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
  action: deny
  message: not production
- id: no-drop-sql
  match: {tool: run_sql, args: {input: {matches: "(?i)drop "}}}
  action: deny
  message: no DROP statements
"""
DECLARED = ("get_weather", "delete_volume", "list_volumes", "run_sql")


def engine() -> PolicyEngine:
    raw = load_yaml(RULES, "rules.yaml")
    assert isinstance(raw, list)
    return PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 1) for r in raw)))


ENGINE = engine()
EXCHANGE = Exchange(provider="openai", model="m", declared_tools=DECLARED)


def decide(call: ToolCall) -> Decision:
    return ENGINE.decide(call, EXCHANGE)


def strict(call: ToolCall) -> Decision:
    return Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)


WEATHER = Call("get_weather", '{ "city":"Zürich",\n "note": "tab\\there \\u00e9 漢字" }')
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}')
TURN = Reply(
    content="Checking the weather, then cleaning up. Ünïcödé ✓ 漢字",
    calls=(WEATHER, PROD_DELETE, CustomCall("run_sql", "SELECT 1;\nDROP TABLE users;"),
           ServerCall("web_search_call", '{"action": {"type": "search", "query": "tether"}}'),
           Call("list_volumes", "{}")),
)
RECORDED = b"".join(stream_events(TURN, "m", fragment=2))


def events(run: Run) -> list[dict[str, Any]]:
    return run.chunks()


def client_view(run: Run) -> tuple[dict[int, dict[str, Any]], dict[str, Any] | None]:
    """What an agent accumulating the stream sees: the finished items by output_index and
    the final response; checks the invariants every client relies on on the way."""
    seen = events(run)
    numbers = [e["sequence_number"] for e in seen]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    added: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    arguments: dict[int, str] = {}
    final = None
    for e in seen:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert e["output_index"] not in added
            added[e["output_index"]] = e["item"]
        elif kind.endswith(".delta") and "output_index" in e:
            assert e["output_index"] in added and e["output_index"] not in done
            arguments[e["output_index"]] = arguments.get(e["output_index"], "") + e["delta"]
        elif kind == "response.output_item.done":
            assert added[e["output_index"]]["id"] == e["item"]["id"]
            done[e["output_index"]] = e["item"]
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            final = e["response"]
    for index, item in done.items():
        text = item.get("arguments", item.get("input"))
        if text is not None and index in arguments:
            assert arguments[index] == text  # deltas and the finished item agree
    if final is not None:
        for index, item in enumerate(final["output"]):
            if index in done:
                assert item == done[index]
    return done, final


# --- requests ---------------------------------------------------------------------------


def test_parse_request_reads_tools_stream_user_and_limits() -> None:
    body = json.dumps({
        "model": "gpt-x", "stream": True, "user": "u-old", "safety_identifier": "u-1",
        "max_output_tokens": 500, "instructions": "be careful", "input": "hi",
        "tools": [{"type": "function", "name": "a", "parameters": {}},
                  {"type": "custom", "name": "b"},
                  {"type": "namespace", "name": "crm", "description": "",
                   "tools": [{"type": "function", "name": "c"}]},
                  {"type": "web_search"}, {"type": "file_search", "vector_store_ids": []},
                  {"type": "mcp", "server_label": "x", "server_url": "https://x"}],
    }).encode()
    req = parse_request(body)
    assert (req.model, req.stream, req.user, req.max_output_tokens) == ("gpt-x", True, "u-1", 500)
    assert req.declared_tools == ("a", "b", "c")
    assert req.fingerprint is not None and "be careful" in req.fingerprint


def test_user_is_the_fallback_for_safety_identifier() -> None:
    assert parse_request(b'{"model": "m", "user": "u-2", "input": "x"}').user == "u-2"
    assert parse_request(b'{"model": "m", "input": "x"}').user is None


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "model": "n"}', "duplicate key"),
    (b'{"model": 5}', "'model' must be a string"),
    (b'{"model": "m", "stream": "yes"}', "'stream' must be a boolean"),
    (b'{"model": "m", "tools": {}}', "'tools' must be an array"),
    (b'{"model": "m", "tools": [5]}', "tools\\[0\\] must be an object"),
    (b'{"model": "m", "tools": [{"type": "namespace", "tools": 1}]}', "must be an array"),
    (b'{"model": "m", "max_output_tokens": "lots"}', "'max_output_tokens' must be"),
])
def test_bad_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body)


@pytest.mark.parametrize("kind", ["computer_use_preview", "computer", "local_shell", "shell",
                                  "apply_patch"])
def test_tools_the_agent_runs_but_tether_cannot_read_are_refused(kind: str) -> None:
    body = json.dumps({"model": "m", "tools": [{"type": "function", "name": "a"},
                                               {"type": kind}]}).encode()
    with pytest.raises(NotGoverned, match=kind):
        parse_request(body)


@pytest.mark.parametrize("provider, method, path, kind, status", [
    (OpenAIProvider(), "POST", "v1/responses", RouteKind.GOVERNED, 404),
    (OpenAIProvider(), "GET", "v1/responses", RouteKind.REFUSE, 404),
    (OpenAIProvider(), "POST", "v1/Responses", RouteKind.REFUSE, 404),
    (OpenAIProvider(), "POST", "responses", RouteKind.REFUSE, 404),
    (OpenAIProvider(), "POST", "v1/responses/resp_1/cancel", RouteKind.REFUSE, 501),
    # Stored reads, shown as tether rewrote them (openai_stored.py).
    (OpenAIProvider(), "GET", "v1/responses/resp_1", RouteKind.RETRIEVE, 404),
    (OpenAIProvider(), "GET", "v1/responses/resp_1/input_items", RouteKind.RETRIEVE, 404),
    (OpenAIProvider(), "DELETE", "v1/responses/resp_1", RouteKind.REFUSE, 501),
    (OpenAIProvider(), "POST", "v1/threads/t/runs", RouteKind.REFUSE, 501),
    (OpenAIProvider(), "POST", "v1/chat/completions", RouteKind.GOVERNED, 404),
    (AzureProvider(), "POST", "openai/responses", RouteKind.GOVERNED, 404),
    (AzureProvider(), "POST", "openai/v1/responses", RouteKind.GOVERNED, 404),
    (AzureProvider(), "POST", "openai/V1/responses", RouteKind.REFUSE, 404),
    (AzureProvider(), "POST", "openai/deployments/d/responses", RouteKind.REFUSE, 404),
    (AzureProvider(), "GET", "openai/responses", RouteKind.REFUSE, 404),
    (AzureProvider(), "GET", "openai/v1/responses/r1", RouteKind.REFUSE, 501),
])
def test_routes(provider: OpenAIProvider | AzureProvider, method: str, path: str,
                kind: RouteKind, status: int) -> None:
    route = provider.route(method, path, {})
    assert route.kind is kind
    if kind is RouteKind.REFUSE:
        assert route.status == status
    elif path.endswith("responses"):
        assert route.format is RESPONSES and route.upstream_path == path


# --- whole responses --------------------------------------------------------------------


def whole(turn: Reply) -> bytes:
    return json.dumps(response(turn, "m")).encode()


def test_parse_response_reads_function_and_custom_calls_in_output_order() -> None:
    parsed = parse_response(whole(TURN))
    assert [(c.index, c.name, c.raw_arguments) for c in parsed.calls] == [
        (1, "get_weather", WEATHER.arguments), (2, "delete_volume", PROD_DELETE.arguments),
        (3, "run_sql", "SELECT 1;\nDROP TABLE users;"), (5, "list_volumes", "{}")]
    assert parsed.calls[2].arguments == {"input": "SELECT 1;\nDROP TABLE users;"}
    assert all(c.id.startswith("call_") for c in parsed.calls)
    assert parsed.usage is not None and (parsed.usage.input_tokens, parsed.usage.output_tokens) \
        == (24, 12)


@pytest.mark.parametrize("body", [
    b"<html>oops</html>", b'{"object": "response"}', b'{"output": {}}', b'{"output": [5]}',
    b'{"output": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}',
    b'{"output": [{"type": "function_call", "call_id": "c", "name": "a", "arguments": {}}]}',
    b'{"output": [{"type": "custom_tool_call", "call_id": "c", "name": "a"}]}',
    b'{"output": [], "output": []}',
])
def test_unreadable_responses_fail_closed(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response(body)


def test_render_replaces_denied_items_in_place_and_keeps_allowed_ones() -> None:
    body = whole(TURN)
    parsed = parse_response(body)
    decisions = [decide(c) for c in parsed.calls]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.DENY, Action.DENY, Action.ALLOW]
    before = json.loads(body)["output"]
    after = json.loads(render_response(parsed, decisions))["output"]
    assert len(after) == len(before)
    assert after[0] == before[0] and after[1] == before[1] and after[4:] == before[4:]
    assert after[1]["arguments"] == WEATHER.arguments
    for i, rule in ((2, "no-prod"), (3, "no-drop-sql")):
        assert after[i]["type"] == "message" and after[i]["role"] == "assistant"
        assert after[i]["id"] == f"msg_tether_{before[i]['id']}"
        text = after[i]["content"][0]["text"]
        assert after[i]["content"][0]["type"] == "output_text"
        assert rule in text and before[i]["name"] in text


def test_render_all_allowed_returns_the_upstream_bytes() -> None:
    body = whole(Reply(calls=(WEATHER,)))
    parsed = parse_response(body)
    assert render_response(parsed, [decide(c) for c in parsed.calls]) is body


@pytest.mark.parametrize("finish", ["length", "content_filter", "failed"])
def test_a_call_cut_off_in_a_whole_response_is_malformed(finish: str) -> None:
    for call in (WEATHER, CustomCall("run_sql", "SELECT 1")):
        parsed = parse_response(whole(Reply(calls=(call,), finish_reason=finish)))
        [cut] = parsed.calls
        assert cut.problem is not None and decide(cut).action is Action.DENY


@pytest.mark.parametrize("raw, problem", [
    ('{"a": 1, "a": 2}', "duplicate key"),
    ("{not json}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"n": NaN}', "not valid JSON"),
])
def test_bad_arguments_are_a_problem(raw: str, problem: str) -> None:
    [call] = parse_response(whole(Reply(calls=(Call("get_weather", raw),)))).calls
    assert call.problem is not None and problem in call.problem
    assert decide(call).action is Action.DENY


@pytest.mark.parametrize("kind", ["computer_call", "local_shell_call", "shell_call",
                                  "apply_patch_call", "teleport_call"])
def test_items_the_agent_would_run_unread_are_denied(kind: str) -> None:
    item = ServerCall(kind, '{"call_id": "c1", "action": {"type": "exec", "command": ["rm"]}}')
    body = whole(Reply(calls=(item,)))
    parsed = parse_response(body)
    [call] = parsed.calls
    assert (call.name, call.id) == (kind, "c1") and call.problem and "cannot govern" in call.problem
    out = json.loads(render_response(parsed, [decide(call)]))
    assert out["output"][0]["type"] == "message"


def test_items_that_ran_at_openai_pass() -> None:
    turn = Reply(content="Found it.", calls=(
        ServerCall("web_search_call", '{"action": {"type": "search", "query": "q"}}'),
        ServerCall("code_interpreter_call", '{"code": "1+1", "container_id": "c"}'),
        ServerCall("reasoning", '{"summary": []}')))
    assert parse_response(whole(turn)).calls == ()


# --- streams ----------------------------------------------------------------------------


def test_text_passes_at_once_and_a_call_is_held_until_its_item_is_done() -> None:
    stream = ResponsesStream()
    pieces = stream_events(TURN, "m")
    first_text = next(i for i, e in enumerate(pieces) if b"output_text.delta" in e)
    step = stream.feed(b"".join(pieces[: first_text + 1]))
    assert b"Chec" in step.data and not step.pending
    call_done = next(i for i, e in enumerate(pieces)
                     if b"output_item.done" in e and b"get_weather" in e)
    step = stream.feed(b"".join(pieces[first_text + 1: call_done]))
    assert b"get_weather" not in step.data and not step.pending
    step = stream.feed(pieces[call_done])
    assert step.data == b"" and [c.name for c in step.pending] == ["get_weather"]
    step = stream.decide([decide(step.pending[0])])
    assert step.data.count(b"get_weather") == 2  # added and done, replayed
    assert b"function_call_arguments.delta" in step.data


def test_stream_rewrites_denied_calls_and_keeps_allowed_ones() -> None:
    run = run_stream(ResponsesStream(), [RECORDED], decide)
    assert [(n, a) for n, _, a in run.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("run_sql", "deny"),
        ("list_volumes", "allow")]
    done, final = client_view(run)
    assert [done[i]["type"] for i in sorted(done)] == [
        "message", "function_call", "message", "message", "web_search_call", "function_call"]
    assert done[1]["arguments"] == WEATHER.arguments
    assert "no-prod" in done[2]["content"][0]["text"]
    assert "no-drop-sql" in done[3]["content"][0]["text"]
    assert final is not None and final["status"] == "completed"
    assert [item["type"] for item in final["output"]] == [done[i]["type"] for i in sorted(done)]
    upstream_args = [e for e in RECORDED.split(b"\n\n") if b"arguments.delta" in e
                     and b'"output_index": 1' in e]
    released = [e for e in run.output.split(b"\n\n") if b"arguments.delta" in e
                and b'"output_index": 1' in e]
    assert [json.loads(e.split(b"data: ")[1])["delta"] for e in released] == \
        [json.loads(e.split(b"data: ")[1])["delta"] for e in upstream_args]


def test_stream_with_everything_allowed_is_byte_identical() -> None:
    turn = Reply(content="ok", calls=(WEATHER, Call("list_volumes", "{}")))
    recorded = b"".join(stream_events(turn, "m"))
    run = run_stream(ResponsesStream(), [recorded], decide)
    assert run.output == recorded


def test_stream_on_deny_error_ends_with_an_error_event_the_sdk_raises_on() -> None:
    run = run_stream(ResponsesStream(), stream_events(TURN, "m"), strict)
    last = events(run)[-1]
    assert last["type"] == "error" and last["code"] == "tool_call_denied"
    assert last["error"]["message"] == last["message"] and "never" in last["message"]
    assert b"function_call" not in run.output
    client_view(run)


def test_stream_cut_mid_call_releases_nothing_of_it() -> None:
    pieces = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(pieces) if b"delete_volume" in e) + 3
    stream = ResponsesStream()
    run = run_stream(stream, [b"".join(pieces[:cut])], decide)
    assert b"delete_volume" not in run.output
    last = events(run)[-1]
    assert last["type"] == "error" and last["code"] == "upstream_truncated"
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"
    assert 0 < len(run.decided[-1][1]) < len(PROD_DELETE.arguments)
    assert stream.failed is not None
    client_view(run)


@pytest.mark.parametrize("finish, terminal", [("length", "response.incomplete"),
                                               ("failed", "response.failed")])
def test_a_response_ending_mid_call_denies_it(finish: str, terminal: str) -> None:
    turn = Reply(content="Deleting.", calls=(WEATHER, Call("delete_volume", '{"volume_id": "v"}')),
                 finish_reason=finish)
    stream = ResponsesStream()
    run = run_stream(stream, stream_events(turn, "m"), decide)
    assert run.decided[0] == ("get_weather", WEATHER.arguments, "allow")
    name, raw, action = run.decided[1]
    assert (name, action) == ("delete_volume", "deny")
    assert raw and '{"volume_id": "v"}'.startswith(raw) and raw != '{"volume_id": "v"}'
    done, final = client_view(run)
    assert final is not None and events(run)[-1]["type"] == terminal
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "message"]
    assert "malformed" in done[2]["content"][0]["text"]
    assert b'"delete_volume", "arguments"' not in run.output
    assert (stream.failed is not None) == (finish == "failed")


def test_error_event_inside_a_200_denies_open_calls_and_passes_the_error() -> None:
    pieces = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(pieces) if b"delete_volume" in e) + 1
    error = (b'event: error\ndata: {"type": "error", "code": "server_error", "message": '
             b'"overloaded", "param": null, "sequence_number": 99}\n\n')
    stream = ResponsesStream()
    run = run_stream(stream, [b"".join(pieces[:cut]), error], decide)
    errors = [e for e in events(run) if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["message"] == "overloaded"
    assert errors[0]["error"]["message"] == "overloaded"  # nested too, so the SDK raises
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"
    assert b"delete_volume" not in run.output and stream.failed is not None
    client_view(run)


@pytest.mark.parametrize("error", [
    b'event: error\ndata: {"type": "error", "sequence_number": 9, "error": {"type": '
    b'"too_many_requests", "code": "too_many_requests", "message": "Slow down", "param": null}}\n\n',
    b'data: {"error": {"message": "Slow down", "type": "server_error", "code": null}}\n\n',
])
def test_every_error_shape_reaches_the_client_in_both_shapes(error: bytes) -> None:
    pieces = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(pieces) if b"delete_volume" in e) + 1
    stream = ResponsesStream()
    run = run_stream(stream, [b"".join(pieces[:cut]), error], decide)
    [last] = [e for e in events(run) if e["type"] == "error"]
    assert last == events(run)[-1]
    assert last["message"] == last["error"]["message"] == "Slow down"
    assert stream.failed is not None and "Slow down" in stream.failed
    client_view(run)


def _event(kind: str, **fields: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def _until(pattern: bytes, offset: int = 0) -> list[bytes]:
    pieces = stream_events(TURN, "m")
    return pieces[: next(i for i, e in enumerate(pieces) if pattern in e) + offset]


@pytest.mark.parametrize("prefix, tail, needle", [
    (_until(b"delete_volume", 1), b"data: {not json}\n\n", "not valid JSON"),
    (_until(b"delete_volume", 1), b"data: \xff\n\n", "UTF-8"),
    (_until(b"delete_volume", 1), b'data: {"type": "x", "type": "y"}\n\n', "duplicate key"),
    (_until(b"delete_volume", 1), b"data: [DONE]\n\n", "[DONE]"),
    (_until(b"delete_volume", 1),
     b'event: response.output_text.delta\ndata: {"type": "response.function_call_arguments.delta",'
     b' "output_index": 2, "item_id": "fc_x", "delta": "x"}\n\n', "carries a"),
    (_until(b"delete_volume", 1),
     _event("response.function_call_arguments.done", output_index=2, arguments="{}"),
     "does not match its deltas"),
    (_until(b"delete_volume", 1),
     _event("response.output_item.done", output_index=2,
            item={"type": "function_call", "name": "get_weather", "call_id": "x",
                  "arguments": "{}"}), "changed its"),
    (_until(b"delete_volume", 1),
     _event("response.function_call_arguments.delta", output_index=7, delta="{}"),
     "outside an open tool call"),
    (_until(b"delete_volume", 1),
     _event("response.output_item.added", output_index=1, item={"type": "message", "id": "m"}),
     "added twice"),
    (_until(b"delete_volume", 1),
     _event("response.output_item.done", output_index=9,
            item={"type": "function_call", "name": "x", "call_id": "x", "arguments": "{}"}),
     "never added"),
    (_until(b"response.completed"),
     _event("response.completed", response={"id": "r", "output": [{"type": "message"}] * 6 + [
         {"type": "function_call", "name": "delete_volume", "call_id": "z", "arguments": "{}"}]}),
     "did not decide"),
])
def test_malformed_or_inconsistent_streams_fail_closed(prefix: list[bytes], tail: bytes,
                                                       needle: str) -> None:
    stream = ResponsesStream()
    run = run_stream(stream, [b"".join(prefix), tail], decide)
    assert b'"name": "delete_volume"' not in run.output
    last = events(run)[-1]
    assert last["type"] == "error" and last["code"] == "bad_upstream_stream"
    assert stream.failed is not None and needle in stream.failed
    client_view(run)


def test_events_for_a_call_after_it_was_done_fail_closed() -> None:
    pieces = stream_events(TURN, "m")
    call_done = next(i for i, e in enumerate(pieces)
                     if b"output_item.done" in e and b"get_weather" in e)
    late = _event("response.function_call_arguments.delta", output_index=1, delta="x")
    stream = ResponsesStream()
    run = run_stream(stream, [b"".join(pieces[: call_done + 1]), late], decide)
    assert stream.failed is not None and "after it was complete" in stream.failed
    assert run.decided == [("get_weather", WEATHER.arguments, "allow")]


def test_the_final_output_is_what_the_client_was_sent_whatever_upstream_says() -> None:
    """A final response whose output disagrees with the stream (another call where a
    denied one was, other arguments for an allowed one) is rewritten to what was decided."""
    pieces = stream_events(TURN, "m")
    final = json.loads(pieces[-1].split(b"data: ")[1])
    output = final["response"]["output"]
    output[1] = {**output[1], "arguments": '{"city": "Atlantis"}'}
    output[2] = {**output[2], "name": "get_weather", "arguments": "{}"}
    forged = _event("response.completed", response=final["response"],
                    sequence_number=final["sequence_number"])
    run = run_stream(ResponsesStream(), [b"".join(pieces[:-1]), forged], decide)
    done, last = client_view(run)
    assert last is not None
    assert last["output"][1]["arguments"] == WEATHER.arguments
    assert last["output"][2]["type"] == "message" and "no-prod" in last["output"][2]["content"][0]["text"]
    assert b"Atlantis" not in run.output


def test_a_client_executed_item_in_a_stream_is_denied() -> None:
    turn = Reply(calls=(ServerCall("local_shell_call",
                                   '{"call_id": "c", "action": {"type": "exec", "command": ["ls"]}}'),))
    run = run_stream(ResponsesStream(), stream_events(turn, "m"), decide)
    assert [(n, a) for n, _, a in run.decided] == [("local_shell_call", "deny")]
    done, final = client_view(run)
    assert done[0]["type"] == "message" and final is not None
    assert b"local_shell_call" not in run.output.replace(b"'local_shell_call'", b"")


def test_usage_comes_from_the_final_response() -> None:
    stream = ResponsesStream()
    run_stream(stream, [RECORDED], decide)
    assert stream.usage is not None and stream.usage.total_tokens == 36
    assert stream.output_units > 0


# --- any chunking, same bytes, same decisions as the whole response -----------------------


def _nonstream_decisions(turn: Reply) -> list[tuple[str, str, str]]:
    parsed = parse_response(whole(turn))
    return [(c.name, c.raw_arguments, decide(c).action.value) for c in parsed.calls]


WHOLE = run_stream(ResponsesStream(), [RECORDED], decide)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=60))
def test_any_rechunking_gives_same_output_and_decisions(cuts: list[int]) -> None:
    run = run_stream(ResponsesStream(), split_at(RECORDED, cuts), decide)
    assert run.output == WHOLE.output
    assert run.decided == WHOLE.decided == _nonstream_decisions(TURN)


def test_one_byte_per_read_gives_same_output_and_decisions() -> None:
    run = run_stream(ResponsesStream(), [RECORDED[i:i + 1] for i in range(len(RECORDED))], decide)
    assert run.output == WHOLE.output
    assert run.decided == _nonstream_decisions(TURN)


def _error_in_200() -> bytes:
    return b"".join(_until(b"delete_volume", 2)) + _event(
        "error", code="server_error", message="overloaded", param=None, sequence_number=50)


ODD_ENDINGS = [
    b"".join(stream_events(Reply(content="Deleting.", calls=(WEATHER, PROD_DELETE),
                                 finish_reason=finish), "m"))
    for finish in ("length", "content_filter", "failed")
] + [b"".join(_until(b"delete_volume", 3)), _error_in_200()]
ODD_WHOLE = [run_stream(ResponsesStream(), [r], decide) for r in ODD_ENDINGS]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(ODD_ENDINGS) - 1), st.data())
def test_streams_that_end_badly_rechunk_identically(which: int, data: st.DataObject) -> None:
    recorded = ODD_ENDINGS[which]
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(recorded)), max_size=40))
    run = run_stream(ResponsesStream(), split_at(recorded, cuts), decide)
    assert run.output == ODD_WHOLE[which].output
    assert run.decided == ODD_WHOLE[which].decided
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([WEATHER, PROD_DELETE, Call("list_volumes", "{}"),
                                 CustomCall("run_sql", "DROP TABLE x"),
                                 CustomCall("run_sql", "select 1")]), min_size=1, max_size=5),
       st.integers(min_value=1, max_value=7), st.data())
def test_any_turn_any_chunking_matches_the_whole_response(calls: list[Call], fragment: int,
                                                           data: st.DataObject) -> None:
    turn = Reply(content="ok", calls=tuple(calls))
    recorded = b"".join(stream_events(turn, "m", fragment=fragment))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(recorded)), max_size=30))
    run = run_stream(ResponsesStream(), split_at(recorded, cuts), decide)
    assert run.decided == _nonstream_decisions(turn)
    done, final = client_view(run)
    assert final is not None and len(final["output"]) == len(calls) + 1
