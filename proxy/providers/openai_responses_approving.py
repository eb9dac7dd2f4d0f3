"""MCP approval requests in a Responses stream, and the continuation tether streams after.

Sans-IO. `ApprovingStream` wraps the Responses stream filter (openai_responses_stream.py)
of a request that declares MCP servers, and reads what that filter releases:

- An `mcp_approval_request` item is held from its `response.output_item.added` to its
  `response.output_item.done`, and nothing after it is released until it is judged
  (`Step.approvals`, answered with `approve`). The agent's (mcp_approvals.py) is then
  released as it came; tether's is taken out of the stream, and its answer kept.
- Output indexes are renumbered so the client sees no gap where an item was taken out,
  and sequence numbers run on across rounds.
- At `response.completed`, when tether holds answers and the stream handed the agent
  nothing to act on (no allowed call, no approval request of its own), the terminal
  event is kept back and `follow` says what to send upstream (mcp_approvals.follow_up).
  The front end sends it, calls `resume()`, and feeds the continuation's stream here:
  its `response.created` / `in_progress` are dropped (the client had them), its items
  follow the ones already sent, and its terminal event carries the whole output and
  the usage of every round added up. At most `MAX_ROUNDS` continuations; past them,
  tether's approval requests are taken out unanswered.

What a stream cannot do that a whole answer can: know, at an approval request, whether
calls come after it. So each is judged (and held, if a rule says so) when it completes,
and one tether would answer goes unanswered if the stream then hands the agent a call.
The client's `response.created` names the first round's id, its terminal event the
last round's; chain from the latter (the openai SDK's final response does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ProtocolError, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from .base import Step, denial_text
from .continuation import Denied, continued
from .mcp_approvals import APPROVAL, MAX_ROUNDS, Answer, agent_asked, approval_call, merge
from .openai_responses import JSONObject, error_event, usage_of
from .openai_responses_events import TERMINAL, output_index, read_event
from .openai_responses_stream import ResponsesStream
from .sse import SSEDecoder, SSEEvent, encode

_OPENING = frozenset({"response.created", "response.queued", "response.in_progress"})


@dataclass(frozen=True, slots=True)
class FollowUp:
    response: JSONObject        # the round's response, as the upstream ended it
    answers: tuple[Answer, ...]
    # Function calls denied with `on_deny: continue`, answered by outputs in `answers`.
    denied: tuple[Denied, ...] = ()


class ApprovingStream:
    """See the module docstring; the StreamFilter protocol of providers.base, plus
    `approve`, `follow` and `resume`."""

    def __init__(self, make: Callable[[], ResponsesStream],
                 agent_approves: Mapping[str, frozenset[str]], max_continuations: int = 0
                 ) -> None:
        """`max_continuations`: rounds that answer denied function calls, at most
        (defaults.max_continuations; 0: such calls end the answer as the rewrite)."""
        self._make = make
        self._max_continuations = max_continuations
        self._denial_rounds = 0
        self.bounded = False                  # denied calls ended a round at the bound
        self.denied: tuple[Denied, ...] = ()  # those calls, for the record
        self._inner = make()
        self._agent_approves = agent_approves
        self._decoder = SSEDecoder()
        self._events: deque[tuple[SSEEvent, JSONObject]] = deque()
        self._pending: tuple[ToolCall, ...] = ()
        self._asking: tuple[int, ToolCall, list[tuple[SSEEvent, JSONObject]]] | None = None
        self._seq: int | None = None
        self._shown: list[object] = []       # items the client has of earlier rounds
        self._usage_sum: object = None       # the usage of earlier rounds, added up
        self._usage: Usage | None = None
        self._rounds = 0
        self._units = 0
        self._failed: str | None = None
        self.follow: FollowUp | None = None
        # (first round's id, last round's): the client knows the response by the first.
        self.rounds_ids: tuple[str, str] | None = None
        self._first_id: str | None = None
        self._held: tuple[SSEEvent, JSONObject] | None = None  # the terminal event a follow holds
        self._round()

    def _round(self) -> None:
        self._hidden: set[int] = set()
        self._answers: list[Answer] = []
        self._agents = 0
        self._other_calls = False
        self._deciding: tuple[ToolCall, ...] = ()
        self._denied: list[Denied] = []

    @property
    def denial_rounds(self) -> int:
        """Continuations made to answer denied function calls."""
        return self._denial_rounds

    @property
    def inner(self) -> ResponsesStream:
        """The filter of the current (at the end: the last) round."""
        return self._inner

    # --- the StreamFilter protocol ------------------------------------------------------

    @property
    def usage(self) -> Usage | None:
        return self._usage if self._usage is not None else self._inner.usage

    @property
    def failed(self) -> str | None:
        return self._failed or self._inner.failed

    @property
    def output_units(self) -> int:
        return self._units + self._inner.output_units

    def feed(self, chunk: bytes) -> Step:
        return self._absorb(self._inner.feed(chunk))

    def close(self) -> Step:
        step = self._absorb(self._inner.close())
        if self._events and not step.pending and not step.approvals and self._failed is None:
            # An approval request whose item never completed: it is not released, and the
            # stream ends in an error rather than without its terminal event.
            self._events.clear()
            self.follow = None
            return Step(step.data + self.give_up("the upstream stream ended inside an MCP "
                                                 "approval request item"), ran=step.ran)
        return step

    def decide(self, decisions: Sequence[Decision]) -> Step:
        calls, self._deciding = self._deciding, ()
        for call, decision in zip(calls, decisions, strict=False):
            if continued(decision) and call.id and self._max_continuations:
                self._denied.append(Denied(call, decision))
                self._answers.append(Answer(call.id, False, denial_text(call, decision),
                                            output=True))
            else:  # the agent's to run, or a denial that ends the answer as it is
                self._other_calls = True
        if len(calls) != len(decisions):
            self._other_calls = True
        return self._absorb(self._inner.decide(decisions))

    def approve(self, decisions: Sequence[Decision]) -> Step:
        """The verdicts on the approval request `Step.approvals` handed out."""
        if self._asking is None or len(decisions) != 1:
            raise ValueError("one decision is needed for the pending approval request")
        index, call, events = self._asking
        self._asking = None
        [decision] = decisions
        out = bytearray()
        if decision.allowed and agent_asked(call, self._agent_approves):
            self._agents += 1
            for event, obj in events:
                out += self._out(event, obj)
        else:
            self._hidden.add(index)
            self._answers.append(Answer(call.id, decision.allowed,
                                        "" if decision.allowed else denial_text(call, decision)))
        step = self._advance()
        return Step(bytes(out) + step.data, step.pending, step.ran, step.approvals)

    def resume(self) -> None:
        """The continuation's stream follows: fed from here on like the first."""
        self._units += self._inner.output_units
        if self.follow is not None and self.follow.denied:
            self._denial_rounds += 1
        self._inner = self._make()
        self._decoder = SSEDecoder()
        self._events.clear()
        self.follow = None
        self._held = None
        self._rounds += 1
        self._round()

    def give_up(self, message: str) -> bytes:
        """The continuation could not be had: the stream ends with a Responses error."""
        self._failed = message
        self.follow = None
        self._held = None
        data = error_event(message, kind="upstream_error", code="upstream_error",
                           sequence=self._next_seq(None))
        return encode(SSEEvent(json_text(data), "error"))

    def end_as_rewrite(self) -> bytes | None:
        """A round that only answers denied calls, whose continuation could not be had (a
        budget, the upstream refused or could not be reached): its held terminal event is
        released as it is, so the answer ends as the rewrite, as on the other APIs. None
        when the round also answers MCP approval requests, which must not go unanswered
        (`give_up` then)."""
        follow, held = self.follow, self._held
        if follow is None or held is None or not follow.denied \
                or not all(a.output for a in follow.answers):
            return None
        self.follow, self._held = None, None
        event, obj = held
        response = obj.get("response")
        assert isinstance(response, dict)
        whole: JSONObject = {**response, "output": self._shown, "usage": self._usage_sum}
        self._usage = usage_of(whole)
        last = response.get("id")
        if self._rounds and isinstance(self._first_id, str) and isinstance(last, str):
            whole["id"] = self._first_id
            self.rounds_ids = (self._first_id, last)
        obj = {**obj, "response": whole, "sequence_number": self._next_seq(obj)}
        return encode(SSEEvent(json_text(obj), event.event, event.id, event.retry))

    # --- reading what the inner filter released ------------------------------------------

    def _absorb(self, step: Step) -> Step:
        try:
            for event in self._decoder.feed(step.data):
                self._events.append((event, read_event(event)))
        except (ProtocolError, UpstreamError) as e:  # our own filter's output: not expected
            self._failed = f"the stream could not be read again: {e.message}"
            return Step(step.data)
        self._pending += step.pending
        out = self._advance()
        return Step(out.data, out.pending, step.ran + out.ran, out.approvals)

    def _advance(self) -> Step:
        out = bytearray()
        while self._events:
            event, obj = self._events[0]
            item = obj.get("item")
            if obj.get("type") == "response.output_item.added" and isinstance(item, dict) \
                    and item.get("type") == APPROVAL:
                asked = self._take_approval(output_index(obj))
                if asked is None:
                    break  # its done event has not come yet
                return Step(bytes(out), approvals=(asked,))
            self._events.popleft()
            out += self._out(event, obj)
        pending, self._pending = self._pending, ()
        self._deciding += pending
        return Step(bytes(out), pending)

    def _take_approval(self, index: int | None) -> ToolCall | None:
        """The approval request item at the head, once its done event is in: its events
        are taken out of the queue (the others stay, in order)."""
        done = next((o for _, o in self._events if o.get("type") == "response.output_item.done"
                     and o.get("output_index") == index), None)
        if done is None or index is None:
            return None
        mine = [(e, o) for e, o in self._events if o.get("output_index") == index]
        rest = [(e, o) for e, o in self._events if o.get("output_index") != index]
        self._events = deque(rest)
        item = done.get("item")
        call = approval_call(item if isinstance(item, dict) else {"type": APPROVAL}, index)
        assert call is not None
        self._asking = (index, call, mine)
        return call

    # --- writing what the client gets ----------------------------------------------------

    def _next_seq(self, obj: JSONObject | None) -> int:
        if self._seq is None:
            first = obj.get("sequence_number") if obj else 0
            self._seq = first if isinstance(first, int) and not isinstance(first, bool) \
                and first >= 0 else 0
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _client_index(self, index: int) -> int:
        return len(self._shown) + index - sum(1 for h in self._hidden if h < index)

    def _out(self, event: SSEEvent, obj: JSONObject) -> bytes:
        kind = str(obj.get("type"))
        if self._rounds and kind in _OPENING:
            return b""
        if kind in TERMINAL:
            obj = self._terminal(obj, kind)
            if self.follow is not None:
                self._held = (event, obj)
                return b""
        index = output_index(obj)
        if index is not None:
            obj = {**obj, "output_index": self._client_index(index)}
        obj = {**obj, "sequence_number": self._next_seq(obj)}
        return encode(SSEEvent(json_text(obj), event.event, event.id, event.retry))

    def _terminal(self, obj: JSONObject, kind: str) -> JSONObject:
        response = obj.get("response")
        if not isinstance(response, dict):
            return obj
        output = response.get("output")
        mine = [item for i, item in enumerate(output) if i not in self._hidden] \
            if isinstance(output, list) else []
        shown: JSONObject = {"output": self._shown, "usage": self._usage_sum}
        whole = merge(shown, {**response, "output": mine})
        if self._first_id is None and isinstance(response.get("id"), str):
            self._first_id = str(response["id"])
        within = self._denial_rounds < self._max_continuations if self._denied \
            else self._rounds < MAX_ROUNDS
        go_on = (kind == "response.completed" and self._answers and not self._agents
                 and not self._other_calls)
        if go_on and not within and self._denied:
            self.bounded, self.denied = True, tuple(self._denied)
        if go_on and within:
            self.follow = FollowUp(response, tuple(self._answers), tuple(self._denied))
            self._shown = list(whole["output"]) if isinstance(whole["output"], list) else []
            self._usage_sum = whole.get("usage")
            return obj
        self._usage = usage_of(whole)
        last = response.get("id")
        if self._rounds and isinstance(self._first_id, str) and isinstance(last, str):
            # The client's stream opened under the first round's id; it keeps it.
            whole["id"] = self._first_id
            self.rounds_ids = (self._first_id, last)
        return {**obj, "response": whole}
