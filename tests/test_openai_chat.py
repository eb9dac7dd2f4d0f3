from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest, UpstreamError
from proxy.model import Action, Decision, Exchange, OnDeny, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import load_yaml
from proxy.providers.openai_chat import (
    parse_request,
    parse_response,
    render_response,
)
from proxy.providers.openai_chat_stream import ChatStream
from tests.fakes import Call, Reply, completion, stream_events
from tests.streaming import run_stream, split_at

RULES = """
- id: no-prod
  match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
  action: deny
  message: not production
"""
DECLARED = ("get_weather", "delete_volume", "list_volumes")


def engine() -> PolicyEngine:
    raw = load_yaml(RULES, "rules.yaml")
    assert isinstance(raw, list)
    return PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 1) for r in raw)))


EXCHANGE = Exchange(provider="openai", model="m", declared_tools=DECLARED)


def decide(call: ToolCall) -> Decision:
    return engine().decide(call, EXCHANGE)


TURN = Reply(
    content="Checking the weather, then cleaning up. Ünïcödé ✓ 漢字",
    calls=(
        Call("get_weather", '{"city": "Zürich", "units": "metric"}'),
        Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}'),
        Call("list_volumes", '{}'),
    ),
)
RECORDED = b"".join(stream_events(TURN, "m", include_usage=True, fragment=2))


# --- requests ---------------------------------------------------------------------------


def test_parse_request_reads_tools_stream_and_user() -> None:
    body = json.dumps({
        "model": "gpt-x", "stream": True, "stream_options": {"include_usage": True},
        "user": "u-1", "messages": [],
        "tools": [{"type": "function", "function": {"name": "a"}}, {"type": "custom", "name": "b"}],
        "functions": [{"name": "c"}],
    }).encode()
    req = parse_request(body)
    assert (req.model, req.stream, req.include_usage, req.user) == ("gpt-x", True, True, "u-1")
    assert req.declared_tools == ("a", "b", "c")


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "model": "n"}', "duplicate key"),
    (b'{"model": 5}', "'model' must be a string"),
    (b'{"model": "m", "stream": "yes"}', "'stream' must be a boolean"),
    (b'{"model": "m", "tools": {}}', "'tools' must be an array"),
    (b'{"model": "m", "tools": [5]}', "tools\\[0\\] must be an object"),
])
def test_bad_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body)


# --- whole responses --------------------------------------------------------------------


def test_parse_response_reads_every_choice_and_legacy_function_call() -> None:
    body = json.dumps(completion((TURN, Reply(calls=(Call("get_weather", "{}"),),
                                              legacy_function_call=True)), "m")).encode()
    parsed = parse_response(body)
    assert [(c.choice, c.index, c.name) for c in parsed.calls] == [
        (0, 0, "get_weather"), (0, 1, "delete_volume"), (0, 2, "list_volumes"),
        (1, -1, "get_weather"),
    ]
    assert parsed.usage is not None and parsed.usage.input_tokens == 24


@pytest.mark.parametrize("body", [
    b"<html>oops</html>", b'{"object": "chat.completion"}', b'{"choices": [{"index": 0}]}',
    b'{"choices": [{"message": {"tool_calls": [{"function": {"name": 1}}]}}]}',
])
def test_unreadable_responses_fail_closed(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_response(body)


def test_render_keeps_allowed_calls_and_explains_denied_ones() -> None:
    parsed = parse_response(json.dumps(completion(TURN, "m")).encode())
    decisions = [decide(c) for c in parsed.calls]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.DENY, Action.ALLOW]
    out = json.loads(render_response(parsed, decisions))
    message = out["choices"][0]["message"]
    assert [tc["function"]["name"] for tc in message["tool_calls"]] == ["get_weather", "list_volumes"]
    assert message["tool_calls"][0]["function"]["arguments"] == TURN.calls[0].arguments
    assert "delete_volume" in message["content"] and "no-prod" in message["content"]
    assert message["content"].startswith(TURN.content or "")
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_render_with_every_call_denied_finishes_with_stop() -> None:
    turn = Reply(calls=(Call("delete_volume", '{"tags": {"env": "production"}}'),))
    parsed = parse_response(json.dumps(completion(turn, "m")).encode())
    out = json.loads(render_response(parsed, [decide(c) for c in parsed.calls]))
    assert "tool_calls" not in out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_render_all_allowed_returns_the_upstream_bytes() -> None:
    body = json.dumps(completion(Reply(calls=(Call("get_weather", "{ }"),)), "m")).encode()
    parsed = parse_response(body)
    assert render_response(parsed, [decide(c) for c in parsed.calls]) is body


def test_a_call_cut_by_length_is_malformed() -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Pa'),), finish_reason="length")
    parsed = parse_response(json.dumps(completion(turn, "m")).encode())
    assert parsed.calls[0].problem and "cut off" in parsed.calls[0].problem


@pytest.mark.parametrize("raw, problem", [
    ('{"a": 1, "a": 2}', "duplicate key"),
    ("{not json}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"n": NaN}', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_bad_arguments_are_a_problem(raw: str, problem: str) -> None:
    turn = Reply(calls=(Call("get_weather", raw),))
    parsed = parse_response(json.dumps(completion(turn, "m")).encode())
    assert parsed.calls[0].problem is not None and problem in parsed.calls[0].problem
    assert decide(parsed.calls[0]).action is Action.DENY


# --- streams ----------------------------------------------------------------------------


def test_stream_releases_text_at_once_and_holds_calls() -> None:
    stream = ChatStream()
    events = stream_events(TURN, "m", fragment=2)
    first_text = next(i for i, e in enumerate(events) if b'"content": "Chec' in e)
    step = stream.feed(b"".join(events[: first_text + 1]))
    assert b"Chec" in step.data and not step.pending
    first_call = next(i for i, e in enumerate(events) if b"get_weather" in e)
    step = stream.feed(b"".join(events[first_text + 1: first_call + 3]))
    assert b"get_weather" not in step.data and not step.pending


def test_stream_rewrites_denied_call_and_keeps_allowed_ones() -> None:
    run = run_stream(ChatStream(), [RECORDED], decide)
    assert [(n, a) for n, _, a in run.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]
    chunks = run.chunks()
    calls = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or []]
    assert [(tc["index"], tc["function"]["name"], tc["function"]["arguments"]) for tc in calls] == [
        (0, "get_weather", TURN.calls[0].arguments), (1, "list_volumes", "{}")]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text.startswith(TURN.content or "") and "delete_volume" in text
    assert run.events()[-1] == "[DONE]"
    assert chunks[-1]["usage"] is not None


def test_stream_all_denied_turns_finish_reason_to_stop() -> None:
    turn = Reply(calls=(Call("delete_volume", '{"tags": {"env": "production"}}'),))
    run = run_stream(ChatStream(), stream_events(turn, "m"), decide)
    reasons = [ch["finish_reason"] for c in run.chunks() for ch in c["choices"]
               if ch["finish_reason"]]
    assert reasons == ["stop"]


def test_stream_on_deny_error_ends_with_an_error_event() -> None:
    def strict(call: ToolCall) -> Decision:
        return Decision(Action.DENY, ("r",), "never", on_deny=OnDeny.ERROR)

    run = run_stream(ChatStream(), stream_events(TURN, "m"), strict)
    last = json.loads(run.events()[-1])
    assert last["error"]["code"] == "tool_call_denied"
    assert b"tool_calls" not in run.output


def test_stream_cut_mid_call_releases_nothing_of_it() -> None:
    events = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 2
    run = run_stream(ChatStream(), [b"".join(events[:cut])], decide)
    assert b"delete_volume" not in run.output
    assert json.loads(run.events()[-1])["error"]["code"] == "upstream_truncated"
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"
    assert 0 < len(run.decided[-1][1]) < len(TURN.calls[1].arguments)


def test_stream_cut_by_length_denies_the_open_call() -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Pa'),), finish_reason="length")
    run = run_stream(ChatStream(), stream_events(turn, "m"), decide)
    assert run.decided == [("get_weather", '{"city": "Pa', "deny")]
    assert b"tool_calls" not in run.output


@pytest.mark.parametrize("tail", [
    b"data: {not json}\n\n",
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "x"}]}}]}\n\n',
    b"data: \xff\n\n",
])
def test_malformed_stream_data_fails_closed(tail: bytes) -> None:
    events = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 1
    run = run_stream(ChatStream(), [b"".join(events[:cut]), tail], decide)
    assert b"delete_volume" not in run.output
    assert json.loads(run.events()[-1])["error"]["code"] == "bad_upstream_stream"


def test_error_event_inside_a_200_denies_open_calls_and_passes_the_error() -> None:
    events = stream_events(TURN, "m")
    cut = next(i for i, e in enumerate(events) if b"delete_volume" in e) + 1
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    run = run_stream(ChatStream(), [b"".join(events[:cut]), error], decide)
    assert json.loads(run.events()[-1])["error"]["message"] == "overloaded"
    assert run.decided[-1][0] == "delete_volume" and run.decided[-1][2] == "deny"


def test_legacy_function_call_stream() -> None:
    turn = Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),), legacy_function_call=True)
    run = run_stream(ChatStream(), stream_events(turn, "m"), decide)
    fc = [ch["delta"]["function_call"] for c in run.chunks() for ch in c["choices"]
          if "function_call" in ch["delta"]]
    assert fc == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]


def _nonstream_decisions(turn: Reply) -> list[tuple[str, str, str]]:
    parsed = parse_response(json.dumps(completion(turn, "m")).encode())
    return [(c.name, c.raw_arguments, decide(c).action.value) for c in parsed.calls]


WHOLE = run_stream(ChatStream(), [RECORDED], decide)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=60))
def test_any_rechunking_gives_same_output_and_decisions(cuts: list[int]) -> None:
    run = run_stream(ChatStream(), split_at(RECORDED, cuts), decide)
    assert run.output == WHOLE.output
    assert run.decided == WHOLE.decided == _nonstream_decisions(TURN)


def test_one_byte_per_read_gives_same_output_and_decisions() -> None:
    run = run_stream(ChatStream(), [RECORDED[i:i + 1] for i in range(len(RECORDED))], decide)
    assert run.output == WHOLE.output
    assert run.decided == _nonstream_decisions(TURN)


def _interleaved(a: list[bytes], b: list[bytes]) -> list[bytes]:
    """Two choices' events merged round-robin, as OpenAI streams n>1."""
    out: list[bytes] = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def test_interleaved_choices_are_decided_per_choice() -> None:
    other = Reply(calls=(Call("delete_volume", '{"tags": {"env": "production"}}'),
                         Call("get_weather", '{"city": "Rome"}')))
    events_0 = stream_events(TURN, "m")[:-1]  # without [DONE]
    events_1 = [e.replace(b'"index": 0, "delta"', b'"index": 1, "delta"')
                for e in stream_events(other, "m")[:-1]]
    run = run_stream(ChatStream(), _interleaved(events_0, events_1) + [b"data: [DONE]\n\n"],
                     decide)
    assert sorted(run.decided) == sorted(_nonstream_decisions(TURN) + _nonstream_decisions(other))
    by_choice: dict[int, list[tuple[int, str]]] = {0: [], 1: []}
    finishes: dict[int, str] = {}
    for chunk in run.chunks():
        for ch in chunk["choices"]:
            for tc in ch["delta"].get("tool_calls") or []:
                by_choice[ch["index"]].append((tc["index"], tc["function"]["name"]))
            if ch["finish_reason"]:
                finishes[ch["index"]] = ch["finish_reason"]
    assert by_choice == {0: [(0, "get_weather"), (1, "list_volumes")], 1: [(0, "get_weather")]}
    assert finishes == {0: "tool_calls", 1: "tool_calls"}


@pytest.mark.parametrize("body", [
    b'{"model":"m","stream":true,"messages":[]}',
    b' {}',
    b'{"model":"m","stream_options":{"include_usage":false}}',
    b'{"model":"m","stream_options":{"x":1}}',
    # an escaped key is the same key to a parser: the whole object is rewritten
    b'{"model":"m","stream\\u005foptions":{"include_usage":false}}',
])
def test_with_usage_turns_usage_on_whatever_the_body_holds(body: bytes) -> None:
    from proxy.providers.openai_chat import with_usage

    pairs = json.loads(with_usage(body), object_pairs_hook=lambda p: p)
    options = [v for k, v in pairs if k == "stream_options"]
    assert len(options) == 1 and ("include_usage", True) in options[0]
    assert [k for k, _ in pairs if k != "stream_options"] == [
        k for k, _ in json.loads(body, object_pairs_hook=lambda p: p) if k != "stream_options"]
