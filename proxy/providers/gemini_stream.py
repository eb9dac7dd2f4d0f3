"""Gemini streams: filter streamGenerateContent, SSE or a JSON array.

A stream is either SSE (`alt=sse`, one response chunk per `data:`) or one JSON
array sent element by element. Either way the filter holds a chunk carrying a
call, and every chunk after it, until the candidate's `finishReason` arrives
(it marks a call cut by MAX_TOKENS or MALFORMED_FUNCTION_CALL) or the array
closes; then it hands the calls out to be decided. Chunks before pass at once.
Past `max_arguments` bytes held (the chunk with the call and those behind it), the
stream is cut (providers/held.py).
Reading the chunks themselves is gemini_read.py; rewriting them, gemini_rewrite.py;
the order, holds, cuts and failures are the stream engine's (stream_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Decision, ToolCall, Usage
from .gemini_read import Candidate, Chunk, FunctionCall, read_chunk
from .gemini_rewrite import error_body, finish_problem, rewrite, tool_call
from .held import DEFAULT_MAX_ARGUMENTS, cut, text_size
from .jsonarray import JSONArraySplitter
from .sse import SSEDecoder, SSEEvent, encode, encode_data
from .stream_engine import Broken, Completing, Failure, StreamEngine, UpstreamFailed

# --- streams ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Unit:
    text: str
    lead: str = ""                    # JSON-array framing before the element
    event: SSEEvent | None = None     # the SSE event it came in
    end: bool = False                 # the array's closing `]`: its framing is the trailer


@dataclass(slots=True)
class _Held:
    unit: _Unit
    chunk: Chunk
    calls: list[tuple[Candidate, FunctionCall, int]] = field(default_factory=list)


type _Call = tuple[Candidate, FunctionCall, int]  # a held call: the engine's handle


class GeminiCodec:
    """streamGenerateContent chunks for the stream engine (providers/stream_engine.py).

    What it holds is chunks, not calls: the chunk with a call and every chunk behind it,
    until the call's candidate finishes or the array closes. The engine's handles are
    the calls in them; the held chunks are rewritten and released when the last of the
    calls is decided."""

    def __init__(self, sse: bool) -> None:
        self.noun = "function call"
        self.grew = False
        self.done = False     # the upstream's array closed and was passed on
        self.completed: list[_Call] = []
        self.ran: list[ToolCall] = []
        self.failed: str | None = None
        self.usage: Usage | None = None
        self.output_units = 0
        self._sse = sse
        self._held_size = 0  # text of the chunks in _held
        self._events = SSEDecoder()
        self._array = JSONArraySplitter()
        self._end_read = False
        self._held: list[_Held] = []
        self._decided: list[tuple[ToolCall, Decision]] = []
        self._finish: dict[int, str] = {}
        self._seen: set[int] = set()
        self._text: dict[int, bool] = {}
        self._ordinal: dict[int, int] = {}
        self._chunks = 0
        self._blocked = False
        self._opened = False   # the array's "[" has been sent
        self._chunk: Chunk | None = None

    def decode(self, chunk: bytes) -> list[_Unit]:
        try:
            if self._sse:
                return [_Unit(e.data, event=e) for e in self._events.feed(chunk)]
            units = [_Unit(e.text, lead=e.lead) for e in self._array.feed(chunk)]
        except ProtocolError as e:
            # The units before the bad input are handled first, as they came.
            raise Broken(e.message, []) from None
        if self._array.ended and not self._end_read:
            self._end_read = True
            units.append(_Unit("", end=True))
        return units

    def flush(self) -> list[_Unit]:
        if self._sse:
            try:
                self._events.flush()
            except ProtocolError as e:
                raise Broken(e.message, []) from None
        return []

    def trailer(self, chunk: bytes) -> bytes:
        """Whitespace after the array's closing bracket passes; anything else is noted."""
        try:
            self._array.feed(chunk)
        except ProtocolError as e:
            self.failed = self.failed or e.message
            return b""
        return self._array.take_framing().encode()

    def held(self) -> list[_Call]:
        return [c for h in self._held for c in h.calls]

    def held_size(self) -> int:
        return self._held_size

    def call(self, handle: _Call, problem: str | None) -> ToolCall:
        cand, call, index = handle
        return tool_call(cand, call, index, problem or finish_problem(self._finish.get(cand.index)))

    def dropped(self, handle: _Call, limit: int) -> ToolCall:
        cand, call, index = handle
        self._held_size = 0
        return cut(ToolCall(id=call.id, name=call.name, raw_arguments="", arguments=None,
                            index=index, choice=cand.index), limit,
                   what="the call and the answer held behind it are")

    def settle(self, handle: _Call, call: ToolCall) -> None:
        self._held_size = 0  # whatever happens next, what is held now goes

    def complete(self) -> bool:
        """An SSE stream is complete when every candidate has its finishReason; an array
        when it closed (its end unit sets `done`)."""
        if not self._sse:
            return False
        return (self._chunks > 0 and self._seen <= self._finish.keys()
                and (bool(self._seen) or self._blocked))

    def error(self, message: str, failure: Failure) -> bytes:
        status, code = _ERRORS[failure]
        body = error_body(status, message, code)
        if self._sse:
            return encode_data(body)
        lead = ",\n" if self._opened else "["
        self._opened = True
        return f"{lead}{body}\n]".encode()

    def render(self, handle: _Call, call: ToolCall, decision: Decision) -> bytes:
        """Nothing until the last held call is decided; then every held chunk, rewritten."""
        self._decided.append((call, decision))
        if len(self._decided) < sum(len(h.calls) for h in self._held):
            return b""
        texts = rewrite([h.chunk for h in self._held], self._decided, self._text)
        out = b"".join(self._emit(h.unit, text)
                       for h, text in zip(self._held, texts, strict=True))
        self._held.clear()
        self._decided = []
        return out

    def completes(self, unit: _Unit) -> Completing[_Call] | None:
        if unit.end:  # the array closed: what is held is complete
            return (self.held(), None) if self._held else None
        try:
            chunk = read_chunk(unit.text)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"an upstream stream chunk is not valid: {e}") from e
        if chunk.error is not None:
            message = f"the upstream sent an error mid-stream: {chunk.error.message}"
            if not chunk.error.well_formed:
                raise UpstreamFailed(b"", message, passed=False)
            # The upstream's own error passes; an array is closed after it.
            raise UpstreamFailed(self._emit(unit, unit.text) + (b"" if self._sse else b"\n]"),
                                 message)
        late = [c.index for c, _ in chunk.calls if c.index in self._finish]
        if late:
            raise ProtocolError(f"a function call arrived after candidate {late[0]} finished")
        self._chunk = chunk
        return None

    def apply(self, unit: _Unit) -> bytes:
        if unit.end:
            self.done = True
            return self._array.take_framing().encode()
        chunk = self._chunk
        assert chunk is not None
        self._note(chunk)
        if self._held or any(True for _ in chunk.calls):
            held = _Held(unit, chunk)
            for cand, call in chunk.calls:
                index = self._ordinal.get(cand.index, 0)
                self._ordinal[cand.index] = index + 1
                held.calls.append((cand, call, index))
            self._held.append(held)
            self._held_size += text_size(unit.text)
            self.grew = True
            if all(c.index in self._finish for h in self._held for c, _, _ in h.calls):
                self.completed.extend(self.held())
            return b""
        rewrite([chunk], [], self._text)
        return self._emit(unit, unit.text)

    def _emit(self, unit: _Unit, text: str) -> bytes:
        if unit.event is not None:
            e = unit.event
            return encode(e if text == e.data else SSEEvent(text, e.event, e.id, e.retry))
        self._opened = True
        return (unit.lead + text).encode("utf-8")

    def _note(self, chunk: Chunk) -> None:
        self._chunks += 1
        self._blocked = self._blocked or chunk.blocked
        if chunk.usage is not None:
            self.usage = chunk.usage
        for cand in chunk.candidates:
            self._seen.add(cand.index)
            self.output_units += len(cand.parts)
            if cand.finish is not None:
                self._finish.setdefault(cand.index, cand.finish)


_ERRORS = {Failure.BAD: (502, "bad_upstream_stream"),
           Failure.UPSTREAM: (502, "upstream_error"),
           Failure.TRUNCATED: (502, "upstream_truncated"),
           Failure.DENIED: (403, "tool_call_denied")}


class GeminiStream(StreamEngine[_Unit, _Call]):
    """Filters one streamGenerateContent response; see `providers.base` for the protocol."""

    def __init__(self, sse: bool, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the bytes held back at most (limits.max_arguments_bytes)."""
        self._gemini = GeminiCodec(sse)
        super().__init__(self._gemini, max_arguments)

    @property
    def output_units(self) -> int:
        return self._gemini.output_units
