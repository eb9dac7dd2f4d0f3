"""OpenAI Responses API (`POST /v1/responses`): requests and whole responses (sans-IO).

A response is a list of output *items*. The ones the agent runs are calls:

    function_call      {id, call_id, name, arguments (JSON text), status}
    custom_tool_call   {id, call_id, name, input (free text)}

A custom tool's input is not JSON, so it is governed as the arguments
`{"input": <text>}`: a rule reads it at `args.input`. Items of tools that run at
OpenAI (web search, file search, code interpreter, MCP ...) have already run
when tether sees them; they pass. Items the agent would run itself but tether
cannot read yet (computer, local shell, shell, apply_patch, or any unknown
`*_call` type) are denied as malformed, and requests declaring those tools
are refused with 501, so nothing the agent executes slips through unread.

A denied call is replaced, at the same position in `output`, by an assistant
`message` item whose `output_text` says why; allowed items are left as they were.
The stream filter is in `openai_responses_stream`; what both read the same way is
in `openai_responses_wire`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BadRequest, NotGoverned, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from . import tool_scope
from .base import ErrorReply, ParsedRequest, ParsedResponse, Restricted, Route, denial_text
from .held import DEFAULT_MAX_ARGUMENTS
from .mcp_approvals import approval_call
from .openai_chat_wire import denied_error
from .openai_chat_wire import loads_object as _loads_object
from .openai_responses_stream import ResponsesStream
from .openai_responses_wire import JSONObject as JSONObject
from .openai_responses_wire import error_event as error_event
from .openai_responses_wire import is_call, item_call, replacement
from .openai_responses_wire import usage_of as usage_of
from .provider_ran import openai_item

# openai_responses_approving still reads the wire's JSONObject, error_event and
# usage_of from here; new code imports them from openai_responses_wire.

# Tools whose calls the agent runs but whose items tether cannot govern yet.
CLIENT_TOOLS = frozenset({"computer", "computer_use_preview", "local_shell", "shell", "apply_patch"})


# --- requests ---------------------------------------------------------------------------


def _declared(tools: object, where: str, names: list[str]) -> None:
    if not isinstance(tools, list):
        raise BadRequest(f"'{where}' must be an array")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"{where}[{i}] must be an object")
        kind = tool.get("type")
        if kind in ("function", "custom") and isinstance(tool.get("name"), str):
            names.append(str(tool["name"]))
        elif kind == "namespace" and "tools" in tool:
            _declared(tool["tools"], f"{where}[{i}].tools", names)
        elif kind in CLIENT_TOOLS:
            raise NotGoverned(f"{where}[{i}]: tools of type {kind!r} make calls that this version "
                              "of tether cannot govern yet, so the request is refused")


def parse_request(body: bytes, default_model: str = "") -> ParsedRequest:
    obj = _loads_object(body, "request body")
    model = obj.get("model", default_model)
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    stream = obj.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    names: list[str] = []
    if obj.get("tools") is not None:
        _declared(obj["tools"], "tools", names)
    user = next((v for v in (obj.get("safety_identifier"), obj.get("user"))
                 if isinstance(v, str) and v), None)
    max_out = obj.get("max_output_tokens")
    if max_out is not None and (not isinstance(max_out, int) or isinstance(max_out, bool)
                                or max_out < 0):
        raise BadRequest("'max_output_tokens' must be a whole number")
    return ParsedRequest(model=model, stream=bool(stream), declared_tools=tuple(names), user=user,
                         max_output_tokens=max_out,
                         fingerprint=_fingerprint(obj))


def _fingerprint(obj: JSONObject) -> str | None:
    """The conversation id, instructions, system/developer items and the first user
    input, canonically: the same on every turn of a conversation that carries its
    history. A turn chained by `previous_response_id` carries only its new items, so
    its input is left out: such turns of one agent share a session (stricter budgets,
    never a fresh session per turn)."""
    parts: list[object] = []
    conversation = obj.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if isinstance(conversation, str):
        parts.append({"conversation": conversation})
    instructions = obj.get("instructions")
    if isinstance(instructions, str):
        parts.append(instructions)
    input_ = None if isinstance(obj.get("previous_response_id"), str) else obj.get("input")
    if isinstance(input_, str):
        parts.append(input_)
    elif isinstance(input_, list):
        for item in input_:
            if not isinstance(item, dict):
                continue
            if item.get("role") in ("system", "developer"):
                parts.append(item.get("content"))
            elif item.get("role") == "user":
                parts.append(item.get("content"))
                break
    return json_text(parts, sort_keys=True) if parts else None


# --- whole responses --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponsesResponse:
    body: bytes
    calls: tuple[ToolCall, ...]
    usage: Usage | None
    ran: tuple[ToolCall, ...] = ()   # provider-run calls the answer reports (provider_ran.py)
    approvals: tuple[ToolCall, ...] = ()  # MCP approval requests (mcp_approvals.py)


def _cut_problem(obj: JSONObject, item: JSONObject, last: bool) -> str | None:
    """Why a call item of a whole response is not complete, or None."""
    status = item.get("status")
    if status is not None and status != "completed":
        return f"the tool call item ended with status {status!r}"
    response_status = obj.get("status")
    if status is None and last and response_status not in (None, "completed"):
        return f"the response ended {response_status!r} with the tool call as its last item"
    return None


def parse_response(body: bytes) -> ResponsesResponse:
    try:
        obj = _loads_object(body, "upstream response")
    except BadRequest as e:
        raise UpstreamError(e.message) from e
    output = obj.get("output")
    if not isinstance(output, list):
        raise UpstreamError("upstream response has no 'output' array")
    calls: list[ToolCall] = []
    ran: list[ToolCall] = []
    approvals: list[ToolCall] = []
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            raise UpstreamError(f"upstream response output[{i}] is not an object")
        if is_call(item.get("type")):
            calls.append(item_call(item, i, _cut_problem(obj, item, i == len(output) - 1)))
        elif (done := openai_item(item, i)) is not None:
            ran.append(done)
        elif (asked := approval_call(item, i)) is not None:
            approvals.append(asked)
    return ResponsesResponse(body, tuple(calls), usage_of(obj), tuple(ran), tuple(approvals))


def render_response(response: ResponsesResponse, decisions: Sequence[Decision]) -> bytes:
    """The response with each denied call item replaced; the original bytes if none is."""
    if all(d.allowed for d in decisions):
        return response.body
    obj = json.loads(response.body)
    output = obj["output"]
    for call, decision in zip(response.calls, decisions, strict=True):
        if not decision.allowed:
            output[call.index] = replacement(output[call.index], denial_text(call, decision))
    return json_text(obj).encode("utf-8")


class OpenAIResponses:
    """The Responses wire format, as OpenAI and Azure OpenAI serve it."""

    name = "openai.responses"

    def restrict_tools(self, body: bytes, permits: Callable[[str], bool]
                       ) -> Restricted | None:
        return tool_scope.responses(body, permits)

    def parse_request(self, body: bytes, route: Route) -> ParsedRequest:
        return parse_request(body, route.model or "")

    def parse_response(self, body: bytes) -> ResponsesResponse:
        return parse_response(body)

    def render_response(self, parsed: ParsedResponse, decisions: Sequence[Decision]) -> bytes:
        assert isinstance(parsed, ResponsesResponse)
        return render_response(parsed, decisions)

    def stream(self, route: Route, *, max_arguments: int = DEFAULT_MAX_ARGUMENTS) -> ResponsesStream:
        return ResponsesStream(max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return denied_error(calls, decisions)


RESPONSES = OpenAIResponses()
