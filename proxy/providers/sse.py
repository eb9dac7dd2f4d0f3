"""An incremental Server-Sent Events codec (WHATWG HTML, "server-sent events").

`SSEDecoder.feed(bytes)` returns the events completed by those bytes, whatever
the chunking: a line may be split anywhere, a CR LF pair may straddle two
reads, and UTF-8 is decoded only on whole lines, so a multi-byte character
split across reads is never broken. Malformed input (invalid UTF-8, a line
or an event over the limit) raises `ProtocolError`; nothing is dropped silently.
Each byte is scanned for a line end once, however the lines are chunked (a
16 MB line sent a byte at a time is not rescanned per byte).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

MAX_LINE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    def __init__(self, max_line: int = MAX_LINE) -> None:
        """`max_line` bounds a line and an event's data, which is held until it ends."""
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no line end
        self._max_line = max_line
        self._size = 0     # data held for the current event
        self._pending_cr = False
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._has_fields = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not chunk:
            return events
        if self._pending_cr:
            # A CR ended the previous read; a LF now is the second half of CR LF.
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._buf += chunk
        buf = self._buf
        if b"\r" not in chunk:  # LF-only lines, the usual case: split them all at once
            last = buf.rfind(b"\n", self._scanned)
            if last >= 0:
                try:
                    lines = bytes(buf[:last]).decode("utf-8").split("\n")
                except UnicodeDecodeError as e:
                    raise ProtocolError(f"server-sent event is not valid UTF-8: {e}") from e
                del buf[:last + 1]
                for line in lines:
                    self._text_line(line, events)
            self._scanned = len(buf)
            if len(buf) > self._max_line:
                raise ProtocolError(f"server-sent event line longer than {self._max_line} bytes")
            return events
        start = 0
        n = len(buf)
        scan = self._scanned
        nl = buf.find(b"\n", scan)  # searched again only once passed: CR-only lines
        while start < n:
            if 0 <= nl < scan:
                nl = buf.find(b"\n", scan)
            cr = buf.find(b"\r", scan, nl if nl >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < n and buf[nxt] == 0x0A:
                    nxt += 1
                elif nxt == n:
                    self._pending_cr = True
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            self._line(bytes(buf[start:end]), events)
            start = scan = nxt
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self._max_line:
            raise ProtocolError(f"server-sent event line longer than {self._max_line} bytes")
        return events

    def flush(self) -> list[SSEEvent]:
        """The stream ended: a trailing unterminated event is incomplete and is discarded,
        as the SSE specification requires, but a partial line is reported."""
        if self._buf:
            raise ProtocolError("stream ended in the middle of a server-sent event line")
        return []

    @property
    def mid_event(self) -> bool:
        """True when fields of an event have arrived but not its terminating blank line."""
        return self._has_fields or bool(self._buf)

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"server-sent event is not valid UTF-8: {e}") from e
        self._text_line(line, events)

    def _text_line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._has_fields and self._data:
                events.append(SSEEvent("\n".join(self._data), self._event, self._id, self._retry))
            self._data, self._event, self._retry, self._has_fields = [], None, None, False
            self._size = 0
            return
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._has_fields = True
        if name == "data":
            self._size += len(value) + 1
            if self._size > self._max_line:
                raise ProtocolError(f"server-sent event longer than {self._max_line} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)


def encode(event: SSEEvent) -> bytes:
    if event.event is None and event.id is None and event.retry is None \
            and "\n" not in event.data:  # most events: one data line
        return b"data: " + event.data.encode("utf-8") + b"\n\n"
    out: list[str] = []
    if event.event is not None:
        out.append(f"event: {event.event}\n")
    if event.id is not None:
        out.append(f"id: {event.id}\n")
    if event.retry is not None:
        out.append(f"retry: {event.retry}\n")
    for line in event.data.split("\n"):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8")


def encode_data(data: str) -> bytes:
    return encode(SSEEvent(data))


def comment(text: str = "") -> bytes:
    """A keep-alive comment line; clients ignore it."""
    return f": {text}\n\n".encode()
