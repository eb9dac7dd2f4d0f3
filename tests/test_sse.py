from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ProtocolError
from proxy.providers.sse import SSEDecoder, SSEEvent, encode
from tests.streaming import split_at

RECORDED = (
    b": keep-alive\n\n"
    b"event: message\ndata: {\"a\": \"caf\xc3\xa9 \xe2\x9c\x93\"}\n\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\rretry: 1500\rdata: cr only\r\r"
    b"data:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent('{"a": "café ✓"}', event="message"),
    SSEEvent("line one\nline two"),
    SSEEvent("cr only", id="7", retry=1500),
    SSEEvent("no-space", id="7"),  # the last event id persists, as the spec says
    SSEEvent("[DONE]", id="7"),
]


def decode(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [e for p in pieces for e in decoder.feed(p)]
    return events + decoder.flush()


def test_whole_stream() -> None:
    assert decode([RECORDED]) == EXPECTED


def test_one_byte_per_read() -> None:
    assert decode([RECORDED[i:i + 1] for i in range(len(RECORDED))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_rechunking_gives_the_same_events(cuts: list[int]) -> None:
    assert decode(split_at(RECORDED, cuts)) == EXPECTED


LF_ONLY = b"".join(b'data: {"n": %d, "t": "caf\xc3\xa9 \xe2\x9c\x93"}\n\n' % i for i in range(20)) \
    + b": comment\nevent: e\ndata: a\ndata: b\n\ndata: [DONE]\n\n"


@given(st.lists(st.integers(min_value=0, max_value=len(LF_ONLY)), max_size=40))
def test_lf_only_reads_split_anywhere_give_the_same_events(cuts: list[int]) -> None:
    """Reads without a CR take the way that splits their lines at once: the same events
    as one byte per read, a character split between reads included."""
    assert decode(split_at(LF_ONLY, cuts)) == decode(
        [LF_ONLY[i:i + 1] for i in range(len(LF_ONLY))])
    assert len(decode([LF_ONLY])) == 22


def test_invalid_utf8_after_good_lines_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        SSEDecoder().feed(b"data: ok\n\ndata: \xed\xa0\x80\n\n")


@given(st.text(min_size=1).filter(lambda t: "\r" not in t), st.sampled_from([None, "x"]))
def test_encode_then_decode_round_trips(data: str, event: str | None) -> None:
    ev = SSEEvent(data.replace("\r", ""), event=event)
    assert decode([encode(ev)]) == [ev]


def test_invalid_utf8_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_partial_line_at_end_is_an_error() -> None:
    decoder = SSEDecoder()
    decoder.feed(b'data: {"cut')
    with pytest.raises(ProtocolError, match="middle"):
        decoder.flush()


def test_overlong_line_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="longer"):
        SSEDecoder(max_line=16).feed(b"data: " + b"x" * 32)


def test_a_long_line_in_small_reads_is_scanned_once() -> None:
    """A megabyte line sent 64 bytes at a time: each read is scanned for a line end once
    (rescanning the whole buffer per read was quadratic), and the event is whole."""
    line = b"data: " + b"x" * 1_000_000
    decoder = SSEDecoder()
    events = [e for i in range(0, len(line), 64) for e in decoder.feed(line[i:i + 64])]
    assert events == []
    [event] = decoder.feed(b"\n\n")
    assert len(event.data) == 1_000_000
    cr_only = b"data: x\r" * 100_000 + b"\r"  # CR line ends and no LF anywhere
    [event] = SSEDecoder().feed(cr_only)
    assert event.data == "\n".join(["x"] * 100_000)


def test_an_event_of_many_lines_is_bounded_like_one_line() -> None:
    decoder = SSEDecoder(max_line=1000)
    with pytest.raises(ProtocolError, match="event longer than 1000 bytes"):
        for _ in range(200):
            decoder.feed(b"data: 0123456789\n")
