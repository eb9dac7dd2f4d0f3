"""An incremental splitter for a JSON array streamed element by element.

Gemini's `streamGenerateContent` without `alt=sse` answers one JSON array,
`[{...}\\n,\\r\\n{...}\\n]`, sent as the elements are generated. `feed(bytes)`
returns the elements completed by those bytes, whatever the chunking: an
element may be split anywhere, even inside a string escape or a multi-byte
UTF-8 character, because only ASCII bytes are structural and text is decoded
once per whole element. The framing between elements (`[`, `,`, whitespace)
is kept as `lead` so a filter can re-emit the upstream's bytes unchanged.

Anything that is not that shape raises `ProtocolError`: a non-object element,
a missing comma, bytes after the closing `]`, an element over the size limit,
invalid UTF-8. Whether each element is valid JSON is left to the caller, who
parses it anyway; this only finds where it ends.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from ..errors import ProtocolError

MAX_ELEMENT = 16 * 1024 * 1024
MAX_FRAMING = 64 * 1024
_WHITESPACE = frozenset(b" \t\r\n")
_STRUCTURE = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')


@dataclass(frozen=True, slots=True)
class Element:
    lead: str  # the framing since the previous element: "[" or "," with whitespace
    text: str  # the element's JSON text


class _At(enum.Enum):
    START = "start"            # before "["
    FIRST = "first"            # after "[": an element or "]"
    ELEMENT = "element"        # inside an element
    AFTER = "after"            # after an element: "," or "]"
    NEXT = "next"              # after ",": an element
    END = "end"                # after "]": whitespace only


class JSONArraySplitter:
    def __init__(self, max_element: int = MAX_ELEMENT) -> None:
        self._at = _At.START
        self._max = max_element
        self._framing = bytearray()
        self._element = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self.count = 0

    @property
    def ended(self) -> bool:
        """The closing `]` has been read."""
        return self._at is _At.END

    def take_framing(self) -> str:
        """Framing read but not yet handed out with an element: after the end, the
        closing `]` and the whitespace around it."""
        text = self._framing.decode("ascii")
        self._framing.clear()
        return text

    def close(self) -> None:
        """The input ended; anything but a closed array is a cut stream."""
        if self._at is not _At.END:
            raise ProtocolError("the JSON array stream ended before its closing ']'")

    def feed(self, data: bytes) -> list[Element]:
        out: list[Element] = []
        i, n = 0, len(data)
        while i < n:
            if self._at is _At.ELEMENT:
                i = self._scan(data, i, out)
                continue
            byte = data[i]
            i += 1
            if byte in _WHITESPACE:
                self._frame(byte)
            elif self._at is _At.START and byte == 0x5B:  # [
                self._frame(byte)
                self._at = _At.FIRST
            elif self._at in (_At.FIRST, _At.NEXT) and byte == 0x7B:  # {
                self._at = _At.ELEMENT
                self._element.append(byte)
                self._depth = 1
            elif self._at in (_At.FIRST, _At.AFTER) and byte == 0x5D:  # ]
                self._frame(byte)
                self._at = _At.END
            elif self._at is _At.AFTER and byte == 0x2C:  # ,
                self._frame(byte)
                self._at = _At.NEXT
            else:
                raise ProtocolError(self._unexpected(byte))
        return out

    def _unexpected(self, byte: int) -> str:
        seen = repr(chr(byte)) if 0x20 <= byte < 0x7F else f"byte 0x{byte:02x}"
        expected = {
            _At.START: "'['",
            _At.FIRST: "an object or ']'",
            _At.NEXT: "an object",
            _At.AFTER: "',' or ']'",
            _At.END: "nothing after the closing ']'",
        }[self._at]
        return f"the JSON array stream has {seen} where {expected} was expected"

    def _frame(self, byte: int) -> None:
        self._framing.append(byte)
        if len(self._framing) > MAX_FRAMING:
            raise ProtocolError(f"more than {MAX_FRAMING} bytes of whitespace between elements")

    def _scan(self, data: bytes, i: int, out: list[Element]) -> int:
        """Consume element bytes from `i`; return where scanning stopped."""
        n = len(data)
        start = i
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                m = _IN_STRING.search(data, i)
                if m is None:
                    i = n
                    break
                i = m.end()
                if m.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
                continue
            m = _STRUCTURE.search(data, i)
            if m is None:
                i = n
                break
            i = m.end()
            char = m.group()
            if char == b'"':
                self._in_string = True
            elif char in (b"{", b"["):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._element += data[start:i]
                    out.append(self._finish())
                    return i
        self._element += data[start:i]
        if len(self._element) > self._max:
            raise ProtocolError(f"a JSON array element is longer than {self._max} bytes")
        return i

    def _finish(self) -> Element:
        if len(self._element) > self._max:
            raise ProtocolError(f"a JSON array element is longer than {self._max} bytes")
        try:
            text = self._element.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"a JSON array element is not valid UTF-8: {e}") from e
        lead = self._framing.decode("ascii")
        self._framing.clear()
        self._element.clear()
        self._at = _At.AFTER
        self.count += 1
        return Element(lead, text)
