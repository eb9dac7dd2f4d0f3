"""What a stream filter holds back from the client, and the bound on it.

A filter holds a tool call's argument text until the call is complete and decided
(providers.base). `limits.max_arguments_bytes` bounds that text: past it, the filter
stops buffering and cuts the stream at once; the calls it held are handed out as
`too_large`, to be denied as `tether:arguments-too-large` and audited without their
arguments, and the client gets the denial as the provider's mid-stream error. A whole
(non-streamed) answer is read within `limits.max_response_bytes`; a call in it whose
arguments are over the limit is denied the same way (server/llm_answers.py).

`HeldText` keeps the fragments as they come (often a few characters each) without a
Python object per fragment, so what a filter holds is about the bytes it counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..model import Action, Decision, ToolCall
from ..policy.engine import TOO_LARGE
from .base import denial_text

DEFAULT_MAX_ARGUMENTS = 4 * 1024 * 1024
_RUN = 256  # fragments joined into one string at a time


def text_size(text: str) -> int:
    """The UTF-8 length of `text`, without encoding it when it is ASCII (the usual case);
    a lone surrogate, which no encoder takes, counts as the 3 bytes it was sent as."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class HeldText:
    """Argument text arriving in fragments: appended, measured in UTF-8 bytes, joined once."""

    __slots__ = ("_parts", "_run", "size", "length", "pieces")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._run: list[str] = []
        self.size = 0      # UTF-8 bytes held
        self.length = 0    # characters held
        self.pieces = 0    # fragments appended, empty ones too

    def append(self, text: str) -> None:
        self._run.append(text)
        self.size += text_size(text)
        self.length += len(text)
        self.pieces += 1
        if len(self._run) >= _RUN:
            self._parts.append("".join(self._run))
            self._run.clear()

    def text(self) -> str:
        return "".join(self._parts) + "".join(self._run)

    def clear(self) -> None:
        """Drop what is held (the call was cut): nothing of it is ever released."""
        self._parts.clear()
        self._run.clear()
        self.size = self.length = 0


def cut(call: ToolCall, limit: int, *, streamed: bool = True,
        what: str = "its arguments are") -> ToolCall:
    """The call as judged when its arguments are over `limit`: by name, arguments
    dropped (the filter built it with empty arguments; a whole answer's had them)."""
    where = "; the stream was cut there" if streamed else ""
    return replace(call, raw_arguments="", arguments=None, too_large=True,
                   problem=f"{what} over the {limit}-byte limit "
                           f"(limits.max_arguments_bytes){where}")


def over_limit(call: ToolCall, limit: int) -> ToolCall | None:
    """A whole answer's call whose arguments are over `limit`, cut; None when within."""
    if call.too_large or text_size(call.raw_arguments) <= limit:
        return None
    return cut(call, limit, streamed=False)


def cut_denial(calls: Sequence[ToolCall]) -> str:
    """What the client reads in the error that ends a cut stream: the verdict the calls
    (from `cut`) get once judged, since a too-large call is always denied."""
    return " ".join(denial_text(c, Decision(Action.DENY, (TOO_LARGE,), c.problem or ""))
                    for c in calls)
