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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Decision, OnDeny, ToolCall, Usage
from ..surrogates import json_text
from .base import Step, denial_text
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
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut, cut_denial

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


class ConverseStream:
    """Filters one ConverseStream response; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the input bytes held back at most (limits.max_arguments_bytes)."""
        self._max_arguments = max_arguments
        self._decoder = EventStreamDecoder()
        self._queue: deque[Message] = deque()
        self._open: dict[int, _Block] = {}
        self._closed: set[int] = set()
        self._stopped: _Block | None = None  # a complete toolUse block, decided at the next event
        self._waiting: list[tuple[_Block, ToolCall]] = []
        self._allowed = 0
        self._message_stopped = False
        self._broken: str | None = None
        self._eof = False
        self._ended = False
        self._final = b""
        self._usage: Usage | None = None
        self._failed: str | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def failed(self) -> str | None:
        """Why the stream was ended with an exception frame, or None."""
        return self._failed

    def feed(self, chunk: bytes) -> Step:
        if self._ended:
            return Step()
        if self._broken is None:
            try:
                self._queue.extend(self._decoder.feed(chunk))
            except BadFrame as e:
                # The frames before the bad one are handled first, whatever the chunking.
                self._queue.extend(e.messages)
                self._broken = e.message
        return self._run()

    def close(self) -> Step:
        """The upstream ended; without a messageStop the answer was cut."""
        if self._ended:
            return Step()
        if self._broken is None:
            try:
                self._decoder.flush()
            except BadFrame as e:
                self._broken = e.message
        self._eof = True
        return self._run()

    def decide(self, decisions: Sequence[Decision]) -> Step:
        if len(decisions) != len(self._waiting):
            raise ValueError("one decision is needed for each pending call")
        out = bytearray()
        refused: list[tuple[ToolCall, Decision]] = []
        for (block, call), decision in zip(self._waiting, decisions, strict=True):
            self._open.pop(block.index, None)
            self._closed.add(block.index)
            if self._ended:
                continue
            if not decision.allowed and decision.on_deny is OnDeny.ERROR:
                refused.append((call, decision))
            out += self._render(block, call, decision)
        self._waiting = []
        if refused and not self._ended:
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            text = " ".join(denial_text(c, d) for c, d in refused)
            return Step(error_frame(text, "AccessDeniedException"))
        if self._ended:
            final, self._final = self._final, b""
            return Step(bytes(out) + final)
        step = self._run()
        return Step(bytes(out) + step.data, step.pending)

    def _call(self, block: _Block, problem: str | None = None) -> ToolCall:
        return tool_call(id=block.id, name=block.name, raw=block.fragments.text(),
                         index=block.index, problem=problem)

    def _request(self, blocks: list[_Block], problem: str | None) -> tuple[ToolCall, ...]:
        self._waiting = [(b, self._call(b, problem)) for b in blocks]
        return tuple(c for _, c in self._waiting)

    def _fail(self, out: bytearray, message: str, *, passed_on: bool = False) -> Step:
        """End the stream with an exception frame (unless the upstream's was `passed_on`);
        open calls are still handed out, to be decided as denied and audited."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        self._final = b"" if passed_on else exception_frame(message)
        blocks = [b for b in self._open.values() if b.tool]
        if self._stopped is not None:
            blocks.append(self._stopped)
            self._stopped = None
        if blocks:
            return Step(bytes(out), self._request(
                blocks, f"{message}; the tool call was not released"))
        final, self._final = self._final, b""
        return Step(bytes(out) + final)

    def _held(self) -> list[_Block]:
        held = [b for b in self._open.values() if b.tool]
        return held + [self._stopped] if self._stopped is not None else held

    def _cut(self) -> tuple[ToolCall, ...]:
        """Too much input held: end the stream with the denial, buffer nothing more, and
        hand out the open calls, input dropped, to be judged and audited."""
        blocks = self._held()
        self._stopped = None
        self._waiting = [(b, cut(tool_call(id=b.id, name=b.name, raw="", index=b.index),
                                 self._max_arguments)) for b in blocks]
        for b in blocks:
            b.fragments.clear()
        calls = tuple(c for _, c in self._waiting)
        self._ended = True
        self._failed = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
        self._queue.clear()
        self._final = error_frame(cut_denial(calls), "AccessDeniedException")
        return calls

    def _run(self) -> Step:
        out = bytearray()
        while self._queue and not self._waiting and not self._ended:
            message = self._queue[0]
            try:
                event_type, payload = self._read(message)
            except ProtocolError as e:
                return self._fail(out, e.message)
            if payload is None:
                self._queue.popleft()
                out += encode(message)
                return self._fail(out, f"the upstream sent {event_type} mid-stream", passed_on=True)
            if event_type == "messageStop" and not isinstance(payload.get("stopReason"), str):
                return self._fail(out, "stream messageStop has no stopReason")
            if self._stopped is not None:
                reason = payload.get("stopReason") if event_type == "messageStop" else None
                problem = cut_problem(str(reason)) if reason in CUT_REASONS else None
                block, self._stopped = self._stopped, None
                return Step(bytes(out), self._request([block], problem))
            if event_type == "messageStop":
                opens = [b for b in self._open.values() if b.tool]
                if opens:
                    reason = payload.get("stopReason")
                    return Step(bytes(out), self._request(opens, (
                        f"the message stopped (stopReason {reason}) before the tool call was "
                        "complete")))
            self._queue.popleft()
            try:
                out += self._apply(event_type, message, payload)
            except ProtocolError as e:
                return self._fail(out, e.message)
            if sum(b.fragments.size for b in self._held()) > self._max_arguments:
                return Step(bytes(out), self._cut())
        if self._queue or self._waiting or self._ended:
            return Step(bytes(out))
        if self._broken is not None:
            return self._fail(out, self._broken)
        if self._eof:
            if not self._message_stopped:
                return self._fail(out, "the upstream stream ended before the response was complete")
            self._ended = True
        return Step(bytes(out))

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
                self._usage = usage_of(payload.get("usage"))
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

    def _render(self, block: _Block, call: ToolCall, decision: Decision) -> bytes:
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
