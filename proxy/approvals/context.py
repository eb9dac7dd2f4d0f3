"""What an approver is shown beside a held call, kept with the hold.

A hold's context is taken where the hold opens: the effect and API operation the
call maps to, the user's request (the last user message of the request that
produced the call), the model's text just before the call, and what the session
did recently. All of it is agent- or model-controlled text: it is masked as the
audit log masks (audit.redact.mask_text) and bounded here, once, before it is
stored, so a 100 KB prompt costs the store a few KB. How it is shown (escaped,
invisible characters made visible) is approvals/shown.py.

Pure functions on bytes and plain data, no I/O. The readers below understand the
shapes of every governed wire format without importing them (a message list,
Responses `input`, Gemini `contents`; a whole answer or its SSE stream): what
they cannot read is None, shown as "unknown", never an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..audit.redact import mask_text
from ..model import PastCall

USER_CHARS = 2000        # the head of the user's request
MODEL_CHARS = 1500       # the tail of the model's text before the call
RECENT = 5               # the session's last decisions
RECENT_CHARS = 240
STREAM_TAIL = 64 * 1024  # bytes of a stream kept to read the model's text from
_MASK_SLACK = 512        # read past the cut, so a secret across it is still masked

# Objects that are a tool call (their contents are arguments, not the model's text),
# and objects that are not text the user reads (reasoning).
_CALL_TYPES = frozenset({"tool_use", "server_tool_use", "function_call", "mcp_call",
                         "custom_tool_call", "computer_call", "web_search_call",
                         "file_search_call", "code_interpreter_call", "local_shell_call"})
_CALL_KEYS = ("tool_calls", "function_call", "functionCall", "toolUse")
_SKIP_TYPES = frozenset({"reasoning", "thinking", "redacted_thinking"})


@dataclass(frozen=True, slots=True)
class HoldContext:
    """None: not known (an egress request has no conversation; an older record)."""

    effect: str | None = None
    api: str | None = None
    user_request: str | None = None
    model_text: str | None = None
    recent: tuple[str, ...] | None = None

    def as_json(self) -> dict[str, object]:
        return {"effect": self.effect, "api": self.api, "user_request": self.user_request,
                "model_text": self.model_text,
                "recent": list(self.recent) if self.recent is not None else None}

    @classmethod
    def from_json(cls, value: object) -> HoldContext | None:
        """Read back from a store; anything malformed is None (shown as unknown)."""
        if not isinstance(value, Mapping):
            return None

        def text(key: str) -> str | None:
            v = value.get(key)
            return v if isinstance(v, str) else None

        recent = value.get("recent")
        return cls(text("effect"), text("api"), text("user_request"), text("model_text"),
                   tuple(str(r)[:RECENT_CHARS] for r in recent[:RECENT])
                   if isinstance(recent, list) else None)


def head(text: str, limit: int) -> str:
    """The masked start of `text`, saying how much more there was."""
    shown = mask_text(text[: limit + _MASK_SLACK])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(text) - limit} more characters not shown)"


def tail(text: str, limit: int) -> str:
    """The masked end of `text`, saying how much came before it."""
    shown = mask_text(text[-(limit + _MASK_SLACK):])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"({len(text) - limit} earlier characters not shown) …{shown[-limit:]}"


def _texts(content: object) -> Iterator[str]:
    """The text of one message's content: a string, or the text of its parts."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield str(part["text"])


def last_user_text(body: bytes) -> str | None:
    """The last user message of a request that holds text (not only tool results)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("input"), str):  # Responses: `input` as one string
        return str(obj["input"])
    turns = obj.get("messages") or obj.get("contents") or obj.get("input")
    if not isinstance(turns, list):
        return None
    for turn in reversed(turns):
        if not isinstance(turn, Mapping) or turn.get("role", "user") != "user":
            continue
        if "type" in turn and turn["type"] != "message":
            continue  # a Responses item that is not a message (a tool's output)
        text = "\n".join(_texts(turn.get("content", turn.get("parts"))))
        if text.strip():
            return text
    return None


class _Said:
    """The model's text in an answer, in order, and where in it each tool call came."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.size = 0
        self.marks: dict[str, int] = {}

    def text(self, piece: str) -> None:
        self.pieces.append(piece)
        self.size += len(piece)

    def call(self, value: Mapping[str, object]) -> None:
        """A tool call (or Bedrock's or Gemini's wrapper of one): its ids mark the spot."""
        inner = [v for k in ("toolUse", "functionCall") if isinstance(v := value.get(k), Mapping)]
        for c in (value, *inner):
            for key in ("id", "call_id", "toolUseId"):
                found = c.get(key)
                if isinstance(found, str) and found:
                    self.marks.setdefault(found, self.size)

    def walk(self, value: object) -> None:
        """Every text outside tool calls and reasoning; iterative, so nesting costs no stack."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, _Calls):
                for c in item:
                    if isinstance(c, Mapping):
                        self.call(c)
            elif isinstance(item, list):
                stack.extend(reversed(item))
            elif isinstance(item, Mapping):
                self._object(item, stack)
            elif isinstance(item, _Piece):
                self.text(str(item))

    def _object(self, value: Mapping[str, object], stack: list[object]) -> None:
        kind = value.get("type")
        if kind in _SKIP_TYPES:
            return
        if kind in _CALL_TYPES or "functionCall" in value or "toolUse" in value:
            self.call(value)
            return
        if kind == "response.output_text.delta" and isinstance(value.get("delta"), str):
            self.text(str(value["delta"]))
            return
        if isinstance(kind, str) and kind.startswith("response."):
            return  # other Responses stream events repeat the deltas' text
        later: list[object] = []
        for key, item in value.items():
            if key in _CALL_KEYS:
                later.append(_Calls(item))
            elif key in ("text", "content") and isinstance(item, str):
                later.append(_Piece(item))
            elif isinstance(item, list | Mapping) and key not in ("input", "arguments", "args"):
                later.append(item)
        stack.extend(reversed(later))


class _Piece(str):
    """A text found inside an object, kept in its place on the walk's stack."""


class _Calls(list[object]):
    """The calls under `tool_calls` (or a lone `function_call`), marked in their place."""

    def __init__(self, calls: object) -> None:
        super().__init__(calls if isinstance(calls, list) else [calls])


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer read once, for every held call in it."""

    text: str
    marks: Mapping[str, int]

    def before(self, call_id: str = "") -> str | None:
        """The model's text before the call `call_id` (all of it when the call is not
        found); None when there is none."""
        said = self.text[: self.marks.get(call_id, len(self.text))]
        return said if said.strip() else None


def read_answer(answer: bytes) -> Answer:
    """A whole JSON body, a JSON array stream, or (the tail of) an SSE stream."""
    said = _Said()
    try:
        said.walk(json.loads(answer))
    except (ValueError, RecursionError):
        for line in answer.splitlines():
            if line.startswith(b"data:"):
                try:
                    said.walk(json.loads(line[5:]))
                except (ValueError, RecursionError):
                    continue
    return Answer("".join(said.pieces), said.marks)


def model_text_before(answer: bytes, call_id: str = "") -> str | None:
    return read_answer(answer).before(call_id)


def recent_of(history: Sequence[PastCall]) -> tuple[str, ...]:
    """The session's last decisions, newest last, one short line each."""
    lines = []
    for past in history[-RECENT:]:
        when = time.strftime("%H:%M:%S", time.gmtime(past.at)) if past.at else "?"
        api = f" ({past.api})" if past.api else ""
        line = f"{when} {past.action.value} {past.summary or past.tool}{api}"
        lines.append(mask_text(line[:RECENT_CHARS]))
    return tuple(lines)


def build(*, effect: str | None = None, api: str | None = None, user: str | None = None,
          said: str | None = None, history: Sequence[PastCall] | None = None) -> HoldContext:
    """The bounded, masked context of one held call: `user` as last_user_text read it,
    `said` as Answer.before did (read once for every call of an answer)."""
    return HoldContext(effect=effect, api=api,
                       user_request=head(user, USER_CHARS) if user is not None else None,
                       model_text=tail(said, MODEL_CHARS) if said is not None else None,
                       recent=recent_of(history) if history is not None else None)


def with_effect(context: HoldContext | None, effect: str) -> HoldContext:
    base = context or HoldContext()
    return base if base.effect else HoldContext(effect, base.api, base.user_request,
                                                base.model_text, base.recent)

