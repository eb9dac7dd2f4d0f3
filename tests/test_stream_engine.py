"""The one stream engine (providers/stream_engine.py) under every codec: the same recorded
answer re-chunked at random gives the same bytes and decisions, a refusal, a cut over the
argument limit and a broken-off stream end the same way whatever the format, and every
format that governs streams is listed here, so a new one is seen."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.demo.fake_anthropic import stream_events as anthropic_events
from proxy.demo.fake_bedrock import stream_frames
from proxy.demo.fake_bedrock_invoke import invoke_frames
from proxy.demo.fake_gemini import stream_chunks
from proxy.demo.fake_openai import stream_events as chat_events
from proxy.demo.fake_responses import stream_events as responses_events
from proxy.model import Action, Decision, OnDeny, ToolCall
from proxy.policy.engine import TOO_LARGE
from proxy.providers.anthropic import MESSAGES
from proxy.providers.base import Route, RouteKind, StreamFilter
from proxy.providers.bedrock import CONVERSE
from proxy.providers.bedrock_invoke import INVOKE
from proxy.providers.gemini import GEMINI
from proxy.providers.openai_chat import CHAT
from proxy.providers.openai_responses import RESPONSES
from proxy.providers.stream_engine import CUT_MESSAGE, TRUNCATED_MESSAGE, StreamEngine
from tests.fakes import Call, Reply
from tests.streaming import Run, run_stream, split_at

TURN = Reply(content="Checking, then cleaning up. Ünïcödé ✓ 漢字", calls=(
    Call("get_weather", '{"city": "Zürich", "units": "metric"}'),
    Call("delete_volume", '{"volume_id": "vol-1", "tags": {"env": "production"}}'),
    Call("list_volumes", "{}")))
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
ROUTE = Route(RouteKind.GOVERNED, model=MODEL, stream=True)
SSE_ROUTE = Route(RouteKind.GOVERNED, model=MODEL, stream=True, params={"alt": "sse"})

# Format name -> (a fresh filter with this argument limit, the upstream's recorded answer).
CODECS: dict[str, tuple[Callable[[int], StreamFilter], bytes]] = {
    "openai.chat": (lambda n: CHAT.stream(ROUTE, max_arguments=n),
                    b"".join(chat_events(TURN, "m", fragment=2))),
    "openai.responses": (lambda n: RESPONSES.stream(ROUTE, max_arguments=n),
                         b"".join(responses_events(TURN, "m", fragment=2))),
    "anthropic.messages": (lambda n: MESSAGES.stream(ROUTE, max_arguments=n),
                           b"".join(anthropic_events(TURN, "m", fragment=2))),
    "bedrock.converse": (lambda n: CONVERSE.stream(ROUTE, max_arguments=n),
                         b"".join(stream_frames(TURN, fragment=2))),
    "bedrock.invoke": (lambda n: INVOKE.stream(ROUTE, max_arguments=n),
                       b"".join(invoke_frames(TURN, MODEL, fragment=2))),
    # Gemini holds chunks, not calls: the one with a call and every one behind it.
    "gemini.generate sse": (lambda n: GEMINI.stream(SSE_ROUTE, max_arguments=n),
                            b"".join(stream_chunks(TURN, "m", sse=True, finish_apart=True))),
    "gemini.generate array": (lambda n: GEMINI.stream(ROUTE, max_arguments=n),
                              b"".join(stream_chunks(TURN, "m", sse=False, finish_apart=True))),
}
NAMES = sorted(CODECS)
FIRST_BATCH = {name: ["get_weather", "delete_volume", "list_volumes"] if name.startswith("gemini")
               else ["get_weather"] for name in NAMES}


def decide(call: ToolCall) -> Decision:
    """The policy of these tests; a call cut over the limit is denied, as the engine's is."""
    if call.too_large:
        return Decision(Action.DENY, (TOO_LARGE,), call.problem or "")
    if call.name == "delete_volume":
        return Decision(Action.DENY, ("no-prod-deletes",), "not production")
    return Decision(Action.ALLOW)


def run(name: str, pieces: list[bytes], how: Callable[[ToolCall], Decision] = decide,
        limit: int = 1 << 20) -> tuple[Run, StreamFilter]:
    stream = CODECS[name][0](limit)
    return run_stream(stream, pieces, how), stream


WHOLE = {name: run(name, [CODECS[name][1]])[0] for name in NAMES}


def test_every_governed_stream_runs_on_the_engine() -> None:
    for name in NAMES:
        stream = CODECS[name][0](100)
        assert isinstance(stream, StreamEngine), name
    assert {n.split()[0] for n in CODECS} == {
        f.name for f in (CHAT, RESPONSES, MESSAGES, CONVERSE, INVOKE, GEMINI)}


@pytest.mark.parametrize("name", NAMES)
def test_the_recorded_answer_is_whole_and_decided_in_order(name: str) -> None:
    result, stream = run(name, [CODECS[name][1]])
    assert [(n, a) for n, _, a in result.decided] == [
        ("get_weather", "allow"), ("delete_volume", "deny"), ("list_volumes", "allow")]
    assert stream.failed is None
    if not name.startswith("bedrock"):  # base64 or binary frames: their own tests read them
        assert b"[tether] The tool call 'delete_volume' was denied" in result.output


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(NAMES), st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_any_rechunking_gives_the_same_bytes_and_decisions(name: str, cuts: list[int]) -> None:
    result, _ = run(name, split_at(CODECS[name][1], cuts))
    assert result.output == WHOLE[name].output
    assert result.decided == WHOLE[name].decided


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(NAMES), st.floats(min_value=0.05, max_value=0.85),
       st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
def test_a_stream_broken_off_denies_what_was_open_and_fails(name: str, at: float,
                                                          cuts: list[int]) -> None:
    data = CODECS[name][1]
    data = data[:int(len(data) * at)]
    result, stream = run(name, split_at(data, cuts))
    assert stream.failed is not None
    whole = WHOLE[name].decided
    # What was decided is a prefix of the whole answer's calls, the last one possibly
    # denied for being cut; nothing is allowed that the whole answer did not allow.
    for (n, _, a), (wn, _, wa) in zip(result.decided, whole, strict=False):
        assert n == wn and (a == wa or a == "deny")


@pytest.mark.parametrize("name", NAMES)
def test_on_deny_error_ends_every_stream_the_same_way(name: str) -> None:
    def refuse(call: ToolCall) -> Decision:
        return Decision(Action.DENY, ("r",), "no", on_deny=OnDeny.ERROR)

    result, stream = run(name, [CODECS[name][1]], refuse)
    assert stream.failed == "tool call denied"
    # The first batch: the first call, or (Gemini) the three calls its one chunk carries.
    assert [n for n, _, _ in result.decided] == FIRST_BATCH[name]
    assert stream.feed(b"more").data == b"" and stream.close().data == b""


@pytest.mark.parametrize("name", NAMES)
def test_over_the_argument_limit_the_stream_is_cut(name: str) -> None:
    result, stream = run(name, [CODECS[name][1]], limit=8)
    assert stream.failed == CUT_MESSAGE
    # get_weather, which the policy allows, is denied: handed out too large, unread.
    assert result.decided == [(n, "", "deny") for n in FIRST_BATCH[name]]


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_stream_is_truncated(name: str) -> None:
    _, stream = run(name, [])
    assert stream.failed == TRUNCATED_MESSAGE


@pytest.mark.parametrize("name", NAMES)
def test_one_decision_is_needed_per_pending_call(name: str) -> None:
    stream = CODECS[name][0](1 << 20)
    step = stream.feed(CODECS[name][1])
    assert step.pending
    with pytest.raises(ValueError, match="one decision"):
        stream.decide([decide(c) for c in step.pending] * 2)
