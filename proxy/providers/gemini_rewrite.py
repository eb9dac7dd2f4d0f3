"""Gemini responses after the decision: calls out, rewritten chunks and errors back.

Everything tether writes in Gemini's shape lives here, fed by what gemini_read.py
read: `tool_call` turns a read function call into the neutral ToolCall (a call
whose candidate did not finish with STOP is not trusted), `rewrite` splices a
text part over each denied call's part so that allowed calls keep their bytes,
and `error_body` renders Google's error object. Both the whole-response codec
(gemini.py) and the stream filter (gemini_stream.py) use these, so a denial
reads the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..model import Decision, ToolCall
from ..surrogates import json_text
from .arguments import parse_arguments
from .base import denial_text
from .gemini_read import Candidate, Chunk, FunctionCall

# The finishReason under which a function call is complete; Gemini uses it for calls too.
CLEAN_FINISH = "STOP"

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
          404: "NOT_FOUND", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
          499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
          503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(status: int, message: str, code: str) -> str:
    """An error in Google's shape; tether's own code is the ErrorInfo reason."""
    return json_text({"error": {
        "code": status,
        "message": message,
        "status": STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"),
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": code.upper(), "domain": "tether"}],
    }})


def finish_problem(finish: str | None) -> str | None:
    if finish is None or finish == CLEAN_FINISH:
        return None
    return f"the candidate finished with finishReason {finish}, so its function call is not trusted"


def tool_call(cand: Candidate, call: FunctionCall, index: int, problem: str | None) -> ToolCall:
    arguments, why = parse_arguments(call.raw)
    problem = call.problem or problem or why
    return ToolCall(id=call.id, name=call.name, raw_arguments=call.raw,
                    arguments=None if problem else arguments, index=index,
                    choice=cand.index, problem=problem)


# --- rewriting --------------------------------------------------------------------------


def rewrite(chunks: Sequence[Chunk], decided: Sequence[tuple[ToolCall, Decision]],
            text_seen: dict[int, bool]) -> list[str]:
    """The chunks' texts with each denied call's part replaced by a text part.

    `decided` follows the calls in order. Allowed parts keep their bytes. A thought
    signature on a denied part moves to the next allowed call of its candidate that
    has none (Gemini 3 rejects a turn whose first call lacks one), else it stays on
    the replacement text. `text_seen` (candidate -> has visible text) is updated.
    """
    verdicts = iter(decided)
    plan: dict[tuple[int, int], tuple[ToolCall, Decision]] = {}
    carry: dict[int, tuple[int, int, str]] = {}   # candidate -> (chunk, part start, signature)
    moved: dict[tuple[int, int], str] = {}        # allowed part -> signature it receives
    dropped: set[tuple[int, int]] = set()         # denied parts whose signature moved
    for n, chunk in enumerate(chunks):
        for cand in chunk.candidates:
            for part in cand.parts:
                if part.call is None:
                    continue
                call, decision = next(verdicts)
                plan[(n, part.start)] = (call, decision)
                if not decision.allowed:
                    if part.signature is not None and cand.index not in carry:
                        carry[cand.index] = (n, part.start, part.signature)
                elif cand.index in carry and part.signature is None:
                    src_n, src_start, sig = carry.pop(cand.index)
                    moved[(n, part.start)] = sig
                    dropped.add((src_n, src_start))
    if next(verdicts, None) is not None:
        raise ValueError("more decisions than calls")
    out: list[str] = []
    for n, chunk in enumerate(chunks):
        edits: list[tuple[int, int, str]] = []
        for cand in chunk.candidates:
            for part in cand.parts:
                if part.call is None:
                    if part.text:
                        text_seen[cand.index] = True
                    continue
                call, decision = plan[(n, part.start)]
                if decision.allowed:
                    if (n, part.start) in moved:
                        sig = moved[(n, part.start)]
                        edits.append((part.start + 1, part.start + 1, f'"thoughtSignature": {sig}, '))
                    continue
                words = ("\n\n" if text_seen.get(cand.index) else "") + denial_text(call, decision)
                text_seen[cand.index] = True
                replacement = f'{{"text": {json_text(words)}'
                if part.signature is not None and (n, part.start) not in dropped:
                    replacement += f', "thoughtSignature": {part.signature}'
                edits.append((part.start, part.end, replacement + "}"))
        out.append(_splice(chunk.text, edits))
    return out


def _splice(text: str, edits: list[tuple[int, int, str]]) -> str:
    if not edits:
        return text
    pieces, last = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [text[last:start], replacement]
        last = end
    pieces.append(text[last:])
    return "".join(pieces)
