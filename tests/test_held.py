"""What a stream filter holds back, and the cut past `max_arguments` (providers/held.py),
for every provider's filter, with no socket: the call past the limit is handed out at
once as too large, without its arguments; the client's next bytes are the denial in
the provider's own error shape; nothing more is read or buffered."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from proxy.demo import fake_anthropic, fake_bedrock, fake_gemini, fake_responses
from proxy.model import Action, Decision, Exchange
from proxy.policy.engine import TOO_LARGE, Policy, PolicyEngine
from proxy.providers.anthropic_stream import MessagesStream
from proxy.providers.base import StreamFilter
from proxy.providers.bedrock_stream import ConverseStream
from proxy.providers.eventstream import EventStreamDecoder
from proxy.providers.gemini_stream import GeminiStream
from proxy.providers.held import HeldText, cut_denial, over_limit, text_size
from proxy.providers.openai_chat_stream import ChatStream
from proxy.providers.openai_responses_held import EVENTS_KEPT
from proxy.providers.openai_responses_stream import ResponsesStream
from tests.fakes import Call, Reply, stream_events
from tests.streaming import run_stream

LIMIT = 10_000
BIG = json.dumps({"content": "0123456789abcdef" * 2_000})   # 32 KB of arguments
SMALL = json.dumps({"content": "0123456789abcdef" * 500})   # 8 KB: under the limit
ENGINE = PolicyEngine(Policy())
EXCHANGE = Exchange(provider="t", model="m", declared_tools=("write_file",))


def judge(call: object) -> Decision:
    from proxy.model import ToolCall
    assert isinstance(call, ToolCall)
    return ENGINE.decide(call, EXCHANGE)


def _chat(args: str) -> tuple[StreamFilter, list[bytes]]:
    return (ChatStream(max_arguments=LIMIT),
            stream_events(Reply(calls=(Call("write_file", args),)), "m", fragment=100))


def _responses(args: str) -> tuple[StreamFilter, list[bytes]]:
    return (ResponsesStream(max_arguments=LIMIT), fake_responses.stream_events(
        Reply(calls=(Call("write_file", args),)), "m", fragment=100))


def _anthropic(args: str) -> tuple[StreamFilter, list[bytes]]:
    return (MessagesStream(max_arguments=LIMIT), fake_anthropic.stream_events(
        Reply(calls=(Call("write_file", args),)), "m", fragment=100))


def _bedrock(args: str) -> tuple[StreamFilter, list[bytes]]:
    return (ConverseStream(max_arguments=LIMIT), fake_bedrock.stream_frames(
        Reply(calls=(Call("write_file", args),)), fragment=100))


def _gemini(sse: bool) -> Callable[[str], tuple[StreamFilter, list[bytes]]]:
    def make(args: str) -> tuple[StreamFilter, list[bytes]]:
        return (GeminiStream(sse=sse, max_arguments=LIMIT), fake_gemini.stream_chunks(
            Reply(calls=(Call("write_file", args),)), "m", sse=sse))
    return make


FILTERS = {"chat": _chat, "responses": _responses, "anthropic": _anthropic,
           "bedrock": _bedrock, "gemini-sse": _gemini(True), "gemini-array": _gemini(False)}
# Where the denial is in each provider's error shape, and what an SDK reads it by.
SHAPES = {"chat": b'"code": "tool_call_denied"', "responses": b'"code": "tool_call_denied"',
          "anthropic": b"event: error", "bedrock": b"AccessDeniedException",
          "gemini-sse": b'"code": 403', "gemini-array": b'"code": 403'}


def _error_text(name: str, data: bytes) -> str:
    if name == "bedrock":
        [message] = EventStreamDecoder().feed(data)
        return str(json.loads(message.payload)["message"])
    return data.decode()


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_a_call_past_the_limit_is_cut_at_once(name: str) -> None:
    stream, pieces = FILTERS[name](BIG)
    data = b"".join(pieces)
    steps = []
    for i in range(0, len(data), 512):  # 512-byte reads, as a network would give
        step = stream.feed(data[i:i + 512])
        steps.append(step)
        if step.pending:
            break
    [call] = steps[-1].pending
    assert call.too_large and call.raw_arguments == "" and call.arguments is None
    assert f"{LIMIT}-byte limit" in (call.problem or "")
    if not name.startswith("gemini"):  # Gemini sends a call whole, in one chunk
        assert i < len(data) // 2, "cut before the call's end, not after"
    decision = judge(call)
    assert (decision.action, decision.rules) == (Action.DENY, (TOO_LARGE,))
    end = stream.decide([decision])
    assert SHAPES[name] in end.data and not end.pending
    assert TOO_LARGE in _error_text(name, end.data) and "write_file" in _error_text(name, end.data)
    assert stream.failed is not None and "max_arguments_bytes" in stream.failed
    # The stream is over: the rest of the upstream's bytes are not read, let alone held.
    assert stream.feed(data[i + 512:]) == stream.close() == type(end)()


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_a_call_under_the_limit_passes_whole(name: str) -> None:
    stream, pieces = FILTERS[name](SMALL)
    run = run_stream(stream, pieces, judge)
    assert [(n, a, v) for n, a, v in run.decided] == [("write_file", SMALL, "allow")]
    assert stream.failed is None


@pytest.mark.parametrize("sse", [True, False])
def test_gemini_counts_the_answer_held_behind_a_call(sse: bool) -> None:
    """Gemini holds every chunk after a call until the candidate finishes: they count."""
    def chunk(parts: list[object]) -> str:
        return json.dumps({"candidates": [{"content": {"parts": parts, "role": "model"},
                                           "index": 0}]})
    chunks = [chunk([{"functionCall": {"name": "write_file", "args": {}}}])]
    chunks += [chunk([{"text": "x" * 1000}])] * 100
    data = ("".join(f"data: {c}\r\n\r\n" for c in chunks) if sse
            else "[" + ",\n".join(chunks)).encode()
    stream = GeminiStream(sse=sse, max_arguments=LIMIT)
    for i in range(0, len(data), 512):
        step = stream.feed(data[i:i + 512])
        if step.pending:
            break
    assert i < len(data) // 4
    [call] = step.pending
    assert call.too_large and "held behind it" in (call.problem or "")
    assert TOO_LARGE in stream.decide([judge(call)]).data.decode()


def test_responses_replays_a_long_call_with_its_deltas_joined() -> None:
    """Past EVENTS_KEPT bytes of held events, further argument deltas are held as text,
    so what is held is about the arguments' size; the client reads the same text."""
    args = json.dumps({"content": "x" * (EVENTS_KEPT * 2)})
    events = fake_responses.stream_events(Reply(calls=(Call("write_file", args),)), "m",
                                          fragment=64)
    run = run_stream(ResponsesStream(), events, judge)
    deltas = [json.loads(e)["delta"] for e in run.events()
              if '"response.function_call_arguments.delta"' in e]
    assert "".join(deltas) == args
    upstream = sum(b"function_call_arguments.delta" in e for e in events)
    assert len(deltas) < upstream // 2
    assert len(deltas[-1]) > EVENTS_KEPT  # the tail, in one delta


def test_held_text_counts_utf8_bytes_and_joins_once() -> None:
    held = HeldText()
    for piece in ["a", "é", "漢", "\U0001F600", ""] * 300:
        held.append(piece)
    assert held.size == 300 * (1 + 2 + 3 + 4) and held.pieces == 1500
    assert held.text() == "aé漢\U0001F600" * 300 and held.length == 1200
    held.clear()
    assert held.text() == "" and held.size == 0
    assert text_size("\ud800") == 3  # a lone surrogate counts as the bytes it came as


def test_a_whole_answers_call_is_judged_without_its_arguments_when_over() -> None:
    from proxy.model import ToolCall
    call = ToolCall(id="c", name="write_file", raw_arguments=BIG, arguments={"x": 1})
    assert over_limit(call, len(BIG)) is None
    cut = over_limit(call, LIMIT)
    assert cut is not None and cut.too_large and cut.raw_arguments == "" and cut.arguments is None
    assert judge(cut).rules == (TOO_LARGE,)
    assert "[tether]" in cut_denial([cut]) and TOO_LARGE in cut_denial([cut])
