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
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..model import Action, Decision, ToolCall, Usage
from ..surrogates import json_text
from .base import denial_text
from .held import DEFAULT_MAX_ARGUMENTS, HeldText, cut
from .openai_chat_wire import CUT_REASONS, JSONObject, error_body, tool_call, usage_of
from .sse import SSEDecoder, SSEEvent, encode, encode_data
from .stream_engine import Completing, Failure, StreamEngine, UpstreamFailed


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
_ERRORS = {Failure.BAD: ("upstream_error", "bad_upstream_stream"),
           Failure.TRUNCATED: ("upstream_error", "upstream_truncated"),
           Failure.UPSTREAM: ("upstream_error", "upstream_error"),
           Failure.DENIED: ("permission_error", "tool_call_denied")}


class ChatCodec:
    """Chat Completions chunks for the stream engine (providers/stream_engine.py)."""

    def __init__(self, strip_usage: bool) -> None:
        self._strip_usage = strip_usage
        self.output_units = 0  # content and argument deltas seen: ~ tokens, if usage never comes
        self.noun = "tool call"
        self.grew = False  # fragments were held since the engine last checked the limit
        self.done = False
        self.ran: list[ToolCall] = []
        self.completed: list[_Open] = []  # never: a later event completes a call
        self.failed: str | None = None
        self._decoder = SSEDecoder()
        self._choices: dict[int, _Choice] = {}
        self._obj: JSONObject | None = None  # the event `completes` read; None for [DONE]
        self._last: JSONObject = {}  # the last chunk passed: rendered calls copy its fields
        self._done_seen = False
        self.usage: Usage | None = None

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        return self._decoder.feed(chunk)

    def flush(self) -> list[SSEEvent]:
        return self._decoder.flush()

    def held(self) -> list[_Open]:
        return [o for s in self._choices.values() for o in s.open.values()]

    def held_size(self) -> int:
        return sum(h.fragments.size for h in self.held())

    def dropped(self, handle: _Open, limit: int) -> ToolCall:
        handle.fragments.clear()
        return cut(self.call(handle, None), limit)

    def complete(self) -> bool:
        """Every call decided, and [DONE] (or a finish for every choice) came."""
        if any(c.open for c in self._choices.values()):
            return False
        return self._done_seen or (
            bool(self._choices) and all(c.finished for c in self._choices.values()))

    def trailer(self, chunk: bytes) -> bytes:
        return b""  # nothing may follow the end

    def settle(self, handle: _Open, call: ToolCall) -> None:
        state = self._choices[handle.choice]
        del state.open[handle.index]
        state.closed.add(handle.index)

    def error(self, message: str, failure: Failure) -> bytes:
        kind, code = _ERRORS[failure]
        return encode_data(error_body(message, kind=kind, code=code).decode())

    def call(self, handle: _Open, problem: str | None) -> ToolCall:
        return tool_call(
            id=handle.id,
            name=handle.name,
            raw=handle.fragments.text(),
            index=handle.index,
            choice=handle.choice,
            problem=problem,
        )

    def completes(self, event: SSEEvent) -> Completing[_Open] | None:
        if event.data.strip() == "[DONE]":
            self._obj = None
            opens = self.held()
            return (opens, None) if opens else None
        try:
            obj = json.loads(event.data)
        except ValueError:
            raise ProtocolError("upstream stream event is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError("upstream stream event is not a JSON object")
        if "error" in obj:
            raise UpstreamFailed(encode(event), "the upstream sent an error event mid-stream")
        self._obj = obj
        completing, problem = self._completing(obj)
        return (completing, problem) if completing else None

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

    def apply(self, event: SSEEvent) -> bytes:
        """Apply the chunk `completes` read: buffer its tool-call fragments, release
        everything else."""
        obj = self._obj
        if obj is None:  # [DONE]
            self._done_seen = self.done = True
            return encode(event)
        self._last = obj
        choices = obj.get("choices") or []
        assert isinstance(choices, list)
        if "usage" in obj and obj["usage"] is not None:
            self.usage = usage_of(obj["usage"])
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
                self.grew = True

    def render(self, open_: _Open, call: ToolCall, decision: Decision) -> bytes:
        state = self._choices[open_.choice]
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


class ChatStream(StreamEngine[SSEEvent, _Open]):
    """Filters one Chat Completions SSE stream; see `providers.base` for the protocol."""

    def __init__(self, strip_usage: bool = False, *,
                 max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> None:
        """`strip_usage`: tether asked for usage the client did not; drop the usage chunk.
        `max_arguments`: the argument bytes held back at most (limits.max_arguments_bytes)."""
        self._chat = ChatCodec(strip_usage)
        super().__init__(self._chat, max_arguments)

    @property
    def output_units(self) -> int:
        """Content and argument deltas seen: about the tokens, if usage never comes."""
        return self._chat.output_units
