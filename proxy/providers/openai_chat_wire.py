"""What the Chat Completions request, answer and stream modules share: the JSON object
type, reading a body, usage, a call from its parts, errors in OpenAI's shape (sans-IO).
Below both openai_chat and openai_chat_stream, so neither imports the other back."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..errors import BadRequest
from ..model import Decision, ToolCall, Usage
from ..strict_json import PAIRS, text_of
from .arguments import parse_arguments
from .base import ErrorReply, denial_summary

type JSONObject = dict[str, object]

CUT_REASONS = {"length", "content_filter"}


def loads_object(body: bytes, what: str) -> JSONObject:
    try:
        value = PAIRS.decode(text_of(body))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def usage_of(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    prompt, completion = obj.get("prompt_tokens"), obj.get("completion_tokens")
    return Usage(
        input_tokens=prompt if isinstance(prompt, int) else 0,
        output_tokens=completion if isinstance(completion, int) else 0,
    )


def tool_call(
    *,
    id: str,
    name: str,
    raw: str,
    index: int,
    choice: int,
    problem: str | None = None,
) -> ToolCall:
    arguments, why = parse_arguments(raw)
    problem = problem or why
    return ToolCall(
        id=id,
        name=name,
        raw_arguments=raw,
        arguments=None if problem else arguments,
        index=index,
        choice=choice,
        problem=problem,
    )


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
               501: "not_implemented_error", 502: "upstream_error", 504: "upstream_error"}


def error_body(message: str, *, kind: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()


def error_reply(status: int, message: str, code: str) -> ErrorReply:
    """An error in OpenAI's shape (also Azure OpenAI's)."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorReply(status, error_body(message, kind=kind, code=code))


def denied_error(calls: Sequence[ToolCall], decisions: Sequence[Decision]) -> ErrorReply:
    return error_reply(403, denial_summary(calls, decisions), "tool_call_denied")
