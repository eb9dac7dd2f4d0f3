"""Remote MCP tools in the fake Responses server, run the way OpenAI runs them.

A `McpCall` in a turn is the model calling a tool of a request's `mcp` server. The
fake reads that tool's declaration as OpenAI does: a tool outside `allowed_tools` is
not offered (the turn fails 400 in the test, so narrowing is seen to work, unless
`ignore_allowed` plays a provider that ignores it); `require_approval` ("always" by
default, "never", or the object form) decides whether it runs at once (`mcp_call`,
its output from `tools`, recorded in `ran`) or the answer stops at an
`mcp_approval_request`.

A later request answers approval requests with `mcp_approval_response` input items,
under the API's rules: the request it answers must be in the conversation (the
stored response chain of `previous_response_id`, or the input items themselves when
nothing is stored) and not answered yet, or the request is refused 400. An approved
one runs, and its `mcp_call` opens the answer; a refused one does not run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fake_base import Call
from .fake_history import responses_problem

Body = dict[str, Any]
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class McpCall(Call):
    """The model calls `name` on the request's MCP server `server_label`."""

    server_label: str = "github"


def _names(value: Any) -> list[str] | None:
    names = value.get("tool_names") if isinstance(value, dict) else value
    return [str(n) for n in names] if isinstance(names, list) else None


def _input(request: Body) -> list[Body]:
    given = request.get("input")
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return [i for i in given if isinstance(i, dict)] if isinstance(given, list) else []


def conversation_id(request: Body) -> str | None:
    conversation = request.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    return conversation if isinstance(conversation, str) else None


def needs_approval(tool: Body, name: str) -> bool:
    rule = tool.get("require_approval", "always")
    if rule == "never":
        return False
    if isinstance(rule, dict):
        if name in (_names(rule.get("always")) or []):
            return True
        return name not in (_names(rule.get("never")) or [])
    return True


@dataclass
class McpState:
    """What the fake server remembers between requests, like OpenAI's stored responses."""

    tools: dict[str, Callable[[dict[str, Any]], str]] = field(default_factory=dict)
    ignore_allowed: bool = False
    ran: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    stored: dict[str, Body] = field(default_factory=dict)   # response id -> response
    stored_items: dict[str, Body] = field(default_factory=dict)  # every stored item, by id
    answered: set[str] = field(default_factory=set)
    conversations: dict[str, list[Body]] = field(default_factory=dict)  # id -> its items

    def _server(self, request: Body, label: str) -> Body | None:
        for tool in request.get("tools") or []:
            if isinstance(tool, dict) and tool.get("type") == "mcp" \
                    and tool.get("server_label") == label:
                return tool
        return None

    def _run(self, label: str, name: str, arguments: str) -> Body:
        args = json.loads(arguments or "{}")
        self.ran.append((label, name, args))
        handler = self.tools.get(name)
        return {"id": f"mcp_{next(_ids)}", "type": "mcp_call", "status": "completed",
                "server_label": label, "name": name, "arguments": arguments,
                "output": handler(args) if handler else json.dumps({"ok": True}),
                "error": None}

    def items(self, call: McpCall, request: Body) -> tuple[list[Body], str | None]:
        """The output items of the model's call, or why the API would refuse it."""
        server = self._server(request, call.server_label)
        if server is None:
            return [], f"the model called an MCP server {call.server_label!r} not declared"
        allowed = _names(server.get("allowed_tools"))
        if allowed is not None and call.name not in allowed and not self.ignore_allowed:
            return [], f"the MCP tool {call.name!r} is not in allowed_tools"
        listed = {"id": f"mcpl_{next(_ids)}", "type": "mcp_list_tools",
                  "server_label": call.server_label,
                  "tools": [{"name": n, "input_schema": {"type": "object"}}
                            for n in (allowed or [call.name])]}
        if needs_approval(server, call.name):
            return [listed, {"id": f"mcpr_{next(_ids)}", "type": "mcp_approval_request",
                             "server_label": call.server_label, "name": call.name,
                             "arguments": call.arguments}], None
        return [listed, self._run(call.server_label, call.name, call.arguments)], None

    def conversation(self, request: Body) -> list[Body]:
        """What the model reads: the stored chain of `previous_response_id` (each turn's
        input, then its output), then this request's input."""
        conversation = conversation_id(request)
        if conversation is not None:
            return list(self.conversations.get(conversation, [])) + _input(request)
        items: list[Body] = []
        previous = request.get("previous_response_id")
        while isinstance(previous, str) and previous in self.stored:
            stored = self.stored[previous]
            items = list(stored["_input"]) + list(stored["output"]) + items
            previous = stored.get("previous_response_id")
        return items + _input(request)

    def history_problem(self, request: Body) -> str | None:
        """Why the API would refuse the request's history (fake_history.py), or None."""
        previous = request.get("previous_response_id")
        if isinstance(previous, str) and previous not in self.stored:
            return f"Previous response with id '{previous}' not found."
        conversation = conversation_id(request)
        if conversation is not None and conversation not in self.conversations:
            return f"Conversation with id '{conversation}' not found."
        return responses_problem(self.conversation(request), self.stored_items)

    def answers(self, request: Body) -> tuple[list[Body], str | None]:
        """The `mcp_call` items the request's approval responses run, or the API's 400."""
        given = request.get("input")
        responses = [i for i in given if isinstance(i, dict)
                     and i.get("type") == "mcp_approval_response"] \
            if isinstance(given, list) else []
        if not responses:
            return [], None
        if request.get("previous_response_id") and request["previous_response_id"] \
                not in self.stored:
            return [], f"Previous response with id '{request['previous_response_id']}' not found."
        asked = {i["id"]: i for i in self.conversation(request)
                 if isinstance(i, dict) and i.get("type") == "mcp_approval_request"}
        out: list[Body] = []
        for answer in responses:
            rid = answer.get("approval_request_id")
            if not isinstance(answer.get("approve"), bool):
                return [], "Invalid value for 'approve': expected a boolean."
            if rid not in asked:
                return [], f"No approval request found with id '{rid}'."
            if rid in self.answered:
                return [], f"Approval request '{rid}' has already been answered."
        for answer in responses:
            self.answered.add(answer["approval_request_id"])
            if answer["approve"]:
                item = asked[answer["approval_request_id"]]
                out.append({**self._run(item["server_label"], item["name"], item["arguments"]),
                            "approval_request_id": item["id"]})
        return out, None

    def remember(self, response: Body, request: Body) -> None:
        conversation = conversation_id(request)
        if conversation is not None:  # the Conversations API keeps the turn's items
            self.conversations.setdefault(conversation, []).extend(
                [*_input(request), *response["output"]])
        if request.get("store", True) is not False:
            given = _input(request)
            self.stored[response["id"]] = {**response, "_input": given,
                                           "previous_response_id":
                                               request.get("previous_response_id")}
            for item in given + list(response["output"]):
                if isinstance(item, dict) and isinstance(item.get("id"), str) \
                        and item.get("type") != "item_reference":
                    self.stored_items[item["id"]] = item
