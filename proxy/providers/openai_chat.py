"""OpenAI Chat Completions: requests, responses and streams (sans-IO).

Tool calls appear as `choices[i].message.tool_calls` (and the legacy
`function_call`), or in a stream as `choices[i].delta.tool_calls` fragments keyed
by `index`. A streamed call is complete when a delta for another index, the
choice's `finish_reason`, or `[DONE]` arrives; until then its fragments are
held back while everything else passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BadRequest, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from . import tool_scope
from .base import ErrorReply, ParsedRequest, ParsedResponse, Restricted, Route, denial_text
from .held import DEFAULT_MAX_ARGUMENTS
from .openai_chat_stream import ChatStream
from .openai_chat_wire import (
    CUT_REASONS,
    JSONObject,
    denied_error,
    tool_call,
    usage_of,
)
from .openai_chat_wire import loads_object as _loads_object

NAME = "openai"


def parse_request(body: bytes, default_model: str = "") -> ParsedRequest:
    obj = _loads_object(body, "request body")
    model = obj.get("model", default_model)
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    stream = obj.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    names: list[str] = []
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be an array")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"tools[{i}] must be an object")
            fn = tool.get("function")
            name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
            if isinstance(name, str):
                names.append(name)
    functions = obj.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise BadRequest("'functions' must be an array")
        for fn in functions:
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(str(fn["name"]))
    options = obj.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    user = obj.get("user")
    max_out = obj.get("max_completion_tokens", obj.get("max_tokens"))
    if max_out is not None and (not isinstance(max_out, int) or isinstance(max_out, bool)
                                or max_out < 0):
        raise BadRequest("'max_completion_tokens' / 'max_tokens' must be a whole number")
    return ParsedRequest(
        model=model,
        stream=bool(stream),
        declared_tools=tuple(names),
        user=user if isinstance(user, str) and user else None,
        include_usage=include_usage,
        max_output_tokens=max_out,
        fingerprint=_fingerprint(obj.get("messages")),
    )


def _fingerprint(messages: object) -> str | None:
    """System/developer messages and the first user message, canonically."""
    if not isinstance(messages, list):
        return None
    parts: list[object] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        if m.get("role") in ("system", "developer"):
            parts.append(m.get("content"))
        elif m.get("role") == "user":
            parts.append(m.get("content"))
            break
    if not parts:
        return None
    return json_text(parts, sort_keys=True)


def with_usage(body: bytes) -> bytes:
    """The request with `stream_options.include_usage` on, so a stream reports its usage.
    `body` is a JSON object (parse_request read it). Without any `stream_options` in it,
    the member is put first, the rest of the bytes as the agent sent them (no second
    parse, nothing re-serialised); else the object is rewritten."""
    if b'"stream_options"' not in body and b"\\" not in body:
        start = len(body) - len(body.lstrip())
        if body[start:start + 1] == b"{":
            rest = body[start + 1:]
            comma = b"" if rest.lstrip().startswith(b"}") else b","
            return b'{"stream_options":{"include_usage":true}' + comma + rest
    obj = json.loads(body)
    options = obj.get("stream_options")
    obj["stream_options"] = {**(options if isinstance(options, dict) else {}),
                             "include_usage": True}
    return json_text(obj).encode()


@dataclass(frozen=True, slots=True)
class ChatResponse:
    body: bytes
    obj: JSONObject
    calls: tuple[ToolCall, ...]
    usage: Usage | None


def parse_response(body: bytes) -> ChatResponse:
    try:
        obj = _loads_object(body, "upstream response")
    except BadRequest as e:
        raise UpstreamError(e.message) from e
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise UpstreamError("upstream response has no 'choices' array")
    calls: list[ToolCall] = []
    for pos, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise UpstreamError(f"upstream response choices[{pos}] has no message")
        ci = choice.get("index", pos)
        ci = ci if isinstance(ci, int) else pos
        message = choice["message"]
        assert isinstance(message, dict)
        cut = choice.get("finish_reason") in CUT_REASONS
        problem = "the response was cut off in the middle of a tool call" if cut else None
        tool_calls = message.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise UpstreamError("upstream 'tool_calls' is not an array")
        for i, tc in enumerate(tool_calls):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(tc, dict) or not isinstance(fn, dict):
                raise UpstreamError(f"upstream tool_calls[{i}] has no function")
            name, raw = fn.get("name"), fn.get("arguments", "")
            if not isinstance(name, str) or not isinstance(raw, str):
                raise UpstreamError(f"upstream tool_calls[{i}] has no name or arguments text")
            call_id = tc.get("id")
            calls.append(
                tool_call(
                    id=call_id if isinstance(call_id, str) else "",
                    name=name,
                    raw=raw,
                    index=i,
                    choice=ci,
                    problem=problem,
                )
            )
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            name, raw = legacy.get("name"), legacy.get("arguments", "")
            if not isinstance(name, str) or not isinstance(raw, str):
                raise UpstreamError("upstream function_call has no name or arguments text")
            calls.append(
                tool_call(id="", name=name, raw=raw, index=-1, choice=ci, problem=problem)
            )
    return ChatResponse(body, obj, tuple(calls), usage_of(obj.get("usage")))


def render_response(response: ChatResponse, decisions: Sequence[Decision]) -> bytes:
    """The response with denied calls replaced by text; the original bytes if none is."""
    if all(d.allowed for d in decisions):
        return response.body
    verdicts = {(c.choice, c.index): (c, d) for c, d in zip(response.calls, decisions, strict=True)}
    obj = json.loads(response.body)
    for pos, choice in enumerate(obj["choices"]):
        ci = choice.get("index", pos)
        ci = ci if isinstance(ci, int) else pos
        message = choice["message"]
        texts: list[str] = []
        kept: list[object] = []
        for i, tc in enumerate(message.get("tool_calls") or []):
            call, decision = verdicts[(ci, i)]
            if decision.allowed:
                kept.append(tc)
            else:
                texts.append(denial_text(call, decision))
        legacy_kept = False
        if isinstance(message.get("function_call"), dict):
            call, decision = verdicts[(ci, -1)]
            if decision.allowed:
                legacy_kept = True
            else:
                texts.append(denial_text(call, decision))
                del message["function_call"]
        if not texts:
            continue
        if "tool_calls" in message:
            if kept:
                message["tool_calls"] = kept
            else:
                del message["tool_calls"]
        content = message.get("content")
        prefix = f"{content}\n\n" if isinstance(content, str) and content else ""
        message["content"] = prefix + "\n".join(texts)
        if not kept and not legacy_kept and choice.get("finish_reason") in (
            "tool_calls",
            "function_call",
        ):
            choice["finish_reason"] = "stop"
    return json_text(obj).encode("utf-8")


class OpenAIChat:
    """The Chat Completions wire format, as OpenAI and Azure OpenAI serve it."""

    name = "openai.chat"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.chat(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body, route.model or "")

    def parse_response(self, body: bytes) -> ChatResponse:
        return parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, ChatResponse)
        return render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> ChatStream:

        return ChatStream(max_arguments=max_arguments)

    def stream_with_usage(self, body: bytes, request: ParsedRequest, *,
                          max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> tuple[bytes, ChatStream]:
        """For budgets: a stream must report its usage. If the client did not ask for it,
        ask upstream anyway and hide the extra usage chunk from the client."""

        if request.include_usage:
            return body, ChatStream(max_arguments=max_arguments)
        return with_usage(body), ChatStream(strip_usage=True, max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return denied_error(calls, decisions)


CHAT = OpenAIChat()
