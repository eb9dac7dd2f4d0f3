"""AWS Bedrock behind `/bedrock/`: the Converse API, whole and streamed (sans-IO).

    POST model/{modelId}/converse          a JSON answer; calls are `toolUse` content blocks
    POST model/{modelId}/converse-stream   the binary event stream (see bedrock_stream.py)
    POST model/{modelId}/invoke[-with-response-stream]
                                           Anthropic models only: bedrock_invoke.py

What both read the same way (calls, cut-offs, usage, duplicate keys) is in
bedrock_wire.py.

The model id is one URL-encoded path segment: ARNs carry `%3A` and `%2F`, so
`/` is the one reserved escape this provider accepts. Every other Bedrock path
(InvokeModel for another vendor's model, apply-guardrail ...) is refused with
501: those invoke bodies carry each model vendor's own tool-call format, which
tether does not read there, and tether signs what it forwards with its own AWS
credentials, so passing a path through would lend them to an ungoverned call.

Errors have Bedrock's shape: `{"message": ...}` with the exception name in
`x-amzn-ErrorType`, which is where botocore (and the other AWS SDKs) read the
error code from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

from ..errors import BadRequest, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from . import tool_scope
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
from .bedrock_invoke import INVOKE, is_anthropic
from .bedrock_invoke import OPERATIONS as INVOKE_OPERATIONS
from .bedrock_stream import ConverseStream
from .bedrock_wire import (
    CUT_REASONS,
    END_TURN,
    TOOL_USE,
    JSONObject,
    cut_problem,
    has_duplicate,
    load_object,
    tool_call,
    usage_of,
)
from .bedrock_wire import error_reply as error_reply  # re-exported: forward/ shapes errors with it
from .held import DEFAULT_MAX_ARGUMENTS

OPERATIONS = {"converse": False, "converse-stream": True}  # operation -> streamed
def parse_request(body: bytes, route: Route) -> ParsedRequest:
    try:
        obj = load_object(body, "request body")
    except ValueError as e:
        raise BadRequest(str(e)) from e
    if has_duplicate(obj):
        raise BadRequest("request body holds a duplicate key")
    names: list[str] = []
    config = obj.get("toolConfig")
    if config is not None:
        if not isinstance(config, dict):
            raise BadRequest("'toolConfig' must be an object")
        tools = config.get("tools")
        if not isinstance(tools, list):
            raise BadRequest("'toolConfig.tools' must be an array")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequest(f"toolConfig.tools[{i}] must be an object")
            for kind in ("toolSpec", "systemTool"):
                spec = tool.get(kind)
                if spec is None:
                    continue
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    raise BadRequest(f"toolConfig.tools[{i}].{kind} must be an object with a name")
                names.append(str(spec["name"]))
    return ParsedRequest(model=route.model or "", stream=bool(route.stream),
                         declared_tools=tuple(names))


@dataclass(frozen=True, slots=True)
class ConverseResponse:
    body: bytes
    obj: JSONObject
    calls: tuple[ToolCall, ...]
    usage: Usage | None


def _content(obj: JSONObject) -> list[object]:
    output = obj.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        raise UpstreamError("upstream response has no 'output.message.content' array")
    return content


def parse_response(body: bytes) -> ConverseResponse:
    try:
        obj = load_object(body, "upstream response")
    except ValueError as e:
        raise UpstreamError(str(e)) from e
    content = _content(obj)
    reason = obj.get("stopReason")
    if reason is not None and not isinstance(reason, str):
        raise UpstreamError("upstream 'stopReason' is not a string")
    calls: list[ToolCall] = []
    inputs: set[int] = set()
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise UpstreamError(f"upstream content[{i}] is not an object")
        if "toolUse" not in block:
            continue
        use = block["toolUse"]
        if not isinstance(use, dict) or not isinstance(use.get("name"), str) \
                or not isinstance(use.get("toolUseId"), str):
            raise UpstreamError(f"upstream content[{i}].toolUse has no name or toolUseId")
        problem = cut_problem(str(reason)) if reason in CUT_REASONS and i == len(content) - 1 \
            else None
        if "input" not in use:
            raw, problem = "", problem or "the toolUse block has no input"
        else:
            inputs.add(id(use["input"]))
            if has_duplicate(use["input"]):
                problem = problem or "tool-call arguments hold a duplicate key"
            try:
                raw = json_text(use["input"])
            except (ValueError, RecursionError):
                raw, problem = "", problem or "tool-call arguments cannot be read"
        calls.append(tool_call(id=str(use["toolUseId"]), name=str(use["name"]), raw=raw,
                               index=i, problem=problem))
    if has_duplicate(obj, frozenset(inputs)):
        raise UpstreamError("upstream response holds a duplicate key")
    return ConverseResponse(body, obj, tuple(calls), usage_of(obj.get("usage")))


def render_response(response: ConverseResponse, decisions: Sequence[Decision]) -> bytes:
    """Denied toolUse blocks become text blocks in place; the upstream bytes if none is denied."""
    if all(d.allowed for d in decisions):
        return response.body
    obj = response.obj
    content = _content(obj)
    for call, decision in zip(response.calls, decisions, strict=True):
        if not decision.allowed:
            content[call.index] = {"text": denial_text(call, decision)}
    left = any(isinstance(b, dict) and "toolUse" in b for b in content)
    if not left and obj.get("stopReason") == TOOL_USE:
        obj["stopReason"] = END_TURN
    return json_text(obj).encode("utf-8")


def denied_error(calls: Sequence[ToolCall], decisions: Sequence[Decision]) -> ErrorReply:
    return error_reply(403, denial_summary(calls, decisions), "tool_call_denied")


class BedrockConverse:
    """The Converse wire format (Bedrock's model-neutral chat API)."""

    name = "bedrock.converse"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.bedrock(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body, route)

    def parse_response(self, body: bytes) -> ConverseResponse:
        return parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, ConverseResponse)
        return render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> ConverseStream:
        return ConverseStream(max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return denied_error(calls, decisions)


CONVERSE = BedrockConverse()


class BedrockProvider:
    path_escapes: frozenset[str] = frozenset({"/"})
    name = "bedrock"

    def route(self, method: str, path: str, query: Mapping[str, str]) -> Route:
        segments = path.split("/")
        if len(segments) == 3 and segments[0] == "model" and segments[1] \
                and segments[2] in OPERATIONS.keys() | INVOKE_OPERATIONS.keys() \
                and method == "POST":
            try:
                model = unquote_to_bytes(segments[1]).decode("utf-8")
            except UnicodeDecodeError:
                return Route(RouteKind.REFUSE, status=400,
                             message="the model id in the path is not valid UTF-8")
            if segments[2] in OPERATIONS:
                return Route(RouteKind.GOVERNED, CONVERSE, upstream_path=path, model=model,
                             stream=OPERATIONS[segments[2]])
            if is_anthropic(model):
                return Route(RouteKind.GOVERNED, INVOKE, upstream_path=path, model=model,
                             stream=INVOKE_OPERATIONS[segments[2]])
            return Route(RouteKind.REFUSE, status=501, message=(
                f"/{self.name}/{path} is not governed: tether reads InvokeModel bodies only "
                "for Anthropic models (anthropic.*); other vendors' bodies carry their own "
                "tool-call format, so use converse or converse-stream for them"))
        # Judged decoded too: `model/ID%2Fconverse` is a near-miss, not another operation.
        if any(s.lower() in OPERATIONS or s.lower() in INVOKE_OPERATIONS
               for s in unquote(path).split("/")):
            return Route(RouteKind.REFUSE, status=404, message=(
                f"{method} /{self.name}/{path}: the governed endpoints are POST "
                f"/{self.name}/model/MODEL_ID/converse and .../converse-stream, and for "
                "Anthropic models .../invoke and .../invoke-with-response-stream"))
        return Route(RouteKind.REFUSE, status=501, message=(
            f"/{self.name}/{path} is not governed: tether reads tool calls only on "
            "model/MODEL_ID/converse, converse-stream and (Anthropic models) invoke, "
            "invoke-with-response-stream, and signs what it forwards with its "
            "own credentials, so other Bedrock operations are refused rather than passed "
            "through"))

    def error(self, status: int, message: str, code: str) -> ErrorReply:
        return error_reply(status, message, code)

