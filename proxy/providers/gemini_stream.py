"""Gemini streams: filter streamGenerateContent, SSE or a JSON array.

A stream is either SSE (`alt=sse`, one response chunk per `data:`) or one JSON
array sent element by element. Either way the filter holds a chunk carrying a
call, and every chunk after it, until the candidate's `finishReason` arrives
(it marks a call cut by MAX_TOKENS or MALFORMED_FUNCTION_CALL) or the array
closes; then it hands the calls out to be decided. Chunks before pass at once.
Past `max_arguments` bytes held (the chunk with the call and those behind it), the
stream is cut (providers/held.py).
Reading the chunks themselves is gemini_read.py; rewriting them, gemini_rewrite.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Decision, OnDeny, ToolCall, Usage
from .base import Step, denial_text
from .gemini_read import Candidate, Chunk, FunctionCall, read_chunk
from .gemini_rewrite import error_body, finish_problem, rewrite, tool_call
from .held import DEFAULT_MAX_ARGUMENTS, cut, cut_denial, text_size
from .jsonarray import JSONArraySplitter
from .sse import SSEDecoder, SSEEvent, encode, encode_data

# --- streams ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Unit:
    text: str
    lead: str = ""                    # JSON-array framing before the element
    event: SSEEvent | None = None     # the SSE event it came in
    failure: str | None = None        # the framing broke here


@dataclass(slots=True)
class _Held:
    unit: _Unit
    chunk: Chunk
    calls: list[tuple[Candidate, FunctionCall, int]] = field(default_factory=list)


class GeminiStream:
    """Filters one streamGenerateContent response; see `providers.base` for the protocol."""

    def __init__(self, sse: bool, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the bytes held back at most (limits.max_arguments_bytes)."""
        self._sse = sse
        self._max_arguments = max_arguments
        self._held_size = 0  # text of the chunks in _held
        self._events = SSEDecoder()
        self._array = JSONArraySplitter()
        self._queue: deque[_Unit] = deque()
        self._held: list[_Held] = []
        self._waiting: list[ToolCall] = []
        self._finish: dict[int, str] = {}
        self._seen: set[int] = set()
        self._text: dict[int, bool] = {}
        self._ordinal: dict[int, int] = {}
        self._chunks = 0
        self._blocked = False
        self._opened = False   # the array's "[" has been sent
        self._done = False     # the upstream's array closed and was passed on
        self._ended = False
        self._eof = False
        self._final = b""
        self._usage: Usage | None = None
        self._failed: str | None = None
        self.output_units = 0

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def failed(self) -> str | None:
        return self._failed

    def feed(self, chunk: bytes) -> Step:
        if self._done:
            return self._trailer(chunk)
        if self._ended:
            return Step()
        if self._sse:
            try:
                self._queue.extend(_Unit(e.data, event=e) for e in self._events.feed(chunk))
            except ProtocolError as e:
                self._queue.append(_Unit("", failure=e.message))
        else:
            try:
                self._queue.extend(_Unit(e.text, lead=e.lead) for e in self._array.feed(chunk))
            except ProtocolError as e:
                self._queue.append(_Unit("", failure=e.message))
        return self._run()

    def close(self) -> Step:
        """The upstream ended. An SSE stream is complete when every candidate has its
        finishReason; an array when it closed. Anything else was cut."""
        if self._ended:
            return Step()
        if self._sse:
            try:
                self._events.flush()
            except ProtocolError as e:
                self._queue.append(_Unit("", failure=e.message))
        self._eof = True
        return self._run()

    def decide(self, decisions: Sequence[Decision]) -> Step:
        if len(decisions) != len(self._waiting):
            raise ValueError("one decision is needed for each pending call")
        calls, self._waiting = self._waiting, []
        self._held_size = 0  # whatever happens below, what is held now goes
        if self._ended:  # the stream failed: these calls were denied for the record only
            self._held.clear()
            final, self._final = self._final, b""
            return Step(final)
        refused = [(c, d) for c, d in zip(calls, decisions, strict=True)
                   if not d.allowed and d.on_deny is OnDeny.ERROR]
        if refused:
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            self._held.clear()
            text = " ".join(denial_text(c, d) for c, d in refused)
            return Step(self._error(403, text, "tool_call_denied"))
        texts = rewrite([h.chunk for h in self._held], list(zip(calls, decisions, strict=True)),
                        self._text)
        out = bytearray()
        for held, text in zip(self._held, texts, strict=True):
            out += self._emit(held.unit, text)
        self._held.clear()
        step = self._run()
        return Step(bytes(out) + step.data, step.pending)

    # -- internals ---------------------------------------------------------------------

    def _trailer(self, data: bytes) -> Step:
        """Whitespace after the array's closing bracket passes; anything else is noted."""
        try:
            self._array.feed(data)
        except ProtocolError as e:
            self._failed = self._failed or e.message
            return Step()
        return Step(self._array.take_framing().encode())

    def _emit(self, unit: _Unit, text: str) -> bytes:
        if unit.event is not None:
            e = unit.event
            return encode(e if text == e.data else SSEEvent(text, e.event, e.id, e.retry))
        self._opened = True
        return (unit.lead + text).encode("utf-8")

    def _error(self, status: int, message: str, code: str) -> bytes:
        body = error_body(status, message, code)
        if self._sse:
            return encode_data(body)
        lead = ",\n" if self._opened else "["
        self._opened = True
        return f"{lead}{body}\n]".encode()

    def _fail(self, message: str, code: str = "bad_upstream_stream", *,
              notify: bool = True) -> Step:
        """End the stream; held calls are still handed out, to be denied and audited."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        if notify:
            self._final = self._error(502, message, code)
        else:  # the upstream's own error event was passed on
            self._final = b"" if self._sse else b"\n]"
        if self._held:
            return Step(b"", self._request(f"{message}; the function call was not released"))
        final, self._final = self._final, b""
        return Step(final)

    def _cut(self) -> tuple[ToolCall, ...]:
        """Too much held: end the stream with the denial, buffer nothing more, and hand
        out the held calls, arguments dropped, to be judged and audited."""
        self._waiting = [
            cut(ToolCall(id=call.id, name=call.name, raw_arguments="", arguments=None,
                         index=index, choice=cand.index), self._max_arguments,
                what="the call and the answer held behind it are")
            for held in self._held for cand, call, index in held.calls
        ]
        self._held.clear()
        self._held_size = 0
        self._ended = True
        self._failed = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
        self._queue.clear()
        self._final = self._error(403, cut_denial(self._waiting), "tool_call_denied")
        return tuple(self._waiting)

    def _request(self, problem: str | None) -> tuple[ToolCall, ...]:
        self._waiting = [
            tool_call(cand, call, index, problem or finish_problem(self._finish.get(cand.index)))
            for held in self._held for cand, call, index in held.calls
        ]
        return tuple(self._waiting)

    def _ready(self) -> bool:
        if not self._sse and self._array.ended and not self._queue:
            return True
        return all(c.index in self._finish for h in self._held for c, _, _ in h.calls)

    def _complete(self) -> bool:
        if not self._sse:
            return self._array.ended
        return (self._chunks > 0 and self._seen <= self._finish.keys()
                and (bool(self._seen) or self._blocked))

    def _run(self) -> Step:
        out = bytearray()
        while not self._waiting and not self._ended:
            if self._held and self._ready():
                return Step(bytes(out), self._request(None))
            if not self._queue:
                break
            unit = self._queue.popleft()
            if unit.failure is not None:
                step = self._fail(unit.failure)
                return Step(bytes(out) + step.data, step.pending)
            try:
                chunk = read_chunk(unit.text)
            except (ValueError, RecursionError) as e:
                step = self._fail(f"an upstream stream chunk is not valid: {e}")
                return Step(bytes(out) + step.data, step.pending)
            if chunk.error is not None:
                message = f"the upstream sent an error mid-stream: {chunk.error.message}"
                if chunk.error.well_formed:
                    out += self._emit(unit, unit.text)
                    step = self._fail(message, notify=False)
                else:
                    step = self._fail(message, "upstream_error")
                return Step(bytes(out) + step.data, step.pending)
            late = [c.index for c, _ in chunk.calls if c.index in self._finish]
            if late:
                step = self._fail(f"a function call arrived after candidate {late[0]} finished")
                return Step(bytes(out) + step.data, step.pending)
            self._note(chunk)
            if self._held or any(True for _ in chunk.calls):
                held = _Held(unit, chunk)
                for cand, call in chunk.calls:
                    index = self._ordinal.get(cand.index, 0)
                    self._ordinal[cand.index] = index + 1
                    held.calls.append((cand, call, index))
                self._held.append(held)
                self._held_size += text_size(unit.text)
                if self._held_size > self._max_arguments:
                    return Step(bytes(out), self._cut())
                continue
            rewrite([chunk], [], self._text)
            out += self._emit(unit, unit.text)
        if self._waiting or self._ended or self._queue:
            return Step(bytes(out))
        if not self._sse and self._array.ended:
            self._ended = self._done = True
            out += self._array.take_framing().encode()
        elif self._eof:
            if not self._complete():
                step = self._fail("the upstream stream ended before the response was complete",
                                  "upstream_truncated")
                return Step(bytes(out) + step.data, step.pending)
            self._ended = True
        return Step(bytes(out))

    def _note(self, chunk: Chunk) -> None:
        self._chunks += 1
        self._blocked = self._blocked or chunk.blocked
        if chunk.usage is not None:
            self._usage = chunk.usage
        for cand in chunk.candidates:
            self._seen.add(cand.index)
            self.output_units += len(cand.parts)
            if cand.finish is not None:
                self._finish.setdefault(cand.index, cand.finish)
