"""The Responses API stream filter (sans-IO).

The API sends one SSE message per event, `event: <type>` and `data: {"type": <type>,
"sequence_number": n, ...}`, and no `[DONE]`: a stream ends with `response.completed`,
`response.incomplete` or `response.failed` (or an `error` event).

Every event of an item the agent would run (a `function_call` ...) is held from
its `response.output_item.added` to its `response.output_item.done`, which
completes the call (openai_responses_held.py); then it is decided, and nothing
after it is released until it is. An allowed call is replayed event for event, its
argument text untouched (past EVENTS_KEPT bytes of held events, its further deltas
as one). Past `max_arguments` bytes of argument text the stream is cut
(providers/held.py). A denied call becomes the events of an assistant message at
the same `output_index`.
Each `response.*` lifecycle event's `output` is rewritten to match what the client
was sent (the SDK's stream helper builds its final response from it), and sequence
numbers are renumbered so they stay strictly increasing. Everything else passes at
once. A provider-run item (`mcp_call`, `web_search_call` ...: provider_ran.py) passes
too, since it already ran, and is reported in `Step.ran` at its
`response.output_item.done` (or, if it never had one, at the terminal event that lists
it) for the server to judge. A call whose item never completes is never released: it
is decided as malformed, and a stream that breaks off ends with a Responses `error`
event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ..errors import ProtocolError, UpstreamError
from ..model import Action, Decision, OnDeny, ToolCall, Usage
from ..policy.engine import MALFORMED
from ..surrogates import json_text
from .base import Step, denial_text
from .held import DEFAULT_MAX_ARGUMENTS, cut, cut_denial
from .openai_responses_events import (
    CALL_EVENTS,
    LIFECYCLE,
    TERMINAL,
    output_index,
    read_event,
    upstream_error,
)
from .openai_responses_held import Held
from .openai_responses_wire import (
    JSONObject,
    check_call_item,
    error_event,
    is_call,
    item_call,
    usage_of,
)
from .provider_ran import openai_item
from .sse import SSEDecoder, SSEEvent, encode


class ResponsesStream:
    """Filters one Responses SSE stream; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the argument bytes held back at most (limits.max_arguments_bytes)."""
        self._max_arguments = max_arguments
        self.output_units = 0  # text and argument deltas seen: ~ tokens, if usage never comes
        self._decoder = SSEDecoder()
        self._queue: deque[SSEEvent] = deque()
        self._open: dict[int, Held] = {}
        self._seen: set[int] = set()
        self._closed: set[int] = set()
        self._released: dict[int, JSONObject] = {}
        self._waiting: list[tuple[Held, ToolCall]] = []
        self._ran: list[ToolCall] = []      # provider-run calls not yet reported in a Step
        self._ran_at: set[int] = set()      # output indexes already reported
        self._seq: int | None = None
        self._ended = False
        self._eof = False
        self._final = b""
        self._usage: Usage | None = None
        self._failed: str | None = None
        # What the client was given in place of the upstream's answer, for the next
        # turn (responses_history.py): the response id, the calls decided, and each
        # denied call's id with the message that replaced it.
        self.response_id: str | None = None
        self.decided: list[str] = []  # call ids
        self.replaced: list[tuple[str, JSONObject]] = []

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
        return self._reported(self._run())

    def close(self) -> Step:
        """The upstream ended. Without a terminal `response.*` event the stream was cut."""
        if self._ended:
            return Step()
        try:
            self._decoder.flush()
        except ProtocolError as e:
            return self._fail(e.message, "bad_upstream_stream")
        self._eof = True
        return self._reported(self._run())

    def decide(self, decisions: Sequence[Decision]) -> Step:
        if len(decisions) != len(self._waiting):
            raise ValueError("one decision is needed for each pending call")
        out = bytearray()
        refused: list[tuple[ToolCall, Decision]] = []
        for (held, call), decision in zip(self._waiting, decisions, strict=True):
            self.decided.append(call.id)
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
        return self._reported(Step(bytes(out) + step.data, step.pending))

    def _reported(self, step: Step) -> Step:
        """`step`, with the provider-run calls completed since the last one."""
        if not self._ran:
            return step
        ran, self._ran = tuple(self._ran), []
        return Step(step.data, step.pending, step.ran + ran)

    def _report(self, item: JSONObject, oi: int | None) -> None:
        """Note a provider-run item that is complete; other items are not reported."""
        done = openai_item(item, oi if oi is not None else 0)
        if done is None or (oi is not None and oi in self._ran_at):
            return
        if oi is None:
            raise ProtocolError(f"a {item.get('type')} item has no output_index")
        self._ran_at.add(oi)
        self._ran.append(done)

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

    def _release(self, held: Held, call: ToolCall, decision: Decision) -> bytes:
        """An allowed, complete call is replayed as it came; anything else is replaced."""
        if decision.allowed and held.done is not None and call.problem is None:
            self._released[held.index] = held.done
            return b"".join(self._emit(e, o, changed) for e, o, changed in held.replayed())
        if decision.allowed:  # only under `on_error: allow`; an unfinished call still never goes
            decision = Decision(Action.DENY, (MALFORMED,), call.problem or "the call is incomplete")
        item, events = held.replaced(denial_text(call, decision))
        self._released[held.index] = item
        self.replaced.append((call.id, item))
        return b"".join(self._new(e) for e in events)

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

    def _request(self, helds: list[Held], problem: str | None = None) -> tuple[ToolCall, ...]:
        self._waiting = [(h, h.call(problem)) for h in helds]
        return tuple(c for _, c in self._waiting)

    # --- input --------------------------------------------------------------------------

    def _run(self) -> Step:
        out = bytearray()
        while self._queue and not self._waiting and not self._ended:
            event = self._queue[0]
            try:
                obj = read_event(event)
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

    def _upstream_error(self, event: SSEEvent, obj: JSONObject) -> tuple[bytes, str]:
        full, message = upstream_error(obj)
        return self._emit(event, full, changed=full != obj), message

    def _apply(self, event: SSEEvent, obj: JSONObject, kind: str) -> tuple[bytes, Held | None]:
        """One event: pass it, or hold it; returns the call item it completed, if any."""
        if kind in LIFECYCLE:
            return self._lifecycle(event, obj, kind), None
        if kind.endswith(".delta"):
            self.output_units += 1
        oi = output_index(obj)
        if kind == "response.output_item.added":
            item = obj.get("item")
            if oi is None or not isinstance(item, dict):
                raise ProtocolError("response.output_item.added has no item or output_index")
            if oi in self._seen:
                raise ProtocolError(f"output item {oi} was added twice")
            self._seen.add(oi)
            if is_call(item.get("type")):
                check_call_item(item, f"upstream stream item {oi}")
                self._open[oi] = Held(oi, item, [(event, obj)])
                return b"", None
            return self._emit(event, obj), None
        if oi is not None and oi in self._open:
            held = self._open[oi]
            return b"", held if held.take(event, obj, kind) else None
        if oi is not None and oi in self._closed:
            raise ProtocolError(f"stream event for tool call item {oi} after it was complete")
        if kind.startswith(CALL_EVENTS):
            raise ProtocolError(f"{kind} event outside an open tool call item")
        item = obj.get("item")
        if isinstance(item, dict) and is_call(item.get("type")):
            raise ProtocolError(f"{kind} event carries a tool call item that was never added")
        if kind == "response.output_item.done" and isinstance(item, dict):
            self._report(item, oi)
        return self._emit(event, obj), None


    def _lifecycle(self, event: SSEEvent, obj: JSONObject, kind: str) -> bytes:
        """Rewrite the response snapshot's output to what the client was sent."""
        response = obj.get("response")
        if not isinstance(response, dict):
            raise ProtocolError(f"{kind} event has no response object")
        if isinstance(response.get("id"), str):
            self.response_id = str(response["id"])
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
                    if kind in TERMINAL and isinstance(item, dict):
                        self._report(item, i)  # one that never had its own done event
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
