"""The AWS binary event stream codec: known frames, every header type, every broken frame,
and property tests (round trip, any chunking, botocore's own decoder agrees)."""

from __future__ import annotations

import struct
import zlib

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.providers.eventstream import (
    BadFrame,
    EventStreamDecoder,
    Header,
    HeaderType,
    Message,
    encode,
    event,
)
from tests.streaming import split_at


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def frame(headers: bytes, payload: bytes) -> bytes:
    """A frame built by hand, independently of the codec under test."""
    prelude = struct.pack("!II", 16 + len(headers) + len(payload), len(headers))
    prelude += struct.pack("!I", crc(prelude))
    body = prelude + headers + payload
    return body + struct.pack("!I", crc(body))


def string_header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return bytes((len(n),)) + n + b"\x07" + struct.pack("!H", len(v)) + v


KNOWN = frame(string_header(":event-type", "contentBlockDelta")
              + string_header(":content-type", "application/json")
              + string_header(":message-type", "event"),
              b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}')

ALL_TYPES = Message((
    Header("t", HeaderType.TRUE, True),
    Header("f", HeaderType.FALSE, False),
    Header("byte", HeaderType.BYTE, -128),
    Header("short", HeaderType.SHORT, 32767),
    Header("int", HeaderType.INTEGER, -(2**31)),
    Header("long", HeaderType.LONG, 2**63 - 1),
    Header("bytes", HeaderType.BYTES, b"\x00\xff"),
    Header("str", HeaderType.STRING, "Zürich ✓"),
    Header("ts", HeaderType.TIMESTAMP, 1_700_000_000_123),
    Header("uuid", HeaderType.UUID, bytes(range(16))),
), b"payload")


def test_a_known_frame_decodes_and_re_encodes_to_the_same_bytes() -> None:
    [message] = EventStreamDecoder().feed(KNOWN)
    assert message == event("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}')
    assert message.text(":event-type") == "contentBlockDelta"
    assert message.text("missing") is None
    assert encode(message) == KNOWN


def test_every_header_type_round_trips_and_botocore_reads_it_alike() -> None:
    data = encode(ALL_TYPES)
    assert EventStreamDecoder().feed(data) == [ALL_TYPES]
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    [theirs] = list(buffer)
    assert theirs.headers == {h.name: h.value for h in ALL_TYPES.headers}
    assert theirs.payload == b"payload"


def test_bytes_split_anywhere_give_the_same_messages() -> None:
    data = KNOWN + encode(ALL_TYPES) + KNOWN
    decoder = EventStreamDecoder()
    got = [m for i in range(len(data)) for m in decoder.feed(data[i:i + 1])]
    decoder.flush()
    assert got == EventStreamDecoder().feed(data)
    assert len(got) == 3 and decoder.buffered == 0


def _corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _refix_prelude(data: bytes) -> bytes:
    """Recompute the prelude CRC after its lengths were edited (so the lengths are judged)."""
    return data[:8] + struct.pack("!I", crc(data[:8])) + data[12:]


@pytest.mark.parametrize("data, needle", [
    (_corrupt(KNOWN, 8, b"\x00\x00\x00\x00"), "bad prelude checksum"),
    (_corrupt(KNOWN, 30, b"X"), "bad message checksum"),
    (_corrupt(KNOWN, len(KNOWN) - 1, b"\x00"), "bad message checksum"),
    (_refix_prelude(struct.pack("!II", 15, 0) + KNOWN[8:]), "impossible lengths"),
    (_refix_prelude(KNOWN[:4] + struct.pack("!I", len(KNOWN)) + KNOWN[8:]), "impossible lengths"),
    (_refix_prelude(struct.pack("!II", 2**32 - 1, 0) + KNOWN[8:]), "over the size limits"),
    (frame(b"\x01a\x0e", b""), "unknown type 14"),
    (frame(b"\x01a\x07\x00\x09abc", b""), "runs past the headers section"),
    (frame(b"\x01a\x04\x00\x00", b""), "runs past the headers section"),
    (frame(b"\x05ab", b""), "runs past the headers section"),
    (frame(b"\x01a\x00\x01a\x01", b""), "appears twice"),
    (frame(b"\x01\xff\x00", b""), "name is not valid UTF-8"),
    (frame(b"\x01a\x07\x00\x01\xff", b""), "is not valid UTF-8"),
])
def test_broken_frames_are_refused(data: bytes, needle: str) -> None:
    decoder = EventStreamDecoder()
    with pytest.raises(BadFrame, match=needle) as info:
        decoder.feed(KNOWN + data)
    assert info.value.messages == [EventStreamDecoder().feed(KNOWN)[0]]
    with pytest.raises(BadFrame, match=needle):  # it stays broken
        decoder.feed(KNOWN)


def test_a_frame_over_the_payload_limit_is_refused_from_its_prelude() -> None:
    big = encode(event("x", b"a" * 100))
    decoder = EventStreamDecoder(max_payload=50)
    with pytest.raises(BadFrame, match="size limits"):
        decoder.feed(big[:12])


@pytest.mark.parametrize("cut", [1, 11, 12, 40, len(KNOWN) - 1])
def test_a_stream_cut_inside_a_frame_fails_at_flush(cut: int) -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(KNOWN + KNOWN[:cut]) == EventStreamDecoder().feed(KNOWN)
    with pytest.raises(BadFrame, match="ended inside a frame"):
        decoder.flush()


@pytest.mark.parametrize("header", [
    Header("b", HeaderType.BYTE, 128),
    Header("s", HeaderType.SHORT, -32769),
    Header("t", HeaderType.TRUE, False),
    Header("i", HeaderType.INTEGER, True),
    Header("u", HeaderType.UUID, b"short"),
    Header("s", HeaderType.STRING, b"bytes"),
    Header("b", HeaderType.BYTES, "text"),
    Header("s", HeaderType.STRING, "x" * 70000),
    Header("n" * 256, HeaderType.TRUE, True),
])
def test_encoding_refuses_values_that_do_not_fit(header: Header) -> None:
    with pytest.raises(ValueError):
        encode(Message((header,)))


# --- properties ---------------------------------------------------------------------------

_VALUES: dict[HeaderType, st.SearchStrategy[bool | int | bytes | str]] = {
    HeaderType.TRUE: st.just(True),
    HeaderType.FALSE: st.just(False),
    HeaderType.BYTE: st.integers(-(2**7), 2**7 - 1),
    HeaderType.SHORT: st.integers(-(2**15), 2**15 - 1),
    HeaderType.INTEGER: st.integers(-(2**31), 2**31 - 1),
    HeaderType.LONG: st.integers(-(2**63), 2**63 - 1),
    HeaderType.BYTES: st.binary(max_size=40),
    HeaderType.STRING: st.text(max_size=40),
    HeaderType.TIMESTAMP: st.integers(-(2**63), 2**63 - 1),
    HeaderType.UUID: st.binary(min_size=16, max_size=16),
}
headers = st.sampled_from(list(HeaderType)).flatmap(
    lambda kind: st.builds(Header, st.text(min_size=1, max_size=12), st.just(kind), _VALUES[kind]))
messages = st.builds(
    Message,
    st.lists(headers, max_size=6, unique_by=lambda h: h.name).map(tuple),
    st.binary(max_size=200),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(min_value=0), max_size=30))
def test_round_trip_in_any_chunking(sent: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in sent)
    decoder = EventStreamDecoder()
    got = [m for piece in split_at(data, [c % (len(data) + 1) for c in cuts])
           for m in decoder.feed(piece)]
    decoder.flush()
    assert got == sent
    assert b"".join(encode(m) for m in got) == data
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    assert [(dict((h.name, h.value) for h in m.headers), m.payload) for m in sent] == [
        (m.headers, m.payload) for m in buffer]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=len(KNOWN)))
def test_garbage_only_ever_raises_bad_frame(noise: bytes, at: int) -> None:
    """Whatever the bytes, the decoder refuses them with BadFrame or reads them exactly."""
    decoder = EventStreamDecoder()
    data = KNOWN[:at] + noise + KNOWN[at:]
    got: list[Message] = []
    try:
        for piece in split_at(data, [at, at + len(noise)]):
            got += decoder.feed(piece)
        decoder.flush()
    except BadFrame:
        return
    assert b"".join(encode(m) for m in got) == data
