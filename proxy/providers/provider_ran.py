"""Provider-run calls that ran: what a whole answer says the provider already did.

Sans-IO. Tools the provider runs (remote MCP, web search, code execution ...) are judged
on the request, where tether narrows or refuses them (server/provider_gate.py). The
answer then reports what ran: OpenAI's `mcp_call`, `web_search_call` ... output items,
Anthropic's `mcp_tool_use` and `server_tool_use` blocks. Each becomes a ToolCall under
the canonical name the request side used (policy/provider_tools.py), so the same rules
judge it and the audit records it with its arguments. One the rules would not allow ran
anyway (the provider ignored the narrowing, or it was never narrowable): that is a
violation, and the server denies every call the answer still hands to the agent.

A stream reports the same items and blocks once each is complete (`Step.ran`); an
Anthropic block's input then arrives in fragments, assembled by `StreamedBlock`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..model import ToolCall
from ..policy.provider_tools import anthropic_name, mcp_name, openai_name
from ..surrogates import json_text
from .held import HeldText, cut

VIOLATION = "tether:provider-tool-violation"

# OpenAI output items a provider-run tool leaves; `mcp_call` is named by its server.
OPENAI_RAN = frozenset({"web_search_call", "file_search_call", "code_interpreter_call",
                        "image_generation_call", "mcp_call", "tool_search_call"})
ANTHROPIC_RAN = frozenset({"server_tool_use", "mcp_tool_use"})
# What an item's arguments are read from, when it has no `arguments` text of its own.
_OPENAI_FIELDS = {"web_search_call": "action", "file_search_call": "queries",
                  "code_interpreter_call": "code", "tool_search_call": "arguments"}


def _ran(item_id: object, name: str, arguments: object, index: int) -> ToolCall:
    """A ToolCall for what ran. Arguments that are an object are judged as they are;
    JSON text is parsed; anything else is judged as `{"input": value}`."""
    value = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            value = {"input": arguments}
    if not isinstance(value, Mapping):
        value = {} if value is None else {"input": value}
    raw = arguments if isinstance(arguments, str) else json_text(value)
    return ToolCall(id=str(item_id) if item_id is not None else f"ran-{index}", name=name,
                    raw_arguments=raw, arguments=value, index=index)


def openai_item(item: Mapping[str, object], index: int) -> ToolCall | None:
    """The call an OpenAI output item reports as run, or None for any other item."""
    kind = item.get("type")
    if not isinstance(kind, str) or kind not in OPENAI_RAN:
        return None
    if kind == "mcp_call":
        label, tool = item.get("server_label"), item.get("name")
        name = mcp_name("openai", str(label), str(tool))
        return _ran(item.get("id"), name, item.get("arguments"), index)
    field = _OPENAI_FIELDS.get(kind)
    arguments = item.get(field) if field else None
    if field == "code":
        arguments = {"code": arguments}
    elif field == "queries":
        arguments = {"queries": arguments}
    return _ran(item.get("id"), openai_name(kind.removesuffix("_call")), arguments, index)


def anthropic_block(block: Mapping[str, object], index: int) -> ToolCall | None:
    """The call an Anthropic content block reports as run, or None for any other block."""
    kind = block.get("type")
    if kind == "mcp_tool_use":
        name = mcp_name("anthropic", str(block.get("server_name")), str(block.get("name")))
    elif kind == "server_tool_use":
        name = anthropic_name(str(block.get("name")))
    else:
        return None
    return _ran(block.get("id"), name, block.get("input"), index)


@dataclass(slots=True)
class StreamedBlock:
    """An Anthropic provider-run block as a stream sends it: its `content_block_start`,
    then its input as `input_json_delta` fragments (or whole in the start, when there
    are none). Past `limit` bytes the text is dropped and the call judged by name alone,
    which the engine denies: input tether could not check is not allowed to have run."""

    block: Mapping[str, object]
    index: int
    limit: int
    text: HeldText = field(default_factory=HeldText)
    over: bool = False

    def take(self, delta: object) -> None:
        if not isinstance(delta, Mapping) or delta.get("type") != "input_json_delta":
            return
        piece = delta.get("partial_json")
        if isinstance(piece, str) and not self.over:
            self.text.append(piece)
            if self.text.size > self.limit:
                self.over = True
                self.text.clear()

    def call(self) -> ToolCall | None:
        """The call, once its `content_block_stop` came."""
        if self.over:
            done = anthropic_block({**self.block, "input": {}}, self.index)
            return cut(done, self.limit, streamed=False, what="its input is") if done else None
        arguments = self.text.text() if self.text.length else self.block.get("input")
        return anthropic_block({**self.block, "input": arguments}, self.index)
