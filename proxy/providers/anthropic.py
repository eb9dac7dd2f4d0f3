"""Anthropic behind `/anthropic/`: the Messages API's routes, requests, responses, errors.

    POST v1/messages             governed: every `tool_use` block is decided
    v1/messages/batches...       BATCH routes (`batch_routes`): judged by
                                 `upstreams.anthropic.batches`, since batch results
                                 carry tool calls that tether cannot hold back
    v1/messages/count_tokens,
    v1/models ...                passed through unchanged

Like the OpenAI routes, the messages endpoint is recognised by its last
segment, so near-misses (`v1/messages/`, `v1/Messages`, `v2/messages`) are
refused instead of opening a second, ungoverned door to it.

Only `tool_use` blocks are governed; `server_tool_use` (web search, code
execution ...), `mcp_tool_use`, their results and `thinking` blocks pass,
because those tools run at Anthropic, not in the agent. Streams are filtered
in `anthropic_stream`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import BadRequest, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..strict_json import PAIRS, text_of
from ..surrogates import json_text
from . import tool_scope
from .anthropic_stream import MessagesStream
from .anthropic_wire import (
    CUT_REASONS,
    GOVERNED_BLOCK,
    cut_problem,
    error_body,
    error_type,
    tool_call,
    usage_of,
    usage_total,
)
from .base import (
    ErrorReply,
    ParsedRequest,
    ParsedResponse,
    Restricted,
    Route,
    RouteKind,
    denial_summary,
    denial_text,
)
from .batch_routes import anthropic_batches
from .held import DEFAULT_MAX_ARGUMENTS
from .provider_ran import anthropic_block

type JSONObject = dict[str, object]

MESSAGES_PATH = "v1/messages"


# --- requests ---------------------------------------------------------------------------


def request_object(body: bytes) -> JSONObject:
    try:
        obj = PAIRS.decode(text_of(body))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def parse_request(body: bytes) -> ParsedRequest:
    """Model, stream, the declared tool names (custom and server tools alike, so a
    call to anything else is undeclared) and `metadata.user_id` as the user."""
    obj = request_object(body)
    model = obj.get("model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    stream = obj.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return read_request(obj, model, bool(stream))


def read_request(obj: JSONObject, model: str, stream: bool) -> ParsedRequest:
    """The rest of a Messages body, where `model` and `stream` were read (from the body,
    or from the path, as Bedrock InvokeModel names them)."""
    names: list[str] = []
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"tools[{i}] must be an object")
            name = tool.get("name")
            if name is not None and not isinstance(name, str):
                raise BadRequest(f"tools[{i}].name must be a string")
            if name is not None:
                names.append(name)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object")
    user = metadata.get("user_id") if metadata else None
    if user is not None and not isinstance(user, str):
        raise BadRequest("'metadata.user_id' must be a string")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 0):
        raise BadRequest("'max_tokens' must be a whole number")
    return ParsedRequest(model=model, stream=stream, declared_tools=tuple(names),
                         user=user or None, max_output_tokens=max_tokens,
                         fingerprint=_fingerprint(obj.get("system"), obj.get("messages")))


def _fingerprint(system: object, messages: object) -> str | None:
    """The system prompt and the first user message: one conversation across turns."""
    first = None
    if isinstance(messages, list):
        first = next((m.get("content") for m in messages
                      if isinstance(m, dict) and m.get("role") == "user"), None)
    if system is None and first is None:
        return None
    return json_text([system, first], sort_keys=True)


# --- whole responses --------------------------------------------------------------------


class _Pairs(dict[str, object]):
    """An object that held a duplicate key: every pair is kept, so a tool's input is
    refused for it (parse_arguments), exactly as the same input in a stream is."""

    pairs: list[tuple[str, object]]


def _keep_pairs(pairs: list[tuple[str, object]]) -> JSONObject:
    if len({k for k, _ in pairs}) == len(pairs):
        return dict(pairs)
    out = _Pairs(pairs)
    out.pairs = pairs
    return out


def _dumps(value: object) -> str:
    """JSON text of a tool's input, duplicate keys included."""
    if isinstance(value, dict):
        items = value.pairs if isinstance(value, _Pairs) else list(value.items())
        return "{" + ", ".join(f"{json_text(k)}: {_dumps(v)}"
                               for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps(v) for v in value) + "]"
    return json_text(value)


def _duplicates(value: object) -> bool:
    if isinstance(value, _Pairs):
        return True
    if isinstance(value, dict):
        return any(_duplicates(v) for v in value.values())
    if isinstance(value, list):
        return any(_duplicates(v) for v in value)
    return False


@dataclass(frozen=True, slots=True)
class MessagesResponse:
    body: bytes
    calls: tuple[ToolCall, ...]
    usage: Usage | None
    ran: tuple[ToolCall, ...] = ()   # provider-run calls the answer reports (provider_ran.py)


def parse_response(body: bytes) -> MessagesResponse:
    try:
        obj = json.loads(body, object_pairs_hook=_keep_pairs)
        if not isinstance(obj, dict):
            raise UpstreamError("upstream response must be a JSON object")
        content = obj.get("content")
        if not isinstance(content, list):
            raise UpstreamError("upstream response has no 'content' array")
        stop_reason = obj.get("stop_reason")
        calls: list[ToolCall] = []
        ran: list[ToolCall] = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise UpstreamError(f"upstream content[{i}] has no type")
            if block["type"] != GOVERNED_BLOCK:
                if (done := anthropic_block(block, i)) is not None:
                    ran.append(done)
                continue
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not isinstance(name, str) \
                    or not isinstance(arguments, dict) or isinstance(block, _Pairs):
                raise UpstreamError(f"upstream tool_use content[{i}] has no id, name or input")
            # The last block of an answer cut by max_tokens is a cut-off call.
            cut = isinstance(stop_reason, str) and stop_reason in CUT_REASONS
            problem = cut_problem(str(stop_reason)) if cut and i == len(content) - 1 else None
            calls.append(tool_call(id=call_id, name=name, raw=_dumps(arguments), index=i,
                                   problem=problem))
            block["input"] = {}  # checked as a call; not part of the envelope below
        if _duplicates(obj):
            raise UpstreamError("upstream response holds a duplicate key")
    except RecursionError as e:
        raise UpstreamError("upstream response is nested too deeply") from e
    except ValueError as e:
        raise UpstreamError(f"upstream response is not valid JSON: {e}") from e
    fields: dict[str, int] = {}
    usage_of(fields, obj.get("usage"))
    return MessagesResponse(body, tuple(calls), usage_total(fields), tuple(ran))


def render_response(response: MessagesResponse, decisions: Sequence[Decision]) -> bytes:
    """Denied tool_use blocks become text blocks in place; the original bytes if none is."""
    if all(d.allowed for d in decisions):
        return response.body
    obj = json.loads(response.body)
    content = obj["content"]
    kept = 0
    for call, decision in zip(response.calls, decisions, strict=True):
        if decision.allowed:
            kept += 1
        else:
            content[call.index] = {"type": "text", "text": denial_text(call, decision)}
    if not kept and obj.get("stop_reason") == "tool_use":
        obj["stop_reason"] = "end_turn"
    return json_text(obj).encode("utf-8")


# --- errors -----------------------------------------------------------------------------


def error_reply(status: int, message: str) -> ErrorReply:
    """An error in Anthropic's shape, its `type` the one Anthropic uses for the status."""
    return ErrorReply(status, error_body(message, error_type(status)))


class AnthropicMessages:
    """The Messages wire format."""

    name = "anthropic.messages"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.anthropic(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body)

    def parse_response(self, body: bytes) -> MessagesResponse:
        return parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, MessagesResponse)
        return render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> MessagesStream:
        return MessagesStream(max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return error_reply(403, denial_summary(calls, decisions))


MESSAGES = AnthropicMessages()


class AnthropicProvider:
    path_escapes: frozenset[str] = frozenset()
    name = "anthropic"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        segments = [s for s in path.lower().split("/") if s]
        batch = anthropic_batches(self.name, method, path)
        if batch is not None:
            return batch
        if segments[-1:] == ["messages"]:
            if method != "POST" or path != MESSAGES_PATH:
                return Route(RouteKind.REFUSE, status=404, message=(
                    f"{method} /{self.name}/{path}: the messages endpoint is "
                    f"POST /{self.name}/{MESSAGES_PATH}"))
            return Route(RouteKind.GOVERNED, MESSAGES, upstream_path=path)
        return Route(RouteKind.PASS, upstream_path=path)

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message)
