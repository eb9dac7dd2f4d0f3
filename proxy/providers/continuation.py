"""Continuing an answer upstream after its calls were denied: the sans-IO skeleton.

A denied call the model never reads is useless to the common agent loop (run the calls,
send the results back, stop when an answer has none): when tether takes every call out
of an answer, the loop ends there. With `on_deny: continue`, tether itself sends the
conversation back to the provider, with the denied calls and, per call, a tool result in
the provider's own format saying it was not executed and why (`denial_text`), and hands
the agent the model's next answer, joined to the first: one ordinary answer. New calls
in it are judged as usual. The I/O (sending, budgets, audit, traces) is
server/continuation.py; what differs per wire format is a `Continues`:

- `follow_whole(sent, answer, denied)`: the next request, from the last one sent and the
  upstream's whole answer as the model made it (thinking blocks, signatures kept);
- `join(first, then)`: two answers as the agent gets them, made one: the content of both,
  the continuation's stop reason, the usage of both added up, the first one's id;
- `seam(sent)`: the stream surgery (`Seam`), or None where this request's stream cannot
  be continued (the answer then ends as a rewrite, as without continuing).

`ContinuingStream` wraps a format's stream filter: everything passes as before, except
the events that end the answer (a finish chunk, `[DONE]`, `message_stop` ...), which the
`Seam` holds back until the round is over. A round that handed the agent no call and
denied its calls with `continue` ends with `follow` set: the front end sends it, calls
`resume()`, and feeds the continuation through the same object; the seam drops the
continuation's opening events and renumbers its blocks, so the agent sees one
well-formed stream. At the bound (`max_rounds`), or when the continuation cannot be had
(`give_up`), the held events are released as they were: today's rewrite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..model import Decision, OnDeny, ToolCall, Usage
from .base import Step, StreamFilter, denial_text
from .provider_ran import VIOLATION

type JSONObject = dict[str, object]


@dataclass(frozen=True, slots=True)
class Denied:
    """One denied call sent back to the model with its result."""

    call: ToolCall
    decision: Decision

    @property
    def text(self) -> str:
        """The tool result the model reads: "[tether] The tool call ... was denied by
        RULE: MESSAGE. It was not executed." (the same text the agent is shown)."""
        return denial_text(self.call, self.decision)

    @property
    def arguments(self) -> Mapping[str, object]:
        """The call's arguments as an object (`{}` for ones that did not parse)."""
        return self.call.arguments if self.call.arguments is not None else {}


def continued(decision: Decision) -> bool:
    """Whether this denial is one to send back to the model: denied with `continue`, and
    not because the provider ran a tool the policy forbids (`VIOLATION`): that answer is
    one tether no longer trusts, and asking the same provider for more of it would hand
    it the forbidden tool's output again; it ends as the rewrite."""
    return (not decision.allowed and decision.on_deny is OnDeny.CONTINUE
            and VIOLATION not in decision.rules)


def to_continue(calls: Sequence[ToolCall], decisions: Sequence[Decision]
                ) -> tuple[Denied, ...] | None:
    """The denials to send back, when an answer is one to continue: it held calls, every
    one was denied, each `continued`. An answer that hands the agent a call goes to the
    agent: the agent runs that one and sends its result, with the denial text beside
    it."""
    if not calls or len(calls) != len(decisions):
        return None
    if not all(continued(d) for d in decisions):
        return None
    return tuple(Denied(c, d) for c, d in zip(calls, decisions, strict=True))


def add_usage(a: object, b: object) -> object:
    """Usage objects added up: numbers summed, objects field by field, anything else the
    latter (mcp_approvals merges answers the same way)."""
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: add_usage(a.get(k), b[k]) if k in a else b[k] for k in b} | \
            {k: v for k, v in a.items() if k not in b}
    return b if b is not None else a


def turn_request(sent: bytes, turns: str, model_role: str) -> JSONObject | None:
    """The request `sent` as an object, when another turn can follow it: its `turns` list
    (`messages`, Gemini's `contents`) is there and does not end with the model's own turn
    (`model_role`: a prefill the continuation would break). None otherwise."""
    obj: object = json.loads(sent)
    listed = obj.get(turns) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(listed, list) or not listed:
        return None
    last = listed[-1]
    if isinstance(last, dict) and last.get("role") == model_role:
        return None
    return obj


def without_denials(text: str, denied: Sequence[Denied]) -> str:
    """What the model said in a round, less the denial texts tether put in its calls'
    place (the model reads those as the calls' results, not as its own words)."""
    for d in denied:
        text = text.replace(d.text, "")
    return text.strip()


class Seam(Protocol):
    """One format's stream surgery across rounds (see the module docstring)."""

    def feed(self, data: bytes) -> bytes:
        """The filter's output of the current round -> the bytes for the client, less the
        events that end the answer (held)."""
        ...

    def follow(self, sent: bytes, denied: Sequence[Denied]) -> bytes | None:
        """The request that continues this round (what it said, the denied calls and
        their results), or None when this answer cannot be continued."""
        ...

    def next_round(self) -> bytes:
        """The held events are dropped (what of them the client still needs comes back);
        the filter's output that follows is a continuation's."""
        ...

    def release(self) -> bytes:
        """The held events, with the usage of every round added up: the answer ends."""
        ...


class Continues(Protocol):
    """One wire format's part in continuing (see the module docstring)."""

    def follow_whole(self, sent: bytes, answer: bytes, denied: Sequence[Denied]
                     ) -> bytes | None: ...

    def join(self, first: bytes, then: bytes) -> bytes: ...

    def seam(self, sent: bytes) -> Seam | None: ...


class ContinuingStream:
    """A stream filter that can go on past its answer's end; the StreamFilter protocol
    of providers.base, plus `follow`, `resume`, `give_up`, `bounded`, `round_usage`."""

    def __init__(self, make: Callable[[], StreamFilter], seam: Seam, sent: bytes,
                 max_rounds: int) -> None:
        self._make = make
        self._inner = make()
        self._seam = seam
        self._max_rounds = max_rounds
        self.sent = sent                      # the request of the current round
        self.rounds = 0                       # continuations made
        self.follow: bytes | None = None      # set at a round's end: the request to send
        self.denied: tuple[Denied, ...] = ()  # what `follow` sends back
        self.bounded = False                  # a round ended denied at the bound
        self._first_usage: Usage | None = None
        self._first_units = 0
        self._round()

    def _round(self) -> None:
        self._pending: tuple[ToolCall, ...] = ()
        self._calls: list[ToolCall] = []
        self._decisions: list[Decision] = []
        self._closed = False
        self._ended = False

    # --- the StreamFilter protocol ------------------------------------------------------

    @property
    def usage(self) -> Usage | None:
        """The first round's usage (each continuation is charged on its own)."""
        return self._first_usage if self.rounds else self._inner.usage

    @property
    def round_usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def output_units(self) -> int:
        if self.rounds:
            return self._first_units
        units = getattr(self._inner, "output_units", 0)
        return units if isinstance(units, int) else 0

    @property
    def failed(self) -> str | None:
        return self._inner.failed

    def feed(self, chunk: bytes) -> Step:
        return self._out(self._inner.feed(chunk))

    def close(self) -> Step:
        self._closed = True
        return self._out(self._inner.close())

    def decide(self, decisions: Sequence[Decision]) -> Step:
        self._calls += self._pending
        self._decisions += decisions
        return self._out(self._inner.decide(decisions))

    # --- rounds ----------------------------------------------------------------------------

    def resume(self) -> bytes:
        """The continuation's stream follows (the front end sent `follow`); the bytes
        the client gets before it."""
        if self.follow is None:
            raise ValueError("there is nothing to continue")
        if not self.rounds:
            self._first_usage = self._inner.usage
            units = getattr(self._inner, "output_units", 0)
            self._first_units = units if isinstance(units, int) else 0
        self.sent, self.follow, self.denied = self.follow, None, ()
        self.rounds += 1
        self._inner = self._make()
        self._round()
        return self._seam.next_round()

    def give_up(self) -> bytes:
        """The continuation could not be had: the answer ends as it stood (the rewrite)."""
        self.follow, self.denied = None, ()
        return self._seam.release()

    def _out(self, step: Step) -> Step:
        self._pending = step.pending
        data = self._seam.feed(step.data)
        if self._closed and not step.pending and not step.approvals and not self._ended:
            self._ended = True
            data += self._end()
        return Step(data, step.pending, step.ran, step.approvals)

    def _end(self) -> bytes:
        """The round is over: continue, or release the answer's end."""
        denied = to_continue(self._calls, self._decisions) if self.failed is None else None
        if denied is not None and self.rounds >= self._max_rounds:
            self.bounded, self.denied = True, denied
        elif denied is not None:
            request = self._seam.follow(self.sent, denied)
            if request is not None:
                self.follow, self.denied = request, denied
                return b""
        return self._seam.release()
