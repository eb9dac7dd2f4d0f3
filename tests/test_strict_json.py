"""strict_json's reused decoders read exactly what `json.loads` reads, errors included:
the same value or the same exception, for any bytes or text an agent or a model sends."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.strict_json import PAIRS, strict_pairs, text_of

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                               max_size=3),
    max_leaves=8).map(json.dumps)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
                             "utf-32", "utf-32-le"])


def outcome(read: object) -> tuple[str, object]:
    try:
        return "ok", read()  # type: ignore[operator]
    except (ValueError, TypeError, RecursionError) as e:
        return type(e).__name__, str(e)


def same(data: str | bytes) -> None:
    expected = outcome(lambda: json.loads(data, object_pairs_hook=strict_pairs))
    assert outcome(lambda: PAIRS.decode(text_of(data))) == expected


@given(JSONISH, ENCODINGS)
def test_encoded_json_reads_as_json_loads_reads_it(text: str, encoding: str) -> None:
    same(text.encode(encoding, "surrogatepass"))
    same(text)


@given(st.binary(max_size=40))
def test_any_bytes_fail_or_read_as_json_loads_does(data: bytes) -> None:
    same(data)
    same(b"{" + data)


def test_the_edges() -> None:
    for data in (b"", b"{", b"{\x00", b'{"a":1,"a":2}', "\ufeff{}", b"\xef\xbb\xbf{}",
                 b'"\xed\xa0\x80"', b'{"a":"\xff"}', "{}".encode("utf-16-le")):
        same(data)
