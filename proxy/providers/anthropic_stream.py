"""Anthropic Messages streams (sans-IO); what whole responses share with them is in
anthropic_wire.py.

A stream is a series of named SSE events: `message_start`; per content block
`content_block_start`, `content_block_delta`s and `content_block_stop`; then
`message_delta` (stop_reason, cumulative usage) and `message_stop`. `ping` may
come anywhere and `error` ends the stream. Blocks follow one another with
`index` 0, 1, 2 ..., and the SDKs accumulate content *by that index* (a start
appends, a delta edits `content[index]`), so tether never renumbers: a denied
block becomes a text block at the same index.

Only `tool_use` blocks are held: they are the calls the agent will run.
`server_tool_use`, `mcp_tool_use`, their result blocks, `thinking` and
`redacted_thinking` pass through, because server tools run at Anthropic, not in
the agent, and their results are already in the answer when the agent sees it.
A `server_tool_use` or `mcp_tool_use` block is reported in `Step.ran` at its
`content_block_stop`, with its input assembled (provider_ran.StreamedBlock), for
the server to judge what ran.

A `tool_use` block is held from its start until the first event after its
stop, which tells whether the answer ended right there with stop_reason
`max_tokens` (the call was cut off and is denied). An allowed block is re-emitted
as its original start event, one `input_json_delta` carrying every fragment's
text concatenated (so the SDK's accumulated `input` is what the upstream sent),
and its original stop event. Pings pass at once, even while a block is held:
they carry nothing and keep the client's connection alive. Past `max_arguments`
bytes of input held, the stream is cut (providers/held.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Decision, OnDeny, ToolCall, Usage
from ..surrogates import json_text
from .anthropic_wire import (
    CUT_REASONS,
    GOVERNED_BLOCK,
    JSONObject,
    block_index,
    cut_problem,
    error_event,
    read_event,
    stop_reason,
    tool_call,
    usage_of,
    usage_total,
)
from .base import Step, denial_text
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut, cut_denial
from .provider_ran import ANTHROPIC_RAN, StreamedBlock
from .sse import SSEDecoder, SSEEvent, encode


def _event(kind: str, body: JSONObject) -> bytes:
    return encode(SSEEvent(json_text(body), event=kind))


@dataclass(slots=True)
class _Tool:
    """A tool_use block held back: its original start and stop events and input text."""

    index: int
    id: str
    name: str
    start: SSEEvent
    fragments: HeldText = field(default_factory=HeldText)
    stop: SSEEvent | None = None
    problem: str | None = None


class MessagesStream:
    """Filters one Messages SSE stream; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the input bytes held back at most (limits.max_arguments_bytes)."""
        self._max_arguments = max_arguments
        self._decoder = SSEDecoder()
        self._queue: deque[SSEEvent] = deque()
        self._started = False
        self._next_index = 0
        self._open: set[int] = set()       # blocks passed through and not yet stopped
        self._held: _Tool | None = None
        self._running: dict[int, StreamedBlock] = {}  # provider-run blocks not yet stopped
        self._ran: list[ToolCall] = []                 # ... stopped, not yet reported
        self._pending: ToolCall | None = None
        self._kept = 0
        self._denied = 0
        self._finished = False             # a message_delta with a stop_reason arrived
        self._ended = False
        self._eof = False
        self._final = b""
        self._usage: dict[str, int] = {}
        self._failed: str | None = None

    @property
    def usage(self) -> Usage | None:
        return usage_total(self._usage)

    @property
    def failed(self) -> str | None:
        """Why the stream was ended with an error event, or None."""
        return self._failed

    def feed(self, chunk: bytes) -> Step:
        if self._ended:
            return Step()
        try:
            self._queue.extend(self._decoder.feed(chunk))
        except ProtocolError as e:
            return self._fail(e.message)
        return self._reported(self._run())

    def close(self) -> Step:
        """The upstream ended. Without message_stop (or a final message_delta) the
        answer was cut: a held call is denied and the client gets an error event."""
        if self._ended:
            return Step()
        try:
            self._decoder.flush()
        except ProtocolError as e:
            return self._fail(e.message)
        self._eof = True
        return self._reported(self._run())

    def decide(self, decisions: Sequence[Decision]) -> Step:
        call, held = self._pending, self._held
        if call is None or held is None or len(decisions) != 1:
            raise ValueError("one decision is needed for the pending call")
        decision = decisions[0]
        self._pending = self._held = None
        if self._ended:
            # The stream failed while the call was open: it is denied, never released.
            final, self._final = self._final, b""
            return Step(final)
        if not decision.allowed and decision.on_deny is OnDeny.ERROR:
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            return Step(error_event(denial_text(call, decision), "permission_error"))
        out = self._render(held, call, decision)
        step = self._run()
        return self._reported(Step(out + step.data, step.pending))

    def _reported(self, step: Step) -> Step:
        """`step`, with the provider-run calls completed since the last one."""
        if not self._ran:
            return step
        ran, self._ran = tuple(self._ran), []
        return Step(step.data, step.pending, step.ran + ran)

    def _fail(self, message: str, *, notify: bool = True) -> Step:
        """End the stream with an error event; a held call is still decided (as denied)."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        self._final = error_event(message, "api_error") if notify else b""
        if self._held is not None:
            problem = f"{message}; the tool call was not released"
            self._pending = self._complete(self._held, problem)
            return Step(b"", (self._pending,))
        final, self._final = self._final, b""
        return Step(final)

    def _cut(self, held: _Tool) -> tuple[ToolCall, ...]:
        """Too much input held: end the stream with the denial, buffer nothing more, and
        hand out the call, input dropped, to be judged and audited."""
        self._pending = cut(tool_call(id=held.id, name=held.name, raw="", index=held.index),
                            self._max_arguments)
        held.fragments.clear()
        self._ended = True
        self._failed = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
        self._queue.clear()
        self._final = error_event(cut_denial((self._pending,)), "permission_error")
        return (self._pending,)

    def _complete(self, held: _Tool, problem: str | None = None) -> ToolCall:
        return tool_call(id=held.id, name=held.name, raw=held.fragments.text(),
                         index=held.index, problem=problem or held.problem)

    def _run(self) -> Step:
        out = bytearray()
        while self._queue and self._pending is None and not self._ended:
            event = self._queue[0]
            try:
                kind, obj = read_event(event)
                if kind == "error":
                    self._queue.popleft()
                    out += encode(event)
                    step = self._fail("the upstream sent an error event mid-stream", notify=False)
                    return Step(bytes(out) + step.data, step.pending)
                if kind == "ping":
                    self._queue.popleft()
                    out += encode(event)
                    continue
                if self._held is not None:
                    if self._hold(self._held, kind, obj, event):
                        self._pending = self._complete(self._held)
                        return Step(bytes(out), (self._pending,))
                    if self._held.fragments.size > self._max_arguments:
                        return Step(bytes(out), self._cut(self._held))
                    continue
                self._queue.popleft()
                out += self._pass(kind, obj, event)
            except ProtocolError as e:
                step = self._fail(e.message)
                return Step(bytes(out) + step.data, step.pending)
        if self._eof and not self._queue and self._pending is None and not self._ended:
            if self._held is not None or not self._finished:
                step = self._fail("the upstream stream ended before the response was complete")
                return Step(bytes(out) + step.data, step.pending)
            self._ended = True
        return Step(bytes(out))


    def _hold(self, held: _Tool, kind: str, obj: JSONObject, event: SSEEvent) -> bool:
        """Take the next event while a tool_use block is held; True when it is complete."""
        if held.stop is None:
            if kind == "content_block_delta" and block_index(obj) == held.index:
                delta = obj.get("delta")
                if not isinstance(delta, dict) or delta.get("type") != "input_json_delta" \
                        or not isinstance(delta.get("partial_json"), str):
                    raise ProtocolError(f"tool_use block {held.index} got a delta that is not "
                                        "input_json_delta text")
                held.fragments.append(str(delta["partial_json"]))
                self._queue.popleft()
                return False
            if kind == "content_block_stop" and block_index(obj) == held.index:
                held.stop = event
                self._queue.popleft()
                return False
            reason = stop_reason(obj) if kind == "message_delta" else None
            if reason not in CUT_REASONS:
                raise ProtocolError(f"upstream sent {kind} while tool_use block {held.index} "
                                    "was still open")
        elif kind in ("content_block_delta", "content_block_stop", "message_stop"):
            # message_stop here means no message_delta: the stop_reason, which says
            # whether this call was cut off, never came.
            raise ProtocolError(f"upstream sent {kind} right after tool_use block {held.index}")
        elif kind == "message_delta":
            reason = stop_reason(obj)
        else:
            return True
        if reason in CUT_REASONS:
            assert reason is not None
            held.problem = cut_problem(reason)
        return True

    def _pass(self, kind: str, obj: JSONObject, event: SSEEvent) -> bytes:
        """Apply one event with no block held: hold a tool_use start, release the rest."""
        if kind == "message_start":
            message = obj.get("message")
            if self._started or not isinstance(message, dict):
                raise ProtocolError("upstream sent a second or malformed message_start")
            if message.get("content"):
                raise ProtocolError("upstream message_start carries content blocks")
            self._started = True
            usage_of(self._usage, message.get("usage"))
            return encode(event)
        if not self._started:
            raise ProtocolError(f"upstream sent {kind} before message_start")
        if kind == "content_block_start":
            return self._start(block_index(obj), obj, event)
        if kind in ("content_block_delta", "content_block_stop"):
            index = block_index(obj)
            if index not in self._open:
                raise ProtocolError(f"upstream sent {kind} for content block {index}, which is "
                                    "not open")
            if kind == "content_block_stop":
                self._open.discard(index)
            running = self._running.get(index)
            if running is not None and kind == "content_block_delta":
                running.take(obj.get("delta"))
            elif running is not None and (done := self._running.pop(index).call()) is not None:
                self._ran.append(done)
            return encode(event)
        if kind == "message_delta":
            reason = stop_reason(obj)
            usage_of(self._usage, obj.get("usage"))
            self._finished = self._finished or reason is not None
            if reason == "tool_use" and self._denied and not self._kept:
                delta = obj["delta"]
                assert isinstance(delta, dict)
                body = {**obj, "delta": {**delta, "stop_reason": "end_turn"}}
                return encode(SSEEvent(json_text(body), event.event,
                                       event.id, event.retry))
            return encode(event)
        if kind == "message_stop":
            if not self._finished:
                raise ProtocolError("upstream sent message_stop before message_delta")
            self._ended = True
        # Unknown event types pass: the SDKs build content only from the events above.
        return encode(event)

    def _start(self, index: int, obj: JSONObject, event: SSEEvent) -> bytes:
        if index != self._next_index or self._finished:
            raise ProtocolError(f"upstream started content block {index} out of order")
        block = obj.get("content_block")
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ProtocolError(f"upstream content block {index} has no type")
        self._next_index += 1
        if block["type"] != GOVERNED_BLOCK:
            self._open.add(index)
            if block["type"] in ANTHROPIC_RAN:
                self._running[index] = StreamedBlock(block, index, self._max_arguments)
            return encode(event)
        call_id, name = block.get("id"), block.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise ProtocolError(f"upstream tool_use block {index} has no id or name")
        if block.get("input", {}) != {}:
            # The SDKs would start from this input and overwrite it with the deltas:
            # two sources for one call's arguments. Refused rather than guessed.
            raise ProtocolError(f"upstream tool_use block {index} starts with input; input "
                                "must arrive as input_json_delta")
        self._held = _Tool(index, call_id, name, event)
        return b""

    def _render(self, held: _Tool, call: ToolCall, decision: Decision) -> bytes:
        index = held.index
        stop = _event("content_block_stop", {"type": "content_block_stop", "index": index})
        if decision.allowed:
            self._kept += 1
            out = encode(held.start)
            if held.fragments.pieces:
                out += _event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": call.raw_arguments}})
            return out + (encode(held.stop) if held.stop is not None else stop)
        self._denied += 1
        return (_event("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {"type": "text", "text": ""}})
                + _event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": denial_text(call, decision)}})
                + stop)

