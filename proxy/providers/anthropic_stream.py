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

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ProtocolError
from ..model import Decision, ToolCall, Usage
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
from .base import denial_text
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut
from .provider_ran import ANTHROPIC_RAN, StreamedBlock
from .sse import SSEDecoder, SSEEvent, encode
from .stream_engine import Completing, Failure, StreamEngine, UpstreamFailed


class Framing(Protocol):
    """How Messages events travel: read from the upstream's bytes, written for the client."""

    def decode(self, chunk: bytes) -> list[SSEEvent]: ...

    def flush(self) -> list[SSEEvent]: ...

    def encode(self, event: SSEEvent) -> bytes: ...

    def error(self, message: str, kind: str) -> bytes: ...


class SSEFraming:
    """The Anthropic API's own: named server-sent events."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        return self._decoder.feed(chunk)

    def flush(self) -> list[SSEEvent]:
        return self._decoder.flush()

    encode = staticmethod(encode)
    error = staticmethod(error_event)


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


class MessagesCodec:
    """Messages events for the stream engine (providers/stream_engine.py).

    `framing` reads and writes the events: SSE here, AWS event-stream frames for Bedrock
    InvokeModel (bedrock_invoke.py); what the events mean is the same."""

    def __init__(self, max_arguments: int, framing: Framing | None = None) -> None:
        self._max_arguments = max_arguments
        self._framing = framing or SSEFraming()
        self._encode = self._framing.encode  # on the per-event path: looked up once
        self.noun = "tool call"
        self.grew = False
        self.done = False
        self.ran: list[ToolCall] = []  # provider-run blocks stopped, not yet reported
        self.completed: list[_Tool] = []  # never: a later event completes a call
        self.failed: str | None = None
        self._started = False
        self._next_index = 0
        self._open: set[int] = set()       # blocks passed through and not yet stopped
        self._held: _Tool | None = None
        self._running: dict[int, StreamedBlock] = {}  # provider-run blocks not yet stopped
        self._kept = 0
        self._denied = 0
        self._finished = False             # a message_delta with a stop_reason arrived
        self._usage: dict[str, int] = {}
        self._kind = ""
        self._obj: JSONObject = {}

    @property
    def usage(self) -> Usage | None:
        return usage_total(self._usage)

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        return self._framing.decode(chunk)

    def flush(self) -> list[SSEEvent]:
        return self._framing.flush()

    def held(self) -> list[_Tool]:
        return [] if self._held is None else [self._held]

    def held_size(self) -> int:
        return sum(h.fragments.size for h in self.held())

    def dropped(self, handle: _Tool, limit: int) -> ToolCall:
        handle.fragments.clear()
        return cut(self.call(handle, None), limit)

    def complete(self) -> bool:
        return self._held is None and self._finished

    def trailer(self, chunk: bytes) -> bytes:
        return b""  # nothing may follow the end

    def settle(self, handle: _Tool, call: ToolCall) -> None:
        self._held = None

    def error(self, message: str, failure: Failure) -> bytes:
        return self._framing.error(
            message, "permission_error" if failure is Failure.DENIED else "api_error")

    def call(self, handle: _Tool, problem: str | None) -> ToolCall:
        return tool_call(id=handle.id, name=handle.name, raw=handle.fragments.text(),
                         index=handle.index, problem=problem or handle.problem)

    def completes(self, event: SSEEvent) -> Completing[_Tool] | None:
        kind, obj = read_event(event)
        self._kind, self._obj = kind, obj
        if kind == "error":
            raise UpstreamFailed(self._encode(event),
                                 "the upstream sent an error event mid-stream")
        held = self._held
        if kind == "ping" or held is None:
            return None
        if held.stop is None:
            if kind in ("content_block_delta", "content_block_stop") \
                    and block_index(obj) == held.index:
                return None
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
            return [held], None
        if reason in CUT_REASONS:
            assert reason is not None
            held.problem = cut_problem(reason)
        return [held], None

    def apply(self, event: SSEEvent) -> bytes:
        kind, obj, held = self._kind, self._obj, self._held
        if kind == "ping":  # pings pass at once, even while a block is held
            return self._encode(event)
        if held is None:
            return self._pass(kind, obj, event)
        if kind == "content_block_stop":
            held.stop = event
            return b""
        delta = obj.get("delta")
        if not isinstance(delta, dict) or delta.get("type") != "input_json_delta" \
                or not isinstance(delta.get("partial_json"), str):
            raise ProtocolError(f"tool_use block {held.index} got a delta that is not "
                                "input_json_delta text")
        held.fragments.append(str(delta["partial_json"]))
        self.grew = True
        return b""

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
            return self._encode(event)
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
                self.ran.append(done)
            return self._encode(event)
        if kind == "message_delta":
            reason = stop_reason(obj)
            usage_of(self._usage, obj.get("usage"))
            self._finished = self._finished or reason is not None
            if reason == "tool_use" and self._denied and not self._kept:
                delta = obj["delta"]
                assert isinstance(delta, dict)
                body = {**obj, "delta": {**delta, "stop_reason": "end_turn"}}
                return self._encode(SSEEvent(json_text(body), event.event,
                                                    event.id, event.retry))
            return self._encode(event)
        if kind == "message_stop":
            if not self._finished:
                raise ProtocolError("upstream sent message_stop before message_delta")
            self.done = True
        # Unknown event types pass: the SDKs build content only from the events above.
        return self._encode(event)

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
            return self._encode(event)
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

    def _event(self, kind: str, body: JSONObject) -> bytes:
        return self._encode(SSEEvent(json_text(body), event=kind))

    def render(self, held: _Tool, call: ToolCall, decision: Decision) -> bytes:
        index = held.index
        stop = self._event("content_block_stop", {"type": "content_block_stop", "index": index})
        if decision.allowed:
            self._kept += 1
            out = self._encode(held.start)
            if held.fragments.pieces:
                out += self._event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": call.raw_arguments}})
            return out + (self._encode(held.stop) if held.stop is not None else stop)
        self._denied += 1
        return (self._event("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {"type": "text", "text": ""}})
                + self._event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": denial_text(call, decision)}})
                + stop)



class MessagesStream(StreamEngine[SSEEvent, _Tool]):
    """Filters one Messages stream; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS,
                 framing: Framing | None = None) -> None:
        """`max_arguments`: the input bytes held back at most (limits.max_arguments_bytes);
        `framing`: how the events travel, SSE unless given."""
        super().__init__(MessagesCodec(max_arguments, framing), max_arguments)
