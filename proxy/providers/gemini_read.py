"""Gemini `GenerateContentResponse`s, read without losing their bytes.

A function call is one part, `{"functionCall": {"name", "args": {...}, "id"?}}`,
in `candidates[i].content.parts`, and it arrives whole, in one chunk. To keep
an allowed call's arguments byte-identical, a response is never re-serialised:
`read_chunk` walks the JSON, recording where each part starts and ends (the
values it does not need are skipped by the C decoder), so gemini_rewrite.py
can splice replacement parts into the original text. Duplicate keys anywhere
are refused (a part with two `functionCall`s is read differently by different
parsers), and a key is recognised in either spelling, `functionCall` or
`function_call`, because Google's JSON parser and the SDK both accept both.
This module only reads and validates; it decides and writes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..model import Usage
from ..strict_json import STRICT

# --- keys in either spelling ------------------------------------------------------------

_UPPER = re.compile(r"[A-Z]")


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def field_of(obj: Mapping[str, object], name: str) -> object:
    """`obj[name]` under its lowerCamelCase or snake_case spelling; both at once is an error."""
    alt = _UPPER.sub(lambda m: "_" + m.group().lower(), name)
    if alt != name and name in obj and alt in obj:
        raise ValueError(f"both {name!r} and {alt!r} are given")
    return obj.get(name, obj.get(alt))


# Arguments are only delimited here; parse_arguments judges them, so a bad one denies
# that call instead of failing the whole response.
_LENIENT = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FunctionCall:
    name: str
    id: str
    raw: str
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Part:
    start: int
    end: int
    call: FunctionCall | None = None
    text: bool = False              # carries visible (non-thought) text
    signature: str | None = None    # the thoughtSignature's JSON text


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    finish: str | None
    parts: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class UpstreamFault:
    """An `error` object inside a 200 response."""

    message: str
    well_formed: bool  # {"code": int, "message": str}: the SDK can raise it as it is


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    candidates: tuple[Candidate, ...] = ()
    has_candidates: bool = False
    feedback: bool = False          # promptFeedback is present
    blocked: bool = False           # the prompt was blocked: no candidate will come
    usage: Usage | None = None
    error: UpstreamFault | None = None

    @property
    def calls(self) -> Iterator[tuple[Candidate, FunctionCall]]:
        for cand in self.candidates:
            for part in cand.parts:
                if part.call is not None:
                    yield cand, part.call


class _Reader:
    """Walks the levels of a response that hold calls; skips everything else whole."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def peek(self) -> str:
        m = _WS.match(self.s, self.i)
        assert m is not None
        self.i = m.end()
        return self.s[self.i:self.i + 1]

    def value(self, decoder: json.JSONDecoder = STRICT) -> object:
        self.peek()
        value, self.i = decoder.raw_decode(self.s, self.i)
        return value

    def null(self) -> bool:
        """Consume a `null` (proto3 JSON: not set) if that is what comes next."""
        if self.peek() == "n":
            if self.value() is not None:
                raise ValueError("expected null")
            return True
        return False

    def members(self, what: str) -> Iterator[str]:
        """Yield each key (lowerCamelCase); the caller consumes its value before the next."""
        if self.peek() != "{":
            raise ValueError(f"{what} is not an object")
        self.i += 1
        if self.peek() == "}":
            self.i += 1
            return
        seen: set[str] = set()
        while True:
            if self.peek() != '"':
                raise ValueError(f"{what} is not valid JSON")
            key, self.i = _scanstring(self.s, self.i + 1, True)
            name = camel(key)
            if name in seen:
                raise ValueError(f"{what} has a duplicate key {key!r}")
            seen.add(name)
            if self.peek() != ":":
                raise ValueError(f"{what} is not valid JSON")
            self.i += 1
            yield name
            c = self.peek()
            self.i += 1
            if c == "}":
                return
            if c != ",":
                raise ValueError(f"{what} is not valid JSON")

    def items(self, what: str) -> Iterator[int]:
        if self.peek() != "[":
            raise ValueError(f"{what} is not an array")
        self.i += 1
        if self.peek() == "]":
            self.i += 1
            return
        n = 0
        while True:
            yield n
            n += 1
            c = self.peek()
            self.i += 1
            if c == "]":
                return
            if c != ",":
                raise ValueError(f"{what} is not valid JSON")


def read_chunk(text: str) -> Chunk:
    """One GenerateContentResponse. Raises ValueError (or RecursionError) if unreadable."""
    r = _Reader(text)
    candidates: tuple[Candidate, ...] = ()
    has_candidates = feedback = blocked = False
    usage: Usage | None = None
    error: UpstreamFault | None = None
    for key in r.members("the response"):
        if key == "candidates":
            if not r.null():
                has_candidates = True
                candidates = tuple(_candidate(r, pos) for pos in r.items("'candidates'"))
        elif key == "usageMetadata":
            usage = _usage(r.value())
        elif key == "promptFeedback":
            value = r.value()
            feedback = value is not None
            blocked = isinstance(value, dict) and bool(field_of(value, "blockReason"))
        elif key == "error":
            error = _fault(r.value())
        else:
            r.value()
    if r.peek():
        raise ValueError("the response has data after its end")
    indexes = [c.index for c in candidates]
    if len(set(indexes)) != len(indexes):
        raise ValueError("two candidates have the same index")
    return Chunk(text, candidates, has_candidates, feedback, blocked, usage, error)


def _candidate(r: _Reader, pos: int) -> Candidate:
    where = f"candidates[{pos}]"
    index, finish = pos, None
    parts: tuple[Part, ...] = ()
    for key in r.members(where):
        if key == "content":
            parts = _content(r, where)
        elif key == "finishReason":
            value = r.value()
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}.finishReason is not a string")
            finish = value
        elif key == "index":
            value = r.value()
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}.index is not a valid index")
            index = value
        else:
            r.value()
    return Candidate(index, finish, parts)


def _content(r: _Reader, where: str) -> tuple[Part, ...]:
    parts: tuple[Part, ...] = ()
    if r.null():
        return parts
    for key in r.members(f"{where}.content"):
        if key == "parts" and not r.null():
            parts = tuple(_part(r, f"{where}.content.parts[{j}]")
                          for j in r.items(f"{where}.content.parts"))
        elif key != "parts":
            r.value()
    return parts


def _part(r: _Reader, where: str) -> Part:
    r.peek()
    start = r.i
    call: FunctionCall | None = None
    text: object = None
    thought = False
    signature: str | None = None
    for key in r.members(where):
        if key == "functionCall":
            call = _function_call(r, where)
        elif key == "text":
            text = r.value()
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}.text is not a string")
        elif key == "thought":
            thought = r.value() is True
        elif key == "thoughtSignature":
            r.peek()
            begin = r.i
            if not isinstance(r.value(), str | None):
                raise ValueError(f"{where}.thoughtSignature is not a string")
            signature = r.s[begin:r.i]
        else:
            r.value()
    return Part(start, r.i, call, bool(text) and not thought, signature)


def _function_call(r: _Reader, where: str) -> FunctionCall | None:
    if r.null():
        return None
    name: object = None
    call_id: object = None
    raw = ""
    problem = None
    for key in r.members(f"{where}.functionCall"):
        if key == "args":
            r.peek()
            begin = r.i
            r.value(_LENIENT)
            raw = r.s[begin:r.i]
        elif key == "name":
            name = r.value()
        elif key == "id":
            call_id = r.value()
        elif key in ("partialArgs", "willContinue"):
            if r.value() not in (None, False, []):
                problem = ("the function call arrives in pieces (partialArgs / willContinue); "
                           "tether decides whole calls only")
        else:
            r.value()
    if not isinstance(name, str):
        raise ValueError(f"{where}.functionCall has no name")
    if call_id is not None and not isinstance(call_id, str):
        raise ValueError(f"{where}.functionCall.id is not a string")
    return FunctionCall(name, call_id or "", raw, problem)


def _count(obj: Mapping[str, object], name: str) -> int:
    value = field_of(obj, name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    return Usage(
        input_tokens=_count(value, "promptTokenCount") + _count(value, "toolUsePromptTokenCount"),
        output_tokens=_count(value, "candidatesTokenCount") + _count(value, "thoughtsTokenCount"),
    )


def _fault(value: object) -> UpstreamFault:
    if not isinstance(value, dict):
        return UpstreamFault(str(value)[:500], False)
    message, code = value.get("message"), value.get("code")
    ok = isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str)
    return UpstreamFault(message if isinstance(message, str) else str(value)[:500], ok)
