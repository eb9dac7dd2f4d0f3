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

from ..errors import ProtocolError
from ..model import Action, Decision, ToolCall, Usage
from ..policy.engine import MALFORMED
from ..surrogates import json_text
from .base import denial_text
from .held import DEFAULT_MAX_ARGUMENTS, cut
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
from .stream_engine import Completing, Failure, StreamEngine, UpstreamFailed

_ERRORS = {Failure.BAD: ("upstream_error", "bad_upstream_stream"),
           Failure.TRUNCATED: ("upstream_error", "upstream_truncated"),
           Failure.UPSTREAM: ("upstream_error", "upstream_error"),
           Failure.DENIED: ("permission_error", "tool_call_denied")}


class ResponsesCodec:
    """Responses events for the stream engine (providers/stream_engine.py)."""

    def __init__(self) -> None:
        self.output_units = 0  # text and argument deltas seen: ~ tokens, if usage never comes
        self.noun = "tool call"
        self.grew = False
        self.done = False
        self.completed: list[Held] = []
        self.ran: list[ToolCall] = []      # provider-run calls not yet reported in a Step
        self.failed: str | None = None     # the upstream said so: `response.failed`
        self.usage: Usage | None = None
        self._decoder = SSEDecoder()
        self._open: dict[int, Held] = {}
        self._seen: set[int] = set()
        self._closed: set[int] = set()
        self._released: dict[int, JSONObject] = {}
        self._ran_at: set[int] = set()      # output indexes already reported
        self._seq: int | None = None
        self._obj: JSONObject = {}
        # What the client was given in place of the upstream's answer, for the next
        # turn (responses_history.py): the response id, the calls decided, and each
        # denied call's id with the message that replaced it.
        self.response_id: str | None = None
        self.decided: list[str] = []  # call ids
        self.replaced: list[tuple[str, JSONObject]] = []

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        return self._decoder.feed(chunk)

    def flush(self) -> list[SSEEvent]:
        return self._decoder.flush()

    def held(self) -> list[Held]:
        return list(self._open.values())

    def held_size(self) -> int:
        return sum(h.pieces.size for h in self._open.values())

    def call(self, handle: Held, problem: str | None) -> ToolCall:
        return handle.call(problem)

    def dropped(self, handle: Held, limit: int) -> ToolCall:
        handle.pieces.clear()
        handle.events.clear()
        return cut(item_call(handle.item, handle.index, text=""), limit)

    def settle(self, handle: Held, call: ToolCall) -> None:
        self.decided.append(call.id)
        self._open.pop(handle.index, None)
        self._closed.add(handle.index)

    def complete(self) -> bool:
        return False  # only a terminal `response.*` event ends the answer (`done`)

    def trailer(self, chunk: bytes) -> bytes:
        return b""  # nothing may follow the end

    def error(self, message: str, failure: Failure) -> bytes:
        kind, code = _ERRORS[failure]
        data = error_event(message, kind=kind, code=code, sequence=self._sequence({}))
        return encode(SSEEvent(json_text(data), "error"))

    def completes(self, event: SSEEvent) -> Completing[Held] | None:
        obj = read_event(event)
        kind = str(obj["type"])
        if kind == "error":
            full, message = upstream_error(obj)
            raise UpstreamFailed(self._emit(event, full, changed=full != obj),
                                 f"the upstream sent an error event: {message}")
        if kind in TERMINAL and self._open:
            return list(self._open.values()), TERMINAL[kind]
        self._obj = obj
        return None

    def apply(self, event: SSEEvent) -> bytes:
        obj = self._obj
        data, completed = self._apply(event, obj, str(obj["type"]))
        if completed is not None:
            self.completed.append(completed)
        return data

    def _report(self, item: JSONObject, oi: int | None) -> None:
        """Note a provider-run item that is complete; other items are not reported."""
        done = openai_item(item, oi if oi is not None else 0)
        if done is None or (oi is not None and oi in self._ran_at):
            return
        if oi is None:
            raise ProtocolError(f"a {item.get('type')} item has no output_index")
        self._ran_at.add(oi)
        self.ran.append(done)

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

    def render(self, held: Held, call: ToolCall, decision: Decision) -> bytes:
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

    # --- input --------------------------------------------------------------------------

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
            self.grew = True
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
            self.done = True
            self.usage = usage_of(response)
            if kind == "response.failed":
                error = response.get("error")
                why = error.get("message") if isinstance(error, dict) else None
                self.failed = f"the upstream response failed: {why or 'no reason given'}"
        return self._emit(event, obj, changed)


class ResponsesStream(StreamEngine[SSEEvent, Held]):
    """Filters one Responses SSE stream; see `providers.base` for the protocol."""

    def __init__(self, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`max_arguments`: the argument bytes held back at most (limits.max_arguments_bytes)."""
        self._responses = ResponsesCodec()
        super().__init__(self._responses, max_arguments)

    @property
    def output_units(self) -> int:
        return self._responses.output_units

    @property
    def response_id(self) -> str | None:
        """The upstream's response id, once a lifecycle event named it."""
        return self._responses.response_id

    @property
    def decided(self) -> list[str]:
        """The ids of the calls decided, in order (responses_history.py)."""
        return self._responses.decided

    @property
    def replaced(self) -> list[tuple[str, JSONObject]]:
        """Each denied call's id, with the message item that replaced it."""
        return self._responses.replaced
