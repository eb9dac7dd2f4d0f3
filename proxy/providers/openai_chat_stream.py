"""The OpenAI Chat Completions stream filter (sans-IO).

Tool calls arrive as `choices[i].delta.tool_calls` fragments keyed by `index`.
A call is complete when a delta for another index, the choice's
`finish_reason`, or `[DONE]` arrives; until then its fragments are held back
while everything else passes. Past `max_arguments` bytes held, the stream is cut
(providers/held.py). Requests, whole responses and error shapes are
openai_chat.py.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Action, Decision, OnDeny, ToolCall, Usage
from ..surrogates import json_text
from .base import Step, denial_text
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut, cut_denial
from .openai_chat_wire import CUT_REASONS, JSONObject, error_body, tool_call, usage_of
from .sse import SSEDecoder, SSEEvent, encode, encode_data


@dataclass(slots=True)
class _Open:
    choice: int
    index: int
    id: str = ""
    name: str = ""
    fragments: HeldText = field(default_factory=HeldText)
    legacy: bool = False


@dataclass(slots=True)
class _Choice:
    open: dict[int, _Open] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    allowed: int = 0
    text: bool = False
    finished: bool = False


LEGACY = -1


class ChatStream:
    """Filters one Chat Completions SSE stream; see `providers.base` for the protocol."""

    def __init__(self, strip_usage: bool = False, *,
                 max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`strip_usage`: tether asked for usage the client did not; drop the usage chunk.
        `max_arguments`: the argument bytes held back at most (limits.max_arguments_bytes)."""
        self._strip_usage = strip_usage
        self._max_arguments = max_arguments
        self.output_units = 0  # content and argument deltas seen: ~ tokens, if usage never comes
        self._decoder = SSEDecoder()
        self._queue: deque[SSEEvent] = deque()
        self._choices: dict[int, _Choice] = {}
        self._waiting: list[tuple[_Open, ToolCall]] = []
        self._last: JSONObject = {}  # the last chunk passed: rendered calls copy its fields
        self._grew = False  # fragments were held since the limit was last checked
        self._ended = False
        self._done_seen = False
        self._eof = False
        self._final = b""
        self._usage: Usage | None = None
        self._failed: str | None = None

    @property
    def usage(self) -> Usage | None:
        return self._usage

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
            return self._fail(e.message, "bad_upstream_stream")
        return self._run()

    def close(self) -> Step:
        """The upstream ended. A stream without [DONE] (or a finish for every choice)
        was cut: its open calls are denied and the client gets an error event."""
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
        for (open_, call), decision in zip(self._waiting, decisions, strict=True):
            state = self._choices[open_.choice]
            del state.open[open_.index]
            state.closed.add(open_.index)
            if self._ended:
                continue
            if not decision.allowed and decision.on_deny is OnDeny.ERROR:
                refused.append((call, decision))
            out += self._render_call(state, open_, call, decision)
        self._waiting = []
        if refused and not self._ended:
            texts = " ".join(denial_text(c, d) for c, d in refused)
            self._ended = True
            self._failed = "tool call denied"
            self._queue.clear()
            return Step(bytes(self._error_event(texts, "permission_error", "tool_call_denied")))
        if self._ended:
            final, self._final = self._final, b""
            return Step(bytes(out) + final)
        step = self._run()
        return Step(bytes(out) + step.data, step.pending)

    def _fail(self, message: str, code: str) -> Step:
        """End the stream with an error event; open calls are still decided (as denied)."""
        self._ended = True
        self._failed = message
        self._queue.clear()
        self._final = self._error_event(message, "upstream_error", code)
        pending = [
            (o, self._complete(o, problem=f"{message}; the tool call was not released"))
            for state in self._choices.values()
            for o in state.open.values()
            if not any(o is w for w, _ in self._waiting)
        ]
        if pending or self._waiting:
            self._waiting.extend(pending)
            return Step(b"", tuple(c for _, c in self._waiting))
        final, self._final = self._final, b""
        return Step(final)

    def _held(self) -> int:
        return sum(o.fragments.size for s in self._choices.values() for o in s.open.values())

    def _cut(self) -> tuple[ToolCall, ...]:
        """Too much argument text held: end the stream with the denial, buffer nothing
        more, and hand out every open call, arguments dropped, to be judged and audited."""
        opens = [o for state in self._choices.values() for o in state.open.values()]
        self._waiting = [(o, cut(tool_call(id=o.id, name=o.name, raw="", index=o.index,
                                           choice=o.choice), self._max_arguments))
                         for o in opens]
        calls = tuple(c for _, c in self._waiting)
        self._ended = True
        self._failed = "tool-call arguments over limits.max_arguments_bytes: the stream was cut"
        self._queue.clear()
        for o in opens:
            o.fragments.clear()
        self._final = self._error_event(cut_denial(calls),
                                        "permission_error", "tool_call_denied")
        return calls

    def _error_event(self, message: str, kind: str, code: str) -> bytes:
        return encode_data(error_body(message, kind=kind, code=code).decode())

    def _complete(self, open_: _Open, problem: str | None = None) -> ToolCall:
        return tool_call(
            id=open_.id,
            name=open_.name,
            raw=open_.fragments.text(),
            index=open_.index,
            choice=open_.choice,
            problem=problem,
        )

    def _request(self, opens: list[_Open], problem: str | None = None) -> Step:
        self._waiting = [(o, self._complete(o, problem)) for o in opens]
        return Step(b"", tuple(c for _, c in self._waiting))

    def _run(self) -> Step:
        out = bytearray()
        while self._queue and not self._waiting and not self._ended:
            event = self._queue[0]
            if event.data.strip() == "[DONE]":
                opens = [o for s in self._choices.values() for o in s.open.values()]
                if opens:
                    return Step(bytes(out), self._request(opens).pending)
                self._queue.popleft()
                self._done_seen = True
                self._ended = True
                out += encode(event)
                continue
            try:
                obj = json.loads(event.data)
            except ValueError:
                step = self._fail("upstream stream event is not valid JSON", "bad_upstream_stream")
                return Step(bytes(out) + step.data, step.pending)
            if not isinstance(obj, dict):
                step = self._fail("upstream stream event is not a JSON object",
                                  "bad_upstream_stream")
                return Step(bytes(out) + step.data, step.pending)
            if "error" in obj:
                self._queue.popleft()
                out += encode(event)
                step = self._fail("the upstream sent an error event mid-stream", "upstream_error")
                self._final = b""
                return Step(bytes(out) + step.data, step.pending)
            try:
                completing, problem = self._completing(obj)
            except ProtocolError as e:
                step = self._fail(e.message, "bad_upstream_stream")
                return Step(bytes(out) + step.data, step.pending)
            if completing:
                return Step(bytes(out), self._request(completing, problem).pending)
            self._queue.popleft()
            try:
                out += self._pass(event, obj)
            except ProtocolError as e:
                step = self._fail(e.message, "bad_upstream_stream")
                return Step(bytes(out) + step.data, step.pending)
            if self._grew:  # only held fragments can take it over the limit
                self._grew = False
                if self._held() > self._max_arguments:
                    return Step(bytes(out), self._cut())
        if self._eof and not self._queue and not self._waiting and not self._ended:
            finished = bool(self._choices) and all(c.finished for c in self._choices.values())
            if any(c.open for c in self._choices.values()) or not (self._done_seen or finished):
                step = self._fail(
                    "the upstream stream ended before the response was complete",
                    "upstream_truncated",
                )
                return Step(bytes(out) + step.data, step.pending)
            self._ended = True
        return Step(bytes(out))

    def _state(self, choice: object) -> _Choice:
        if not isinstance(choice, int) or isinstance(choice, bool) or choice < 0:
            raise ProtocolError("stream choice has no valid index")
        return self._choices.setdefault(choice, _Choice())

    def _completing(self, obj: JSONObject) -> tuple[list[_Open], str | None]:
        """Calls that this chunk completes, before the chunk itself is applied."""
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise ProtocolError("stream chunk 'choices' is not an array")
        done: list[_Open] = []
        problem = None
        for ch in choices:
            if not isinstance(ch, dict):
                raise ProtocolError("stream choice is not an object")
            state = self._state(ch.get("index"))
            delta = ch.get("delta") or {}
            if not isinstance(delta, dict):
                raise ProtocolError("stream delta is not an object")
            tcs = delta.get("tool_calls") or []
            if not isinstance(tcs, list):
                raise ProtocolError("stream 'tool_calls' is not an array")
            for tc in tcs:
                idx = tc.get("index") if isinstance(tc, dict) else None
                if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                    raise ProtocolError("stream tool call has no valid index")
                done += [o for i, o in state.open.items() if i != idx and all(o is not d for d in done)]
            reason = ch.get("finish_reason")
            if reason:
                done += [o for o in state.open.values() if all(o is not d for d in done)]
                if reason in CUT_REASONS and state.open:
                    problem = (
                        f"the response was cut off (finish_reason {reason}) "
                        "in the middle of a tool call"
                    )
        return done, problem

    def _pass(self, event: SSEEvent, obj: JSONObject) -> bytes:
        """Apply one chunk: buffer its tool-call fragments, release everything else."""
        self._last = obj
        choices = obj.get("choices") or []
        assert isinstance(choices, list)
        if "usage" in obj and obj["usage"] is not None:
            self._usage = usage_of(obj["usage"])
            if self._strip_usage and not choices:
                return b""
        self.output_units += len(choices)
        touched = False
        kept: list[object] = []
        for ch in choices:
            assert isinstance(ch, dict)
            state = self._choices[ch["index"]]  # made (and its index checked) by _completing
            delta = ch.get("delta") or {}
            assert isinstance(delta, dict)
            if delta.get("content"):
                state.text = True
            if "tool_calls" in delta or "function_call" in delta:
                touched = True
                self._buffer(state, ch["index"], delta)
                delta = {
                    k: v
                    for k, v in delta.items()
                    if k not in ("tool_calls", "function_call") and v is not None
                }
                ch = {**ch, "delta": delta}
            reason = ch.get("finish_reason")
            if reason:
                state.finished = True
                if reason in ("tool_calls", "function_call") and state.allowed == 0:
                    touched = True
                    ch = {**ch, "finish_reason": "stop"}
            if ch.get("delta") or ch.get("finish_reason") or ch.get("logprobs"):
                kept.append(ch)
        if not touched:
            return encode(event)
        if not kept and obj.get("usage") is None:
            return b""
        return encode(SSEEvent(json_text({**obj, "choices": kept}),
                               event.event, event.id, event.retry))

    def _buffer(self, state: _Choice, choice: int, delta: JSONObject) -> None:
        pieces: list[tuple[int, object, object, object]] = []
        tool_calls = delta.get("tool_calls") or []
        assert isinstance(tool_calls, list)
        for tc in tool_calls:
            assert isinstance(tc, dict)
            fn = tc.get("function") or {}
            if not isinstance(fn, dict):
                raise ProtocolError("stream tool call 'function' is not an object")
            pieces.append((tc["index"], tc.get("id"), fn.get("name"), fn.get("arguments")))
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            pieces.append((LEGACY, None, legacy.get("name"), legacy.get("arguments")))
        for idx, call_id, name, args in pieces:
            assert isinstance(idx, int)
            if idx in state.closed:
                raise ProtocolError(f"stream tool call {idx} continued after it was complete")
            open_ = state.open.setdefault(idx, _Open(choice, idx, legacy=idx == LEGACY))
            if isinstance(call_id, str) and call_id:
                if open_.id and open_.id != call_id:
                    raise ProtocolError(f"stream tool call {idx} changed its id")
                open_.id = call_id
            if isinstance(name, str) and name:
                if open_.name and open_.name != name:
                    raise ProtocolError(f"stream tool call {idx} changed its name")
                open_.name = name
            if args is not None:
                if not isinstance(args, str):
                    raise ProtocolError(f"stream tool call {idx} arguments are not text")
                open_.fragments.append(args)
                self._grew = True

    def _render_call(
        self, state: _Choice, open_: _Open, call: ToolCall, decision: Decision
    ) -> bytes:
        if decision.action is Action.ALLOW:
            if open_.legacy:
                delta: JSONObject = {
                    "function_call": {"name": call.name, "arguments": call.raw_arguments}
                }
            else:
                delta = {
                    "tool_calls": [
                        {
                            "index": state.allowed,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.raw_arguments},
                        }
                    ]
                }
            state.allowed += 1
        else:
            text = denial_text(call, decision)
            delta = {"content": ("\n\n" if state.text else "") + text}
            state.text = True
        chunk = {
            **{k: v for k, v in self._last.items() if k not in ("choices", "usage")},
            "choices": [
                {"index": open_.choice, "delta": delta, "logprobs": None, "finish_reason": None}
            ],
        }
        return encode_data(json_text(chunk))
