"""The Responses stream's events: which end a response, which belong only to a call
item, and one event read strictly before the filter acts on it.

A client may dispatch on the SSE event name or on the data's `type`; an event whose
two disagree could be read two ways, so it is refused here, as is a `[DONE]` (this
API ends a stream with a `response.*` event, so one means the answer was cut
short) and data with a duplicate key.
"""

from __future__ import annotations

from ..errors import ProtocolError
from ..strict_json import PAIRS, text_of
from .openai_responses_wire import JSONObject
from .sse import SSEEvent

TERMINAL = {
    "response.completed": "the response completed without finishing the tool call",
    "response.incomplete": "the response ended incomplete in the middle of the tool call",
    "response.failed": "the response failed in the middle of the tool call",
}
LIFECYCLE = frozenset(TERMINAL) | {"response.created", "response.queued", "response.in_progress"}
# Events that only ever belong to a call item: outside a held item they are refused.
CALL_EVENTS = ("response.function_call_arguments.", "response.custom_tool_call_input.",
               "response.shell_call_command.")


def output_index(obj: JSONObject) -> int | None:
    value = obj.get("output_index")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("stream event has no valid output_index")
    return value


def read_event(event: SSEEvent) -> JSONObject:
    """The event's data, which must name the same type as the SSE event."""
    if event.data.strip() == "[DONE]":
        raise ProtocolError("the upstream stream sent [DONE] before the response was complete")
    try:
        obj = PAIRS.decode(text_of(event.data))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"upstream stream event is not valid JSON: {e}") from e
    if isinstance(obj, dict) and "type" not in obj and isinstance(obj.get("error"), dict):
        obj = {"type": "error", **obj}  # a Chat Completions-style error mid-stream
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("upstream stream event is not a JSON object with a 'type'")
    if event.event is not None and event.event != obj["type"]:
        raise ProtocolError(f"stream event named {event.event!r} carries a {obj['type']!r} event")
    return obj


def upstream_error(obj: JSONObject) -> tuple[JSONObject, str]:
    """The upstream's error with its fields both at the top level (as documented) and
    nested under `error` (as sent in practice), so every SDK raises on it; and its
    message."""
    nested = obj.get("error") if isinstance(obj.get("error"), dict) else {}
    assert isinstance(nested, dict)
    message = str(obj.get("message") or nested.get("message") or "the upstream stream failed")
    code = obj.get("code") or nested.get("code")
    param = obj.get("param", nested.get("param"))
    full = {**obj, "message": message, "code": code, "param": param,
            "error": {"type": "upstream_error", **nested, "message": message, "code": code,
                      "param": param}}
    return full, message
