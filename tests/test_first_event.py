"""A burst's first event goes out before the rest of the burst is filtered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.server.upstream import first_event_apart


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def collect(*parts: bytes) -> list[bytes]:
    return [c async for c in first_event_apart(chunks(*parts))]


@pytest.mark.parametrize("parts, expected", [
    # a whole answer in one read: its first event apart, the rest as it came
    ((b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n",),
     [b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n"]),
    # only the first read is cut, and only when more follows its first event
    ((b"data: 1\n\n", b"data: 2\n\ndata: 3\n\n"), [b"data: 1\n\n", b"data: 2\n\ndata: 3\n\n"]),
    ((b"data: 1", b"\n\ndata: 2\n\n"), [b"data: 1", b"\n\ndata: 2\n\n"]),
    ((b"\n\ndata: 1\n\n",), [b"\n\n", b"data: 1\n\n"]),
    ((b"",), [b""]),
    ((), []),
    # binary frames (Bedrock): cut anywhere, the bytes are the same
    ((b"\x00\x00\n\n\x01\x02",), [b"\x00\x00\n\n", b"\x01\x02"]),
])
async def test_the_first_read_is_cut_after_its_first_event(
        parts: tuple[bytes, ...], expected: list[bytes]) -> None:
    got = await collect(*parts)
    assert got == expected and b"".join(got) == b"".join(parts)
