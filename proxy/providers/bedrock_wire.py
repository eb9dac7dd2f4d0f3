"""The Converse wire format as both a whole answer (bedrock.py) and a stream
(bedrock_stream.py) carry it: toolUse calls, the stop reasons that cut one off,
usage, and JSON objects read with their duplicate keys marked.

Both paths must read a call, a cut-off and usage the same way, or an answer would
be judged differently streamed than whole; so these live once, here.
"""

from __future__ import annotations

import json

from ..model import ToolCall, Usage
from .arguments import parse_arguments
from .base import ErrorReply

type JSONObject = dict[str, object]

TOOL_USE, END_TURN = "tool_use", "end_turn"
# Stop reasons that mean the answer was cut short: a tool call that ends the
# answer may be cut with it, so it is denied even if its input happens to parse.
CUT_REASONS = frozenset({"max_tokens", "model_context_window_exceeded", "content_filtered",
                         "guardrail_intervened", "malformed_tool_use", "malformed_model_output"})


def cut_problem(reason: str) -> str:
    return f"the response was cut off (stopReason {reason}) at the end of a tool call"


class Duplicated(dict[str, object]):
    """A JSON object that held a key twice (the last value is kept).

    Parsers disagree on which duplicate wins, so an object marked so is never
    trusted: a tool input holding one is denied, anywhere else it is refused.
    """


def _pairs(pairs: list[tuple[str, object]]) -> JSONObject:
    out: JSONObject = {}
    duplicated = False
    for key, value in pairs:
        duplicated = duplicated or key in out
        out[key] = value
    return Duplicated(out) if duplicated else out


def has_duplicate(value: object, skip: frozenset[int] = frozenset()) -> bool:
    """Whether a parsed value holds a `Duplicated` object (iteratively: JSON may nest deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in skip:
            continue
        if isinstance(item, Duplicated):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def load_object(body: bytes | str, what: str) -> JSONObject:
    """One JSON object, duplicates marked (see `Duplicated`); ValueError if it is not."""
    try:
        value = json.loads(body, object_pairs_hook=_pairs)
    except RecursionError as e:
        raise ValueError(f"{what} is nested too deeply") from e
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def usage_of(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    def count(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return Usage(input_tokens=count(obj.get("inputTokens")),
                 output_tokens=count(obj.get("outputTokens")))


def tool_call(*, id: str, name: str, raw: str, index: int, problem: str | None = None) -> ToolCall:
    arguments, why = parse_arguments(raw)
    problem = problem or why
    return ToolCall(id=id, name=name, raw_arguments=raw, arguments=None if problem else arguments,
                    index=index, problem=problem)


# 401 (tether's own authentication failed): AWS's code for credentials it does not
# recognise. botocore does not model it for bedrock-runtime, so it is a ClientError
# with that code, never mistaken for AccessDeniedException (a policy denial, 403).
ERROR_TYPES = {400: "ValidationException", 401: "UnrecognizedClientException",
               403: "AccessDeniedException",
               404: "ResourceNotFoundException", 408: "ModelTimeoutException",
               413: "ValidationException", 429: "ThrottlingException",
               503: "ServiceUnavailableException"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "InternalServerException" if status >= 500
                           else "ValidationException")


def error_reply(status: int, message: str, code: str = "") -> ErrorReply:
    """An error as Bedrock sends one; `code` (tether's own) travels in `x-tether-error`."""
    return ErrorReply(status, json.dumps({"message": message}).encode(),
                      headers={"x-amzn-ErrorType": error_type(status)})
