"""The providers' rules for the conversation history a request sends back, as the fakes
enforce them.

Each real API refuses (400) a history in which a tool result has no call before it,
or a call has no result after it; the fakes refuse the same, with the provider's own
message, so a test cannot pass on a conversation tether rewrote into one the provider
would reject (a denied call taken out while its result is still sent, a stored call
left without its output ...). Each function returns why the API would refuse the
request, or None. Only the shapes the rules are about are read; anything else is left
to the rest of the fake.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Body = dict[str, Any]


def _dicts(value: object) -> list[Body]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# --- OpenAI Chat Completions ---------------------------------------------------------------


def chat_problem(body: Body) -> str | None:
    messages = _dicts(body.get("messages"))
    open_ids: list[str] | None = None  # the call ids of the last assistant turn still unanswered
    for message in messages:
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if open_ids is None or call_id not in open_ids:
                return ("Invalid parameter: messages with role 'tool' must be a response to a "
                        "preceding message with 'tool_calls'.")
            open_ids.remove(call_id)
            continue
        if open_ids:
            return ("An assistant message with 'tool_calls' must be followed by tool messages "
                    "responding to each 'tool_call_id'. The following tool_call_ids did not "
                    f"have response messages: {', '.join(open_ids)}")
        calls = _dicts(message.get("tool_calls")) if role == "assistant" else []
        open_ids = [str(c.get("id")) for c in calls] if calls else None
    if open_ids:
        return ("An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(open_ids)}")
    return None


# --- Anthropic Messages --------------------------------------------------------------------


def _blocks(message: Body, kind: str) -> list[Body]:
    return [b for b in _dicts(message.get("content")) if b.get("type") == kind]


def anthropic_problem(body: Body) -> str | None:
    messages = _dicts(body.get("messages"))
    for i, message in enumerate(messages):
        results = [str(b.get("tool_use_id")) for b in _blocks(message, "tool_result")]
        previous = messages[i - 1] if i else {}
        uses = [str(b.get("id")) for b in _blocks(previous, "tool_use")] \
            if previous.get("role") == "assistant" else []
        unexpected = [r for r in results if r not in uses]
        if message.get("role") == "user" and unexpected:
            return (f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` "
                    f"blocks: {', '.join(unexpected)}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message.")
        if message.get("role") == "assistant" and i + 1 < len(messages):
            mine = [str(b.get("id")) for b in _blocks(message, "tool_use")]
            answered = {str(b.get("tool_use_id")) for b in _blocks(messages[i + 1], "tool_result")}
            missing = [m for m in mine if m not in answered]
            if missing:
                return (f"messages.{i + 1}: `tool_use` ids were found without `tool_result` "
                        f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block "
                        "must have a corresponding `tool_result` block in the next message.")
    return None


# --- Bedrock Converse ----------------------------------------------------------------------


def _bedrock_ids(message: Body, kind: str) -> list[str]:
    return [str(b[kind].get("toolUseId")) for b in _dicts(message.get("content"))
            if isinstance(b.get(kind), dict)]


def bedrock_problem(body: Body) -> str | None:
    messages = _dicts(body.get("messages"))
    for i, message in enumerate(messages):
        results = _bedrock_ids(message, "toolResult")
        uses = _bedrock_ids(messages[i - 1], "toolUse") if i else []
        if results and len(results) > len(uses):
            return (f"The number of toolResult blocks at messages.{i}.content exceeds the "
                    "number of toolUse blocks of previous turn.")
        if [r for r in results if r not in uses]:
            return (f"The toolUseId of a toolResult block at messages.{i}.content does not "
                    "match any toolUse block of the previous turn.")
        if i + 1 < len(messages):
            missing = [u for u in _bedrock_ids(message, "toolUse")
                       if u not in _bedrock_ids(messages[i + 1], "toolResult")]
            if missing:
                return (f"Expected toolResult blocks at messages.{i + 1}.content for the "
                        f"following Ids: {', '.join(missing)}")
    return None


# --- Gemini --------------------------------------------------------------------------------


def _parts(content: Body, *keys: str) -> list[Body]:
    return [p for p in _dicts(content.get("parts")) if any(k in p for k in keys)]


def gemini_problem(body: Body) -> str | None:
    contents = _dicts(body.get("contents"))
    for i, content in enumerate(contents):
        answers = _parts(content, "functionResponse", "function_response")
        if not answers:
            continue
        calls = _parts(contents[i - 1], "functionCall", "function_call") if i else []
        if not calls:
            return ("Please ensure that function response turn comes immediately after a "
                    "function call turn.")
        if len(answers) != len(calls):
            return ("Please ensure that the number of function response parts is equal to "
                    "the number of function call parts of the function call turn.")
    return None


# --- OpenAI Responses ----------------------------------------------------------------------


def responses_problem(items: Iterable[object], stored: Mapping[str, Body]) -> str | None:
    """`items`: the conversation as the API sees it, earlier stored output first, then the
    request's input (item references left in); `stored`: every item the API stored, by id."""
    calls: dict[str, bool] = {}  # call id -> answered
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "item_reference":
            if item.get("id") not in stored:
                return f"Item with id '{item.get('id')}' not found."
            item = stored[str(item["id"])]
            kind = item.get("type")
        if kind in ("function_call", "custom_tool_call"):
            calls.setdefault(str(item.get("call_id")), False)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = str(item.get("call_id"))
            if call_id not in calls:
                return f"No tool call found for function call output with call_id {call_id}."
            calls[call_id] = True
    missing = [c for c, answered in calls.items() if not answered]
    if missing:
        return f"No tool output found for function call {missing[0]}."
    return None
