"""The tool results an agent sends back, by the call id they answer.

Chat Completions (`messages[].role == "tool"`, `tool_call_id`), Anthropic
(`tool_result` blocks, `tool_use_id`), OpenAI Responses (`function_call_output` and the
other `*_call_output` items, `call_id`), Bedrock Converse
(`toolResult.toolUseId`) and Gemini (`functionResponse.id`, when the agent sends one).
Each id is looked up in the session history: a result for a call tether never decided
(forged, from another session, or from before the history) is content of unknown
origin, which flow rules see as an untrusted earlier call (flows.UNSEEN_TOOL).

Pure and total: any JSON value is accepted, the walk is bounded in depth and count,
and what is not recognised is not a result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

MAX_RESULTS = 1000
MAX_ID = 200
_DEPTH = 6


def result_ids(body: bytes) -> tuple[str, ...]:
    """The call ids the request's tool results answer, in order, without repeats."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ()
    if not isinstance(doc, dict):
        return ()
    seen: dict[str, None] = {}
    for found in _walk(doc):
        if isinstance(found, str) and found:
            seen[found[:MAX_ID]] = None
            if len(seen) >= MAX_RESULTS:
                break
    return tuple(seen)


def _walk(doc: dict[str, object]) -> Iterator[object]:
    for key in ("messages", "input", "contents"):
        items = doc.get(key)
        if isinstance(items, list):
            for item in items:
                yield from _item(item, 0)


def _item(item: object, depth: int) -> Iterator[object]:
    if not isinstance(item, dict) or depth > _DEPTH:
        return
    kind = item.get("type")
    if item.get("role") == "tool":                                  # Chat Completions
        yield item.get("tool_call_id")
    if kind == "tool_result":                                       # Anthropic
        yield item.get("tool_use_id")
    if isinstance(kind, str) and kind.endswith("_call_output"):     # Responses
        yield item.get("call_id")
    for key in ("toolResult", "functionResponse"):                  # Bedrock, Gemini
        inner = item.get(key)
        if isinstance(inner, dict):
            yield inner.get("toolUseId") or inner.get("id")
    for key in ("content", "parts"):
        nested = item.get(key)
        if isinstance(nested, list):
            for sub in nested:
                yield from _item(sub, depth + 1)
