"""The Responses API stream filter (sans-IO).

The API sends one SSE message per event, `event: <type>` and `data: {"type": <type>,
"sequence_number": n, ...}`, and no `[DONE]`: a stream ends with `response.completed`,
`response.incomplete` or `response.failed` (or an `error` event).

Every event of an item the agent would run (a `function_call` ...) is held from
its `response.output_item.added` to its `response.output_item.done`, which
completes the call; then it is decided, and nothing after it is released until it
is. An allowed call is replayed event for event, its argument text untouched, except
that past EVENTS_KEPT bytes of held events its further argument deltas are kept as
text and replayed as one delta: what is held is then about the size of the arguments,
not of the events around each few characters. Past `max_arguments` bytes of argument
text the stream is cut (providers/held.py). A denied call becomes the events of an
assistant message at the same `output_index`.
Each `response.*` lifecycle event's `output` is rewritten to match what the client
was sent (the SDK's stream helper builds its final response from it), and sequence
numbers are renumbered so they stay strictly increasing. Everything else passes at
once. A call whose item never completes is never released: it is decided as
malformed, and a stream that breaks off ends with a Responses `error` event.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError, UpstreamError
from ..model import Action, Decision, OnDeny, ToolCall, Usage
from ..policy.engine import MALFORMED
from ..strict_json import strict_pairs
from ..surrogates import json_text
from .base import Step, denial_text
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut, cut_denial
from .openai_responses import (
    DELTA_EVENTS,
    DONE_EVENTS,
    TEXT_FIELD,
    JSONObject,
    check_call_item,
    error_event,
    is_call,
    item_call,
    output_text,
    replacement,
    usage_of,
)
from .sse import SSEDecoder, SSEEvent, encode

TERMINAL = {
    "response.completed": "the response completed without finishing the tool call",
    "response.incomplete": "the response ended incomplete in the middle of the tool call",
    "response.failed": "the response failed in the middle of the tool call",
}
LIFECYCLE = frozenset(TERMINAL) | {"response.created", "response.queued", "response.in_progress"}
# Events that only ever belong to a call item: outside a held item they are refused.
CALL_EVENTS = ("response.function_call_arguments.", "response.custom_tool_call_input.",
               "response.shell_call_command.")
EVENTS_KEPT = 64 * 1024


@dataclass(slots=True)
class _Held:
    """One call item, from `output_item.added` until it is decided."""

    index: int
    item: JSONObject
    events: list[tuple[SSEEvent, JSONObject]] = field(default_factory=list)
    pieces: HeldText = field(default_factory=HeldText)
    kept: int = 0                # bytes of event data in `events`
    tail_at: int | None = None   # where in `events` the delta standing for the rest is
    tail_from: int = 0           # ... and where in the text the rest begins
    text_done: bool = False
    done: JSONObject | None = None

    @property
    def kind(self) -> str:
        return str(self.item.get("type"))

    def text(self) -> str | None:
        """The argument text as a client accumulating the deltas would see it."""
        name = TEXT_FIELD.get(self.kind)
        if name is None:
            return None
        start = self.item.get(name)
        return (start if isinstance(start, str) else "") + self.pieces.text()

    def call(self, problem: str | None = None) -> ToolCall:
        if self.done is None:
            return item_call(self.item, self.index, problem, text=self.text())
        status = self.done.get("status")
        if problem is None and status not in (None, "completed"):
            problem = f"the tool call item ended with status {status!r}"
        return item_call(self.done, self.index, problem)


def _index(obj: JSONObject) -> int | None:
    value = obj.get("output_index")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("stream event has no valid output_index")
    return value


class ResponsesStream:
    """Filters one Responses SSE stream; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the argument bytes held back at most (limits.max_arguments_bytes)."""
        self._max_arguments = max_arguments
        self.output_units = 0  # text and argument deltas seen: ~ tokens, if usage never comes
        self._decoder = SSEDecoder()
        self._queue: deque[SSEEvent] = deque()
        self._open: dict[int, _Held] = {}
        self._seen: set[int] = set()
        self._closed: set[int] = set()
        self._released: dict[int, JSONObject] = {}
        self._waiting: list[tuple[_Held, ToolCall]] = []
        self._seq: int | None = None
        self._ended = False
        self._eof = False
        self._final = b""
        self._usage: Usage | None = None
        self._failed: str | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def failed(self) -> str | None:
        """Why the stream ended in failure (an error event, response.failed), or None."""
        return self._failed

    def feed(self, chunk: bytes) -> Step:
        if self._ended:
            return Step()
        try:
            self._queue.extend(self._decoder.feed(chunk))
        except ProtocolError as e:
            return self._fail(e.message, "bad_upstream_stream")
        return self._run()

    def close(self) -> Step:
        """The upstream ended. Without a terminal `response.*` event the stream was cut."""
        if self._ended:
            return Step()
        try:
            self._decoder.flush()
        except ProtocolError as e:
            return self._fail(e.message, "bad_upstream_stream")
        self._eof = True
        return self._run()

    def decide(self, decisions: Sequence[Decision]) -> Step:
        if len(decisions) != len(self._waiting):
            raise ValueError("one decision is needed for each pending call")
        out = bytearray()
        refused: list[tuple[ToolCall, Decision]] = []
        for (held, call), decision in zip(self._waiting, decisions, strict=True):
            self._open.pop(held.index, None)
            self._closed.add(held.index)
            if self._ended:
                continue
            if not decision.allowed and decision.on_deny is OnDeny.ERROR:
                refused.append((call, decision))
            else:
                out += self._release(held, call, decision)
        self._waiting = []
        if refused and not self._ended:
            # Nothing of this batch is released: the whole answer is refused.
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            texts = " ".join(denial_text(c, d) for c, d in refused)
            return Step(self._error(texts, "permission_error", "tool_call_denied"))
        if self._ended:
            final, self._final = self._final, b""
            return Step(final)
        step = self._run()
        return Step(bytes(out) + step.data, step.pending)

    # --- output -------------------------------------------------------------------------

    def _sequence(self, obj: JSONObject) -> int:
        """The next number the client sees; it starts where the upstream started."""
        if self._seq is None:
            first = obj.get("sequence_number")
            ok = isinstance(first, int) and not isinstance(first, bool) and first >= 0
            self._seq = first if ok and isinstance(first, int) else 0
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _emit(self, event: SSEEvent, obj: JSONObject, changed: bool = False) -> bytes:
        seq = self._sequence(obj)
        if not changed and obj.get("sequence_number") == seq:
            return encode(event)
        return encode(SSEEvent(json_text({**obj, "sequence_number": seq}),
                               event.event, event.id, event.retry))

    def _new(self, obj: JSONObject) -> bytes:
        data = {**obj, "sequence_number": self._sequence(obj)}
        return encode(SSEEvent(json_text(data), str(obj["type"])))

    def _error(self, message: str, kind: str, code: str) -> bytes:
        data = error_event(message, kind=kind, code=code, sequence=self._sequence({}))
        return encode(SSEEvent(json_text(data), "error"))

    def _release(self, held: _Held, call: ToolCall, decision: Decision) -> bytes:
        """An allowed, complete call is replayed as it came; anything else is replaced."""
        if decision.allowed and held.done is not None and call.problem is None:
            self._released[held.index] = held.done
            return b"".join(
                self._emit(e, {**o, "delta": held.pieces.text()[held.tail_from:]}, changed=True)
                if i == held.tail_at else self._emit(e, o) for i, (e, o) in enumerate(held.events))
        if decision.allowed:  # only under `on_error: allow`; an unfinished call still never goes
            decision = Decision(Action.DENY, (MALFORMED,), call.problem or "the call is incomplete")
        text = denial_text(call, decision)
        item = replacement(held.done or held.item, text)
        self._released[held.index] = item
        mid, oi, part = item["id"], held.index, output_text(text)
        where: JSONObject = {"item_id": mid, "output_index": oi, "content_index": 0}
        return b"".join(self._new(e) for e in (
            {"type": "response.output_item.added", "output_index": oi,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **where, "part": output_text("")},
            {"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": oi, "item": item},
        ))

    # --- failure ------------------------------------------------------------------------

    def _fail(self, message: str, code: str, *, event: bool = True) -> Step:
        """End the stream; open calls are still decided (as denied) but never released."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        self._final = self._error(message, "upstream_error", code) if event else b""
        waiting = {id(h) for h, _ in self._waiting}
        self._waiting.extend(
            (h, h.call(f"{message}; the tool call was not released"))
            for h in self._open.values() if id(h) not in waiting)
        if self._waiting:
            return Step(b"", tuple(c for _, c in self._waiting))
        final, self._final = self._final, b""
        return Step(final)

    def _cut(self) -> tuple[ToolCall, ...]:
        """Too much argument text held: end the stream with the denial, buffer nothing
        more, and hand out the open calls, arguments dropped, to be judged and audited."""
        helds = list(self._open.values())
        self._waiting = [(h, cut(item_call(h.item, h.index, text=""), self._max_arguments))
                         for h in helds]
        for h in helds:
            h.pieces.clear()
            h.events.clear()
        calls = tuple(c for _, c in self._waiting)
        self._ended = True
        self._failed = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
        self._queue.clear()
        self._final = self._error(cut_denial(calls), "permission_error",
                                  "tool_call_denied")
        return calls

    def _request(self, helds: list[_Held], problem: str | None = None) -> tuple[ToolCall, ...]:
        self._waiting = [(h, h.call(problem)) for h in helds]
        return tuple(c for _, c in self._waiting)

    # --- input --------------------------------------------------------------------------

    def _run(self) -> Step:
        out = bytearray()
        while self._queue and not self._waiting and not self._ended:
            event = self._queue[0]
            try:
                obj = self._parse(event)
                kind = str(obj["type"])
                if kind == "error":
                    self._queue.popleft()
                    data, message = self._upstream_error(event, obj)
                    step = self._fail(f"the upstream sent an error event: {message}",
                                      "upstream_error", event=False)
                    return Step(bytes(out) + data + step.data, step.pending)
                if kind in TERMINAL and self._open:
                    return Step(bytes(out), self._request(list(self._open.values()), TERMINAL[kind]))
                self._queue.popleft()
                data, completed = self._apply(event, obj, kind)
            except UpstreamError as e:
                step = self._fail(e.message, "bad_upstream_stream")
                return Step(bytes(out) + step.data, step.pending)
            out += data
            if completed is not None:
                return Step(bytes(out), self._request([completed]))
            if sum(h.pieces.size for h in self._open.values()) > self._max_arguments:
                return Step(bytes(out), self._cut())
        if self._eof and not self._queue and not self._waiting and not self._ended:
            step = self._fail("the upstream stream ended before the response was complete",
                              "upstream_truncated")
            return Step(bytes(out) + step.data, step.pending)
        return Step(bytes(out))

    def _parse(self, event: SSEEvent) -> JSONObject:
        if event.data.strip() == "[DONE]":
            raise ProtocolError("the upstream stream sent [DONE] before the response was complete")
        try:
            obj = json.loads(event.data, object_pairs_hook=strict_pairs)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"upstream stream event is not valid JSON: {e}") from e
        if isinstance(obj, dict) and "type" not in obj and isinstance(obj.get("error"), dict):
            obj = {"type": "error", **obj}  # a Chat Completions-style error mid-stream
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ProtocolError("upstream stream event is not a JSON object with a 'type'")
        if event.event is not None and event.event != obj["type"]:
            raise ProtocolError(f"stream event named {event.event!r} carries a {obj['type']!r} event")
        return obj

    def _upstream_error(self, event: SSEEvent, obj: JSONObject) -> tuple[bytes, str]:
        """Pass the upstream's error with its fields both at the top level (as documented)
        and nested under `error` (as sent in practice), so every SDK raises on it."""
        nested = obj.get("error") if isinstance(obj.get("error"), dict) else {}
        assert isinstance(nested, dict)
        message = str(obj.get("message") or nested.get("message") or "the upstream stream failed")
        code = obj.get("code") or nested.get("code")
        param = obj.get("param", nested.get("param"))
        full = {**obj, "message": message, "code": code, "param": param,
                "error": {"type": "upstream_error", **nested, "message": message, "code": code,
                          "param": param}}
        return self._emit(event, full, changed=full != obj), message

    def _apply(self, event: SSEEvent, obj: JSONObject, kind: str) -> tuple[bytes, _Held | None]:
        """One event: pass it, or hold it; returns the call item it completed, if any."""
        if kind in LIFECYCLE:
            return self._lifecycle(event, obj, kind), None
        if kind.endswith(".delta"):
            self.output_units += 1
        oi = _index(obj)
        if kind == "response.output_item.added":
            item = obj.get("item")
            if oi is None or not isinstance(item, dict):
                raise ProtocolError("response.output_item.added has no item or output_index")
            if oi in self._seen:
                raise ProtocolError(f"output item {oi} was added twice")
            self._seen.add(oi)
            if is_call(item.get("type")):
                check_call_item(item, f"upstream stream item {oi}")
                self._open[oi] = _Held(oi, item, [(event, obj)])
                return b"", None
            return self._emit(event, obj), None
        if oi is not None and oi in self._open:
            held = self._open[oi]
            self._hold(held, obj, kind)
            if kind in DELTA_EVENTS:
                if held.tail_at is not None:
                    return b"", None  # its text is in held.pieces, replayed with the tail
                if held.kept > EVENTS_KEPT:
                    held.tail_at = len(held.events)
                    held.tail_from = held.pieces.length - len(str(obj["delta"]))
            held.kept += len(event.data)
            held.events.append((event, obj))
            return b"", held if held.done is not None else None
        if oi is not None and oi in self._closed:
            raise ProtocolError(f"stream event for tool call item {oi} after it was complete")
        if kind.startswith(CALL_EVENTS):
            raise ProtocolError(f"{kind} event outside an open tool call item")
        item = obj.get("item")
        if isinstance(item, dict) and is_call(item.get("type")):
            raise ProtocolError(f"{kind} event carries a tool call item that was never added")
        return self._emit(event, obj), None

    def _hold(self, held: _Held, obj: JSONObject, kind: str) -> None:
        """Check one event of a held call item; any inconsistency fails the stream, since
        a client could read the call from any of the pieces."""
        item_id = obj.get("item_id")
        if item_id is not None and held.item.get("id") is not None and item_id != held.item["id"]:
            raise ProtocolError(f"stream event for output item {held.index} names another item")
        text_kind = DELTA_EVENTS.get(kind) or DONE_EVENTS.get(kind)
        if text_kind is not None and text_kind != held.kind:
            raise ProtocolError(f"{kind} event for a {held.kind} item")
        if kind in DELTA_EVENTS:
            delta = obj.get("delta")
            if not isinstance(delta, str) or held.text_done:
                raise ProtocolError(f"bad {kind} event for tool call item {held.index}")
            held.pieces.append(delta)
        elif kind in DONE_EVENTS:
            if obj.get(TEXT_FIELD[held.kind]) != held.text():
                raise ProtocolError(f"{kind} for tool call item {held.index} does not match its deltas")
            held.text_done = True
        elif kind == "response.output_item.done":
            done = obj.get("item")
            if not isinstance(done, dict):
                raise ProtocolError("response.output_item.done has no item")
            for key in ("type", "id", "call_id", "name"):
                if key in held.item and done.get(key) != held.item[key]:
                    raise ProtocolError(f"tool call item {held.index} changed its {key}")
            check_call_item(done, f"upstream stream item {held.index}")
            name = TEXT_FIELD.get(held.kind)
            if name and (held.pieces.pieces or held.text_done) and done.get(name) != held.text():
                raise ProtocolError(f"tool call item {held.index} does not match its deltas")
            held.done = done

    def _lifecycle(self, event: SSEEvent, obj: JSONObject, kind: str) -> bytes:
        """Rewrite the response snapshot's output to what the client was sent."""
        response = obj.get("response")
        if not isinstance(response, dict):
            raise ProtocolError(f"{kind} event has no response object")
        output = response.get("output")
        changed = False
        if output is not None:
            if not isinstance(output, list):
                raise ProtocolError(f"{kind} response 'output' is not an array")
            rewritten: list[object] = []
            for i, item in enumerate(output):
                if i in self._released:
                    changed = changed or item != self._released[i]
                    rewritten.append(self._released[i])
                elif isinstance(item, dict) and is_call(item.get("type")):
                    raise ProtocolError(f"{kind} carries a tool call that the stream did not decide")
                else:
                    rewritten.append(item)
            if changed:
                obj = {**obj, "response": {**response, "output": rewritten}}
        if kind in TERMINAL:
            self._ended = True
            self._usage = usage_of(response)
            if kind == "response.failed":
                error = response.get("error")
                why = error.get("message") if isinstance(error, dict) else None
                self._failed = f"the upstream response failed: {why or 'no reason given'}"
        return self._emit(event, obj, changed)
