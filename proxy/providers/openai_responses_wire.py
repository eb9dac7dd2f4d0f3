"""The Responses wire format as both a whole response (openai_responses.py) and a
stream (openai_responses_stream.py and its helpers) carry it: which output items
are calls, the neutral call of one item, the message that replaces a denied one,
usage, and the `error` event.

Both paths must read a call the same way, or an answer would be judged differently
streamed than whole; so these live once, here.
"""

from __future__ import annotations

from ..errors import UpstreamError
from ..model import ToolCall, Usage
from ..surrogates import json_text
from .arguments import parse_arguments

type JSONObject = dict[str, object]

FUNCTION = "function_call"
CUSTOM = "custom_tool_call"
# Calls that OpenAI runs itself: reported in the output after the fact.
SERVER_CALLS = frozenset({"web_search_call", "file_search_call", "code_interpreter_call",
                          "image_generation_call", "mcp_call", "tool_search_call"})
# Text fields of the governed items, and the stream events that carry them in pieces.
TEXT_FIELD = {FUNCTION: "arguments", CUSTOM: "input"}
DELTA_EVENTS = {"response.function_call_arguments.delta": FUNCTION,
                "response.custom_tool_call_input.delta": CUSTOM}
DONE_EVENTS = {"response.function_call_arguments.done": FUNCTION,
               "response.custom_tool_call_input.done": CUSTOM}


def is_call(item_type: object) -> bool:
    """True for every item the agent would execute; such items are held and decided."""
    if not isinstance(item_type, str):
        return False
    return item_type in TEXT_FIELD or (item_type.endswith("_call") and item_type not in SERVER_CALLS)


def _text(item: JSONObject, field: str, what: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise UpstreamError(f"{what} has no {field!r} text")
    return value


def item_call(item: JSONObject, index: int, problem: str | None = None,
              text: str | None = None) -> ToolCall:
    """The neutral call for one output item; `text` overrides its argument text
    (a streamed call cut before its item was complete)."""
    kind = item.get("type")
    what = f"upstream {kind} item {index}"
    call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else item.get("id")
    cid = call_id if isinstance(call_id, str) else ""
    if kind not in TEXT_FIELD:
        raw = json_text(item)
        return ToolCall(id=cid, name=str(kind), raw_arguments=raw, arguments=None, index=index,
                        problem=problem or f"tether cannot govern {kind!r} items yet, so the "
                                           "call was not released")
    name = _text(item, "name", what)
    raw = text if text is not None else _text(item, TEXT_FIELD[str(kind)], what)
    if kind == CUSTOM:
        return ToolCall(id=cid, name=name, raw_arguments=raw, arguments=None if problem else {"input": raw},
                        index=index, problem=problem)
    arguments, why = parse_arguments(raw)
    problem = problem or why
    return ToolCall(id=cid, name=name, raw_arguments=raw, arguments=None if problem else arguments,
                    index=index, problem=problem)


def check_call_item(item: JSONObject, what: str) -> None:
    """A governed item must name its tool and call id, or it cannot be decided."""
    kind = item.get("type")
    if kind in TEXT_FIELD:
        _text(item, "name", what)
        _text(item, "call_id", what)


def replacement_id(item: JSONObject) -> str:
    """A stable id for the message that replaces a denied item (the same in a stream
    and in the whole response, so the SDK's snapshot and final response agree)."""
    base = item.get("id") or item.get("call_id") or "call"
    return f"msg_tether_{base}"


def output_text(text: str) -> JSONObject:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def replacement(item: JSONObject, text: str) -> JSONObject:
    """The assistant message that takes a denied call's place in `output`."""
    return {"id": replacement_id(item), "type": "message", "status": "completed",
            "role": "assistant", "content": [output_text(text)]}


def usage_of(response: object) -> Usage | None:
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    return Usage(input_tokens=tokens_in if isinstance(tokens_in, int) else 0,
                 output_tokens=tokens_out if isinstance(tokens_out, int) else 0)


def error_event(message: str, *, kind: str, code: str, sequence: int) -> JSONObject:
    """A Responses `error` event. The documented fields are at the top level; the same
    error is also nested under `error`, the shape the API sends in practice and the
    one the openai SDK raises `APIError` on."""
    return {"type": "error", "code": code, "message": message, "param": None,
            "sequence_number": sequence,
            "error": {"type": kind, "code": code, "message": message, "param": None}}
