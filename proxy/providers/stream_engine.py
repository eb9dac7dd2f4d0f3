"""The one engine that governs a stream (sans-IO); each wire format supplies a codec.

The engine is the `StreamFilter` of providers.base. It owns what every format's stream
shares: the queue of decoded events not yet released, the calls handed out and waiting
for their decisions, the order (nothing after a pending call is released before it is
decided), the bound on held argument text (past it the stream is cut, providers/held.py),
a refusal (`on_deny: error`) ending the stream with the format's error, and the ways a
stream fails: a decoder that cannot read the input, an event out of place, the upstream's
own error event (passed on as it came), and an end of input before the answer was
complete. When a stream fails, the calls still held are handed out with a `problem`, to
be decided as denied and audited, never released.

A codec knows one format's frames and what they mean:

- `decode(chunk)` / `flush()`: the incremental decoder (SSE, AWS event stream ...);
  a `ProtocolError` fails the stream at once, `Broken` after the events it still carries.
- `completes(event)`: looks at the next event *before* it is applied and says which held
  calls it completes (a `Completing`), or None. It raises `UpstreamFailed` for the
  upstream's own error event, `ProtocolError` for an event that cannot be read.
- `apply(event)`: right after `completes(event)` returned None, for the same event (so a
  codec may keep what it parsed there): holds a call's fragments, returns the bytes the
  client gets now; sets `grew` when it held argument text, `done` at the answer's end,
  and puts in `completed` the held calls the event itself completed (where the format
  closes a call with an event of its own, as Responses' `output_item.done`).
- `held()`: the calls held so far, `held_size()` the bytes they hold, `call(handle,
  problem)` the call as judged, `dropped(handle, limit)` the call cut over `limit`
  (held.cut), what it held dropped, `settle(handle, call)` once it is decided,
  `render(handle, call, decision)` the bytes that replace it, `error(message, failure)`
  the format's mid-stream error, `complete()` whether the input so far is a whole
  answer, `trailer(chunk)` what passes of input after the answer's end (`done`).
- `ran`: provider-run calls completed since the engine last took them (provider_ran.py);
  `failed`: the upstream's own word that the answer failed (Responses' `response.failed`).

A codec may hold more than calls (Gemini holds the chunks behind a call too): its
`render` may return nothing until the last call of a batch is decided. Keep-alives while
a hold waits are written by the front end (server/llm_answers.py), which owns the clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from ..errors import ProtocolError, UpstreamError
from ..model import Decision, OnDeny, ToolCall, Usage
from .base import Step, denial_text
from .held import cut_denial

CUT_MESSAGE = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
TRUNCATED_MESSAGE = "the upstream stream ended before the response was complete"


class Failure(enum.Enum):
    """Why the engine ends a stream with the format's error (`Codec.error`)."""

    BAD = "bad"              # input that cannot be read, or an event out of place
    UPSTREAM = "upstream"    # the upstream's error, too malformed to pass on as it came
    TRUNCATED = "truncated"  # the input ended before the answer did
    DENIED = "denied"        # a call refused (`on_deny: error`) or cut over the limit


class Broken(ProtocolError):
    """A decoder met bad input after `events` it could still read: they are handled first
    (whatever the chunking), then the stream fails with `message`."""

    def __init__(self, message: str, events: Sequence[object]) -> None:
        super().__init__(message)
        self.events = events


class UpstreamFailed(Exception):
    """The upstream's own error event: `data` passes on as it came, then the stream ends;
    `passed` False: nothing could be passed on, the format's error (UPSTREAM) is sent."""

    def __init__(self, data: bytes, message: str, *, passed: bool = True) -> None:
        super().__init__(message)
        self.data = data
        self.message = message
        self.passed = passed


type Completing[H] = tuple[Sequence[H], str | None]  # calls completed, and their problem


class Codec[E, H](Protocol):
    noun: str  # what the format calls a call, in a problem: "tool call", "function call"
    grew: bool
    done: bool
    completed: list[H]
    ran: list[ToolCall]
    failed: str | None

    @property
    def usage(self) -> Usage | None: ...

    def decode(self, chunk: bytes) -> Iterable[E]: ...

    def flush(self) -> Iterable[E]: ...

    def completes(self, event: E) -> Completing[H] | None: ...

    def apply(self, event: E) -> bytes: ...

    def held(self) -> list[H]: ...

    def held_size(self) -> int: ...

    def call(self, handle: H, problem: str | None) -> ToolCall: ...

    def dropped(self, handle: H, limit: int) -> ToolCall: ...

    def settle(self, handle: H, call: ToolCall) -> None: ...

    def render(self, handle: H, call: ToolCall, decision: Decision) -> bytes: ...

    def error(self, message: str, failure: Failure) -> bytes: ...

    def complete(self) -> bool: ...

    def trailer(self, chunk: bytes) -> bytes: ...


class StreamEngine[E, H]:
    """Filters one stream through `codec`; see `providers.base` for the protocol."""

    def __init__(self, codec: Codec[E, H], max_arguments: int) -> None:
        self._codec = codec
        self._max_arguments = max_arguments
        self._queue: deque[E] = deque()
        self._waiting: list[tuple[H, ToolCall]] = []
        self._broken: str | None = None
        self._ended = False
        self._eof = False
        self._final = b""
        self._failed: str | None = None

    @property
    def usage(self) -> Usage | None:
        return self._codec.usage

    @property
    def failed(self) -> str | None:
        """Why the stream was ended with an error (or the upstream said it failed), or None."""
        return self._failed if self._failed is not None else self._codec.failed

    def feed(self, chunk: bytes) -> Step:
        if self._ended:
            return Step(self._codec.trailer(chunk)) if self._codec.done else Step()
        if self._broken is None:
            try:
                self._queue.extend(self._codec.decode(chunk))
            except Broken as e:
                self._queue.extend(e.events)  # type: ignore[arg-type]  # the codec's own events
                self._broken = e.message
            except ProtocolError as e:
                return self._fail(e.message, Failure.BAD)
        return self._reported(self._run())

    def close(self) -> Step:
        """The upstream ended; an answer not complete by then was cut."""
        if self._ended:
            return Step()
        if self._broken is None:
            try:
                self._queue.extend(self._codec.flush())
            except Broken as e:
                self._queue.extend(e.events)  # type: ignore[arg-type]
                self._broken = e.message
            except ProtocolError as e:
                return self._fail(e.message, Failure.BAD)
        self._eof = True
        return self._reported(self._run())

    def decide(self, decisions: Sequence[Decision]) -> Step:
        if len(decisions) != len(self._waiting):
            raise ValueError("one decision is needed for each pending call")
        codec = self._codec
        out = bytearray()
        refused: list[tuple[ToolCall, Decision]] = []
        for (handle, call), decision in zip(self._waiting, decisions, strict=True):
            codec.settle(handle, call)
            if self._ended:
                continue  # the stream failed while the call was open: never released
            if not decision.allowed and decision.on_deny is OnDeny.ERROR:
                refused.append((call, decision))
            else:
                out += codec.render(handle, call, decision)
        self._waiting = []
        if refused and not self._ended:
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            text = " ".join(denial_text(c, d) for c, d in refused)
            return Step(codec.error(text, Failure.DENIED))
        if self._ended:
            final, self._final = self._final, b""
            return Step(bytes(out) + final)
        step = self._reported(self._run())
        return Step(bytes(out) + step.data, step.pending, step.ran)

    def _reported(self, step: Step) -> Step:
        """`step`, with the provider-run calls completed since the last one."""
        ran = self._codec.ran
        if not ran:
            return step
        taken = tuple(ran)
        ran.clear()
        return Step(step.data, step.pending, step.ran + taken)

    def _request(self, handles: Sequence[H], problem: str | None) -> tuple[ToolCall, ...]:
        call = self._codec.call
        self._waiting = [(h, call(h, problem)) for h in handles]
        return tuple(c for _, c in self._waiting)

    def _fail(self, message: str, failure: Failure | None) -> Step:
        """End the stream with the format's error (None: the upstream's own was passed on);
        the calls still held are handed out, to be decided as denied and audited."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        self._final = b"" if failure is None else self._codec.error(message, failure)
        problem = f"{message}; the {self._codec.noun} was not released"
        more = [(h, self._codec.call(h, problem)) for h in self._codec.held()
                if not any(h is w for w, _ in self._waiting)]
        if more or self._waiting:
            self._waiting.extend(more)
            return Step(b"", tuple(c for _, c in self._waiting))
        final, self._final = self._final, b""
        return Step(final)

    def _cut(self) -> tuple[ToolCall, ...]:
        """Too much argument text held: end the stream with the denial, buffer nothing
        more, and hand out every held call, arguments dropped, to be judged and audited."""
        self._waiting = [(h, self._codec.dropped(h, self._max_arguments))
                         for h in self._codec.held()]
        self._codec.completed.clear()
        calls = tuple(c for _, c in self._waiting)
        self._ended = True
        self._failed = CUT_MESSAGE
        self._queue.clear()
        self._final = self._codec.error(cut_denial(calls), Failure.DENIED)
        return calls

    def _run(self) -> Step:
        out = bytearray()
        codec = self._codec
        queue = self._queue
        completes, apply = codec.completes, codec.apply  # the per-event path: looked up once
        while queue and not self._waiting and not self._ended:
            event = queue[0]
            try:
                completing = completes(event)
                if completing is not None:
                    return Step(bytes(out), self._request(*completing))
                queue.popleft()
                out += apply(event)
            except UpstreamFailed as e:
                queue.popleft()
                out += e.data
                step = self._fail(e.message, None if e.passed else Failure.UPSTREAM)
                return Step(bytes(out) + step.data, step.pending)
            except UpstreamError as e:
                step = self._fail(e.message, Failure.BAD)
                return Step(bytes(out) + step.data, step.pending)
            if codec.done:
                self._ended = True
                continue
            if codec.grew:  # only what is held can take it over the limit
                codec.grew = False
                if codec.held_size() > self._max_arguments:
                    return Step(bytes(out), self._cut())
            if codec.completed:
                completed = list(codec.completed)
                codec.completed.clear()
                return Step(bytes(out), self._request(completed, None))
        if queue or self._waiting or self._ended:
            return Step(bytes(out))
        if self._broken is not None:
            step = self._fail(self._broken, Failure.BAD)
            return Step(bytes(out) + step.data, step.pending)
        if self._eof:
            if not codec.complete():
                step = self._fail(TRUNCATED_MESSAGE, Failure.TRUNCATED)
                return Step(bytes(out) + step.data, step.pending)
            self._ended = True
        return Step(bytes(out))
