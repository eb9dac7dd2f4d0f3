"""An incremental codec for the AWS binary event stream (`application/vnd.amazon.eventstream`).

Each message is framed as

    total length (4) | headers length (4) | prelude CRC32 (4) | headers | payload | message CRC32 (4)

all integers big-endian; the prelude CRC covers the first 8 bytes, the message
CRC everything before it. A header is a 1-byte name length, the name (UTF-8),
a 1-byte value type and the value (see `HeaderType`).

`EventStreamDecoder.feed(bytes)` returns the messages completed by those bytes,
whatever the chunking. It checks both checksums and every length before it
trusts a byte, so a corrupted or hostile frame raises `ProtocolError` instead
of being half-read; a frame left incomplete at the end is an error of `flush()`.
Encoding is the exact inverse: `encode(decode(frame)) == frame` for every valid
frame, which lets a filter pass an event on by re-encoding it.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from ..errors import ProtocolError

PRELUDE = 12
OVERHEAD = PRELUDE + 4
# botocore's limits: a frame over them is refused before its bytes are buffered.
MAX_HEADERS = 128 * 1024
MAX_PAYLOAD = 24 * 1024 * 1024


class HeaderType(enum.IntEnum):
    TRUE = 0
    FALSE = 1
    BYTE = 2
    SHORT = 3
    INTEGER = 4
    LONG = 5
    BYTES = 6
    STRING = 7
    TIMESTAMP = 8  # milliseconds since the epoch, as a signed 64-bit integer
    UUID = 9


type HeaderValue = bool | int | bytes | str

_INTS = {HeaderType.BYTE: "!b", HeaderType.SHORT: "!h", HeaderType.INTEGER: "!i",
         HeaderType.LONG: "!q", HeaderType.TIMESTAMP: "!q"}


@dataclass(frozen=True, slots=True)
class Header:
    """One header. The type is kept, not inferred, so a message re-encodes to its own bytes."""

    name: str
    type: HeaderType
    value: HeaderValue

    @classmethod
    def string(cls, name: str, value: str) -> Header:
        return cls(name, HeaderType.STRING, value)


@dataclass(frozen=True, slots=True)
class Message:
    headers: tuple[Header, ...]
    payload: bytes = b""

    def get(self, name: str) -> HeaderValue | None:
        for header in self.headers:
            if header.name == name:
                return header.value
        return None

    def text(self, name: str) -> str | None:
        """A string header's value; None when absent or not a string."""
        value = self.get(name)
        return value if isinstance(value, str) else None


class BadFrame(ProtocolError):
    """A frame failed its checks. `messages` are the whole messages that came before it in
    the same `feed`, so what a reader sees does not depend on how the bytes were chunked."""

    def __init__(self, message: str, messages: list[Message] | None = None) -> None:
        super().__init__(message)
        self.messages = messages or []


def event(event_type: str, payload: bytes, content_type: str = "application/json") -> Message:
    """A `:message-type: event` message, headers in the order AWS services send them."""
    return Message((Header.string(":event-type", event_type),
                    Header.string(":content-type", content_type),
                    Header.string(":message-type", "event")), payload)


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _encode_value(header: Header) -> bytes:
    kind, value = header.type, header.value
    if kind in (HeaderType.TRUE, HeaderType.FALSE):
        if value is not (kind is HeaderType.TRUE):
            raise ValueError(f"header {header.name!r}: a {kind.name} header holds "
                             f"{kind is HeaderType.TRUE}")
        return b""
    if kind in _INTS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"header {header.name!r}: a {kind.name} header holds an integer")
        try:
            return struct.pack(_INTS[kind], value)
        except struct.error as e:
            raise ValueError(f"header {header.name!r}: {value} does not fit a {kind.name}") from e
    if kind is HeaderType.UUID:
        if not isinstance(value, bytes) or len(value) != 16:
            raise ValueError(f"header {header.name!r}: a UUID header holds 16 bytes")
        return value
    if kind is HeaderType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"header {header.name!r}: a STRING header holds text")
        data = value.encode("utf-8")
    else:
        if not isinstance(value, bytes):
            raise ValueError(f"header {header.name!r}: a BYTES header holds bytes")
        data = value
    if len(data) > 0xFFFF:
        raise ValueError(f"header {header.name!r}: the value is over 65535 bytes")
    return struct.pack("!H", len(data)) + data


def encode_headers(headers: tuple[Header, ...]) -> bytes:
    out = bytearray()
    for header in headers:
        name = header.name.encode("utf-8")
        if len(name) > 0xFF:
            raise ValueError(f"header name {header.name!r} is over 255 bytes")
        out += bytes((len(name),)) + name + bytes((header.type,)) + _encode_value(header)
    return bytes(out)


def encode(message: Message) -> bytes:
    headers = encode_headers(message.headers)
    if len(headers) > MAX_HEADERS or len(message.payload) > MAX_PAYLOAD:
        raise ValueError("the message is over the event stream size limits")
    prelude = struct.pack("!II", OVERHEAD + len(headers) + len(message.payload), len(headers))
    prelude += struct.pack("!I", _crc(prelude))
    body = prelude + headers + message.payload
    return body + struct.pack("!I", _crc(body))


def decode_headers(data: bytes) -> tuple[Header, ...]:
    headers: list[Header] = []
    seen: set[str] = set()
    pos, end = 0, len(data)

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise ProtocolError(f"event stream header {what} runs past the headers section")
        piece = data[pos:pos + n]
        pos += n
        return piece

    while pos < end:
        name_bytes = take(take(1, "name length")[0], "name")
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("event stream header name is not valid UTF-8") from e
        if name in seen:
            raise ProtocolError(f"event stream header {name!r} appears twice")
        seen.add(name)
        code = take(1, "type")[0]
        try:
            kind = HeaderType(code)
        except ValueError as e:
            raise ProtocolError(f"event stream header {name!r} has unknown type {code}") from e
        value: HeaderValue
        if kind in (HeaderType.TRUE, HeaderType.FALSE):
            value = kind is HeaderType.TRUE
        elif kind in _INTS:
            fmt = _INTS[kind]
            value = struct.unpack(fmt, take(struct.calcsize(fmt), "value"))[0]
        elif kind is HeaderType.UUID:
            value = take(16, "value")
        else:
            raw = take(struct.unpack("!H", take(2, "value length"))[0], "value")
            if kind is HeaderType.STRING:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ProtocolError(f"event stream header {name!r} is not valid UTF-8") from e
            else:
                value = raw
        headers.append(Header(name, kind, value))
    return tuple(headers)


class EventStreamDecoder:
    """Bytes in, whole verified messages out. Errors are `BadFrame`; after one it stays broken."""

    def __init__(self, max_payload: int = MAX_PAYLOAD, max_headers: int = MAX_HEADERS) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._max_headers = max_headers
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Message]:
        if self._broken:
            raise BadFrame(self._broken)
        self._buf += chunk
        messages: list[Message] = []
        try:
            while len(self._buf) >= PRELUDE:
                total = self._check_prelude()
                if len(self._buf) < total:
                    break
                messages.append(self._take(total))
        except ProtocolError as e:
            self._broken = e.message
            self._buf.clear()
            raise BadFrame(e.message, messages) from e
        return messages

    def flush(self) -> None:
        """The input ended: a partial frame left in the buffer is a truncated stream."""
        if self._broken:
            raise BadFrame(self._broken)
        if self._buf:
            n, self._buf = len(self._buf), bytearray()
            self._broken = f"the event stream ended inside a frame ({n} bytes left over)"
            raise BadFrame(self._broken)

    def _check_prelude(self) -> int:
        total, headers, crc = struct.unpack_from("!III", self._buf)
        if _crc(bytes(self._buf[:8])) != crc:
            raise ProtocolError("event stream frame has a bad prelude checksum")
        if total < OVERHEAD or headers > total - OVERHEAD:
            raise ProtocolError(f"event stream frame has impossible lengths ({total}, {headers})")
        if headers > self._max_headers or total - OVERHEAD - headers > self._max_payload:
            raise ProtocolError(f"event stream frame of {total} bytes is over the size limits")
        return int(total)

    def _take(self, total: int) -> Message:
        frame = bytes(self._buf[:total])
        if _crc(frame[:-4]) != struct.unpack_from("!I", frame, total - 4)[0]:
            raise ProtocolError("event stream frame has a bad message checksum")
        del self._buf[:total]
        headers_len = struct.unpack_from("!I", frame, 4)[0]
        return Message(decode_headers(frame[PRELUDE:PRELUDE + headers_len]),
                       frame[PRELUDE + headers_len:-4])
