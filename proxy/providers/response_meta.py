"""What a whole LLM answer says about itself, for its trace: the response id, the model
that answered and why each choice stopped (`gen_ai.response.*`).

Read from the upstream's JSON body, per wire format, and only while a span records
it (the body is parsed a second time). Tolerant: a field that is missing or not text
is left out, never raised on; the format's own parser has already judged the body.
Streamed answers are not read here (see docs/hardening.md, "Traces").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TEXT = 256  # an id or model name longer than this is cut: it goes on every span


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    id: str | None = None
    model: str | None = None
    finish_reasons: tuple[str, ...] = ()


def _text(value: object) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) and value else None


def _reasons(items: object, key: str) -> tuple[str, ...]:
    if not isinstance(items, list):
        return ()
    found = (_text(i.get(key)) if isinstance(i, dict) else None for i in items[:64])
    return tuple(r for r in found if r)


def _one(obj: Mapping[str, object], key: str) -> tuple[str, ...]:
    reason = _text(obj.get(key))
    return (reason,) if reason else ()


def read_meta(fmt: str, body: bytes) -> ResponseMeta:
    """`fmt`: the wire format's name (`openai.chat`, `anthropic.messages` ...)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return ResponseMeta()
    if not isinstance(obj, dict):
        return ResponseMeta()
    if fmt == "openai.chat":
        return ResponseMeta(_text(obj.get("id")), _text(obj.get("model")),
                            _reasons(obj.get("choices"), "finish_reason"))
    if fmt == "openai.responses":  # no finish reason: `status` says whether it completed
        return ResponseMeta(_text(obj.get("id")), _text(obj.get("model")))
    if fmt in ("anthropic.messages", "bedrock.invoke"):
        return ResponseMeta(_text(obj.get("id")), _text(obj.get("model")),
                            _one(obj, "stop_reason"))
    if fmt == "bedrock.converse":  # the model is in the path; Converse names no response
        return ResponseMeta(finish_reasons=_one(obj, "stopReason"))
    if fmt == "gemini.generate":
        return ResponseMeta(_text(obj.get("responseId")), _text(obj.get("modelVersion")),
                            _reasons(obj.get("candidates"), "finishReason"))
    return ResponseMeta()
