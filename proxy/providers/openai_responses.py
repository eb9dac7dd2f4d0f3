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
The stream filter is in `openai_responses_stream`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BadRequest, NotGoverned, UpstreamError
from ..model import Decision, ToolCall, Usage
from ..surrogates import json_text
from . import tool_scope
from .arguments import parse_arguments
from .base import ErrorReply, ParsedRequest, ParsedResponse, Restricted, Route, denial_text
from .held import DEFAULT_MAX_ARGUMENTS
from .mcp_approvals import approval_call
from .openai_chat import _loads_object, denied_error
from .provider_ran import openai_item

if TYPE_CHECKING:
    from .openai_responses_stream import ResponsesStream

type JSONObject = dict[str, object]

FUNCTION = "function_call"
CUSTOM = "custom_tool_call"
# Calls that OpenAI runs itself: reported in the output after the fact.
SERVER_CALLS = frozenset({"web_search_call", "file_search_call", "code_interpreter_call",
                          "image_generation_call", "mcp_call", "tool_search_call"})
# Tools whose calls the agent runs but whose items tether cannot govern yet.
CLIENT_TOOLS = frozenset({"computer", "computer_use_preview", "local_shell", "shell", "apply_patch"})
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


# --- items ------------------------------------------------------------------------------


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


def error_event(message: str, *, kind: str, code: str, sequence: int) -> JSONObject:
    """A Responses `error` event. The documented fields are at the top level; the same
    error is also nested under `error`, the shape the API sends in practice and the
    one the openai SDK raises `APIError` on."""
    return {"type": "error", "code": code, "message": message, "param": None,
            "sequence_number": sequence,
            "error": {"type": kind, "code": code, "message": message, "param": None}}


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
        # Imported here: the stream module builds on this one.
        from .openai_responses_stream import ResponsesStream
        return ResponsesStream(max_arguments=max_arguments)

    def denied_error(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> ErrorReply:
        return denied_error(calls, decisions)


RESPONSES = OpenAIResponses()
