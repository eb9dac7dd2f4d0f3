"""The Messages wire format as both a whole answer (anthropic.py) and a stream
(anthropic_stream.py) carry it: tool_use calls, the stop reasons that cut one off,
usage, errors, and one stream event read strictly.

Both paths must read a call, a cut-off and usage the same way, or an answer would
be judged differently streamed than whole; so these live once, here.
"""

from __future__ import annotations

import json

from ..errors import ProtocolError
from ..model import ToolCall, Usage
from ..surrogates import json_text
from .arguments import parse_arguments
from .sse import SSEEvent, encode

type JSONObject = dict[str, object]

# Stop reasons that end an answer wherever the model was, mid tool call included.
CUT_REASONS = frozenset({"max_tokens", "model_context_window_exceeded", "refusal"})
GOVERNED_BLOCK = "tool_use"
# The error types Anthropic uses per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
USAGE_INPUT = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, kind: str) -> bytes:
    return json_text({"type": "error", "error": {"type": kind, "message": message}}).encode()


def error_event(message: str, kind: str) -> bytes:
    return encode(SSEEvent(error_body(message, kind).decode(), event="error"))


def cut_problem(reason: str) -> str:
    return f"the response was cut off (stop_reason {reason}) in the middle of a tool call"


def tool_call(*, id: str, name: str, raw: str, index: int, problem: str | None = None
              ) -> ToolCall:
    arguments, why = parse_arguments(raw)
    problem = problem or why
    return ToolCall(id=id, name=name, raw_arguments=raw,
                    arguments=None if problem else arguments, index=index, problem=problem)


def usage_of(fields: dict[str, int], usage: object) -> None:
    """Fold one usage object into `fields`. Counts are cumulative totals, so a later
    value replaces an earlier one; a field left out keeps its earlier value."""
    if isinstance(usage, dict):
        for key in (*USAGE_INPUT, "output_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                fields[key] = value


def usage_total(fields: dict[str, int]) -> Usage | None:
    """Cached input tokens count as input: a budget is about everything the model read."""
    if not fields:
        return None
    return Usage(input_tokens=sum(fields.get(k, 0) for k in USAGE_INPUT),
                 output_tokens=fields.get("output_tokens", 0))


def _strict_pairs(pairs: list[tuple[str, object]]) -> JSONObject:
    out: JSONObject = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"upstream stream event holds a duplicate key {key!r}")
        out[key] = value
    return out


def read_event(event: SSEEvent) -> tuple[str, JSONObject]:
    """The event's type. The SDKs dispatch on the SSE event name and parse the data,
    so the two must agree; an event without a name is refused, not guessed at. An
    `error` event is passed on whatever its data: the SDKs raise on the name alone."""
    if event.event == "error":
        return "error", {}
    try:
        obj = json.loads(event.data, object_pairs_hook=_strict_pairs)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("upstream stream event is not valid JSON") from e
    if not isinstance(obj, dict):
        raise ProtocolError("upstream stream event is not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str) or event.event != kind:
        raise ProtocolError(f"upstream stream event {event.event!r} carries data of type "
                            f"{kind!r}")
    return kind, obj


def block_index(obj: JSONObject) -> int:
    index = obj.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ProtocolError(f"upstream {obj.get('type')} has no valid index")
    return index


def stop_reason(obj: JSONObject) -> str | None:
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        raise ProtocolError("upstream message_delta has no delta object")
    reason = delta.get("stop_reason")
    if reason is not None and not isinstance(reason, str):
        raise ProtocolError("upstream stop_reason is not a string")
    return reason
