"""Filtering a Converse stream: the binary event stream, one JSON event per frame (sans-IO).

    messageStart, then per content block (indexed by contentBlockIndex):
      contentBlockStart {start: {toolUse: {toolUseId, name}}}   (toolUse and other
                                                                 non-text blocks only)
      contentBlockDelta {delta: {text | toolUse: {input: "<fragment>"} | reasoningContent ...}}
      contentBlockStop
    then messageStop {stopReason}, metadata {usage, metrics}

Text and the other non-tool blocks pass at once, frame for frame. A toolUse
block is held from its start to its stop, and decided when the *next* event
arrives: if that is a messageStop saying the answer was cut (max_tokens ...),
the call may be cut too and is denied. An allowed block is re-emitted as its
start, one delta with the full input text as the model wrote it, and its stop;
a denied one becomes a text block at the same index. With no toolUse left, a
`tool_use` stop reason becomes `end_turn`.

Fail closed: a frame that fails its checksums or lengths, a stream cut short,
an event this version does not know, or an exception frame from upstream ends
the stream with an exception frame (the upstream's own, passed on, or
`modelStreamErrorException`), and the tool calls still open are handed out as
`pending` with a `problem`, so they are denied and audited, never released. Past
`max_arguments` bytes of input held, the stream is cut (providers/held.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from .base import denial_text
from .bedrock_wire import (
    CUT_REASONS,
    END_TURN,
    TOOL_USE,
    JSONObject,
    cut_problem,
    has_duplicate,
    load_object,
    tool_call,
    usage_of,
)
from .eventstream import BadFrame, EventStreamDecoder, Header, Message, encode, event
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut
from .stream_engine import Broken, Completing, Failure, StreamEngine, UpstreamFailed

PASS_STARTS = frozenset({"toolResult", "image"})
PASS_DELTAS = frozenset({"text", "reasoningContent", "citation", "toolResult", "image"})
MAX_ERROR_HEADER = 4096  # characters of a message that also travels in `:error-message`


def exception_frame(message: str, kind: str = "modelStreamErrorException") -> bytes:
    """A modeled stream exception: the SDKs raise it by `:exception-type`."""
    return encode(Message((Header.string(":exception-type", kind),
                           Header.string(":content-type", "application/json"),
                           Header.string(":message-type", "exception")),
                          json.dumps({"message": message}).encode()))


def error_frame(message: str, code: str) -> bytes:
    """An unmodeled stream error (`:message-type: error`): the SDKs raise it by `:error-code`,
    which lets a stream end with the same AccessDeniedException a whole answer gets."""
    return encode(Message((Header.string(":error-code", code),
                           Header.string(":error-message", message[:MAX_ERROR_HEADER]),
                           Header.string(":message-type", "error")),
                          json.dumps({"message": message}).encode()))


def _event(event_type: str, payload: JSONObject) -> bytes:
    body = json_text(payload, separators=(",", ":")).encode("utf-8")
    return encode(event(event_type, body))


def _one(obj: object, what: str) -> tuple[str, object]:
    """The single member of a union (`start`, `delta`); two members would be read differently."""
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ProtocolError(f"stream {what} must hold exactly one member")
    ((kind, body),) = obj.items()
    return kind, body


def _index(payload: JSONObject) -> int:
    index = payload.get("contentBlockIndex")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ProtocolError("stream event has no valid contentBlockIndex")
    return index


@dataclass(slots=True)
class _Block:
    index: int
    tool: bool
    id: str = ""
    name: str = ""
    start: Message | None = None
    stop: Message | None = None
    fragments: HeldText = field(default_factory=HeldText)


class ConverseCodec:
    """Converse events for the stream engine (providers/stream_engine.py)."""

    def __init__(self) -> None:
        self.noun = "tool call"
        self.grew = False
        self.done = False
        self.ran: list[ToolCall] = []
        self.completed: list[_Block] = []  # never: a later event completes a call
        self.failed: str | None = None
        self.usage: Usage | None = None
        self._decoder = EventStreamDecoder()
        self._open: dict[int, _Block] = {}
        self._closed: set[int] = set()
        self._stopped: _Block | None = None  # a complete toolUse block, decided at the next event
        self._allowed = 0
        self._message_stopped = False
        self._read_type = ""
        self._read_payload: JSONObject = {}

    def decode(self, chunk: bytes) -> list[Message]:
        try:
            return self._decoder.feed(chunk)
        except BadFrame as e:
            # The frames before the bad one are handled first, whatever the chunking.
            raise Broken(e.message, e.messages) from None

    def flush(self) -> list[Message]:
        try:
            self._decoder.flush()
        except BadFrame as e:
            raise Broken(e.message, []) from None
        return []

    def held(self) -> list[_Block]:
        held = [b for b in self._open.values() if b.tool]
        return held + [self._stopped] if self._stopped is not None else held

    def held_size(self) -> int:
        return sum(h.fragments.size for h in self.held())

    def dropped(self, handle: _Block, limit: int) -> ToolCall:
        handle.fragments.clear()
        return cut(self.call(handle, None), limit)

    def complete(self) -> bool:
        return self._message_stopped

    def trailer(self, chunk: bytes) -> bytes:
        return b""  # nothing may follow the end

    def settle(self, handle: _Block, call: ToolCall) -> None:
        self._open.pop(handle.index, None)
        self._closed.add(handle.index)
        if self._stopped is handle:
            self._stopped = None

    def error(self, message: str, failure: Failure) -> bytes:
        if failure is Failure.DENIED:
            return error_frame(message, "AccessDeniedException")
        return exception_frame(message)

    def call(self, handle: _Block, problem: str | None) -> ToolCall:
        return tool_call(id=handle.id, name=handle.name, raw=handle.fragments.text(),
                         index=handle.index, problem=problem)

    def completes(self, message: Message) -> Completing[_Block] | None:
        event_type, payload = self._read(message)
        if payload is None:
            raise UpstreamFailed(encode(message), f"the upstream sent {event_type} mid-stream")
        if event_type == "messageStop" and not isinstance(payload.get("stopReason"), str):
            raise ProtocolError("stream messageStop has no stopReason")
        if self._stopped is not None:
            reason = payload.get("stopReason") if event_type == "messageStop" else None
            problem = cut_problem(str(reason)) if reason in CUT_REASONS else None
            block, self._stopped = self._stopped, None
            return [block], problem
        if event_type == "messageStop":
            opens = [b for b in self._open.values() if b.tool]
            if opens:
                reason = payload.get("stopReason")
                return opens, (f"the message stopped (stopReason {reason}) before the tool "
                               "call was complete")
        self._read_type, self._read_payload = event_type, payload
        return None

    def apply(self, message: Message) -> bytes:
        return self._apply(self._read_type, message, self._read_payload)

    def _read(self, message: Message) -> tuple[str, JSONObject | None]:
        """(event type, payload), or (exception name, None) for an exception or error frame."""
        kind = message.text(":message-type")
        if kind in ("exception", "error"):
            name = message.text(":exception-type") or message.text(":error-code") or "an error"
            return name, None
        if kind != "event":
            raise ProtocolError(f"stream frame has message type {kind!r}")
        event_type = message.text(":event-type")
        if not event_type:
            raise ProtocolError("stream event has no :event-type")
        try:
            payload = load_object(message.payload, f"stream {event_type} event")
        except ValueError as e:
            raise ProtocolError(str(e)) from e
        if has_duplicate(payload):
            raise ProtocolError(f"stream {event_type} event holds a duplicate key")
        return event_type, payload

    def _apply(self, event_type: str, message: Message, payload: JSONObject) -> bytes:
        """Apply one event: hold toolUse blocks, release everything else."""
        if event_type in ("messageStart", "metadata"):
            if event_type == "metadata":
                self.usage = usage_of(payload.get("usage"))
            return encode(message)
        if event_type == "messageStop":
            self._message_stopped = True
            self._closed.update(self._open)
            self._open.clear()
            if payload.get("stopReason") == TOOL_USE and self._allowed == 0:
                return _event(event_type, {**payload, "stopReason": END_TURN})
            return encode(message)
        if event_type not in ("contentBlockStart", "contentBlockDelta", "contentBlockStop"):
            raise ProtocolError(f"stream event type {event_type!r} is not one tether can read")
        if self._message_stopped:
            raise ProtocolError(f"stream {event_type} event after messageStop")
        index = _index(payload)
        if index in self._closed:
            raise ProtocolError(f"stream content block {index} continued after its stop")
        block = self._open.get(index)
        if event_type == "contentBlockStart":
            if block is not None:
                raise ProtocolError(f"stream content block {index} started twice")
            kind, body = _one(payload.get("start"), "contentBlockStart.start")
            if kind == "toolUse":
                if not isinstance(body, dict) or not isinstance(body.get("toolUseId"), str) \
                        or not isinstance(body.get("name"), str):
                    raise ProtocolError(f"stream toolUse block {index} has no toolUseId or name")
                self._open[index] = _Block(index, True, str(body["toolUseId"]), str(body["name"]),
                                           start=message)
                return b""
            if kind not in PASS_STARTS:
                raise ProtocolError(f"stream content block kind {kind!r} is not one tether can read")
            self._open[index] = _Block(index, False)
            return encode(message)
        if event_type == "contentBlockDelta":
            kind, body = _one(payload.get("delta"), "contentBlockDelta.delta")
            if kind == "toolUse":
                if block is None or not block.tool:
                    raise ProtocolError(f"stream toolUse delta for block {index}, which did not "
                                        "start as a toolUse")
                if not isinstance(body, dict) or not isinstance(body.get("input"), str):
                    raise ProtocolError(f"stream toolUse delta for block {index} has no input text")
                block.fragments.append(str(body["input"]))
                self.grew = True
                return b""
            if block is not None and block.tool:
                raise ProtocolError(f"stream toolUse block {index} got a {kind!r} delta")
            if kind not in PASS_DELTAS:
                raise ProtocolError(f"stream delta kind {kind!r} is not one tether can read")
            self._open.setdefault(index, _Block(index, False))
            return encode(message)
        # contentBlockStop
        self._open.pop(index, None)
        self._closed.add(index)
        if block is not None and block.tool:
            block.stop = message
            self._stopped = block
            return b""
        return encode(message)

    def render(self, block: _Block, call: ToolCall, decision: Decision) -> bytes:
        stop = encode(block.stop) if block.stop is not None else _event(
            "contentBlockStop", {"contentBlockIndex": block.index})
        if decision.allowed:
            assert block.start is not None
            self._allowed += 1
            delta: JSONObject = {"toolUse": {"input": call.raw_arguments}}
            return encode(block.start) + _event(
                "contentBlockDelta", {"contentBlockIndex": block.index, "delta": delta}) + stop
        text: JSONObject = {"text": denial_text(call, decision)}
        return _event("contentBlockDelta", {"contentBlockIndex": block.index, "delta": text}) + stop


class ConverseStream(StreamEngine[Message, _Block]):
    """Filters one ConverseStream response; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the input bytes held back at most (limits.max_arguments_bytes)."""
        super().__init__(ConverseCodec(), max_arguments)
