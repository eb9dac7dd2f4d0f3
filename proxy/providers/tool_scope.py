"""Declared-tool filtering: a request's tools cut down to its agent's scope (sans-IO).

A specialised agent (hub and spoke) may call only the tools of its scope; calls
outside it are denied `tether:agent-scope` anyway. Taking those tools out of the
request as well means the model never sees them, so it does not waste a turn
asking for one, and a prompt-injected model cannot be steered toward them.

One function per wire format. Each reads the body the format's parse_request
already accepted (so the JSON is known to be sound), removes what `permits`
refuses and returns the new body, or None when nothing is removed so the agent's
bytes go upstream unchanged. When no tool is left, the keys that are only valid
beside tools go too (tool_choice, parallel_tool_calls, Bedrock's toolConfig,
Gemini's functionCallingConfig). A tool choice that forces a removed tool is
refused (`BadRequest`): quietly letting the model pick another tool, or none,
would change what the agent asked for.

Names: function tools by their name everywhere. Tools the provider runs itself
go by their canonical names (policy/provider_tools.py): `openai:web_search`,
`anthropic:web_fetch`, `gemini:google_search` ..., so a scope lists them like any
other tool (`tools: [query_*, "openai:web_search"]`). MCP servers (OpenAI's `mcp`
tool, Anthropic's `mcp_toolset`) are not cut here: each of their tools is judged,
scope included, by the provider-tool gate (providers/provider_run.py), which
narrows the server to the tools left. Bedrock system tools go by their `name`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from ..errors import BadRequest
from ..policy.provider_tools import anthropic_name, gemini_name, openai_name
from ..surrogates import json_text
from .base import Restricted
from .provider_run import ANTHROPIC_CLIENT

type Permits = Callable[[str], bool]
type JSONObject = dict[str, object]

_UNDERSCORE = re.compile(r"_([a-z])")


class _Cut:
    """The names removed from one request."""

    def __init__(self, permits: Permits) -> None:
        self.permits = permits
        self.removed: list[str] = []

    def keep(self, *names: str | None) -> bool:
        """A tool stays only when every name it carries is in the scope: an entry with
        a harmless name where tether looks and another where the upstream reads
        (`type: custom` with both `function` and `custom`) is cut. A tool without a
        readable name stays: no call can name it, so the undeclared-tool check denies
        whatever the model makes of it."""
        outside = [n for n in names if n is not None and not self.permits(n)]
        self.removed.extend(outside)
        return not outside

    def gone(self, *names: object) -> bool:
        """A forced or allowed tool outside the scope, judged as the scope judges names
        (normal form), so `DELETE_VOLUME` is the removed `delete_volume`."""
        return any(isinstance(n, str) and not self.permits(n) for n in names)

    def result(self, obj: JSONObject) -> Restricted | None:
        if not self.removed:
            return None
        # A lone surrogate (JSON "\ud800") keeps its escape, as it was sent.
        return Restricted(json_text(obj).encode(), tuple(self.removed))


def _load(body: bytes) -> JSONObject:
    value = json.loads(body)
    if not isinstance(value, dict):  # parse_request refused it already; stay defensive
        raise BadRequest("request body must be a JSON object")
    return value


def _forced(name: str) -> BadRequest:
    return BadRequest(f"the tool choice forces {name!r}, which is outside this agent's tool "
                      "scope; the request was not forwarded")


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _sub(obj: object, key: str) -> JSONObject:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


# --- OpenAI Chat Completions (and Azure) -------------------------------------------------


def _chat_tool_name(tool: object) -> str | None:
    if not isinstance(tool, dict):
        return None
    for kind in ("function", "custom"):
        if isinstance(tool.get(kind), dict):
            return _str(tool[kind].get("name"))
    return _str(tool.get("name"))


def _chat_tool_names(tool: object) -> tuple[str | None, ...]:
    """Every name the entry carries: which one OpenAI reads depends on its `type`."""
    if not isinstance(tool, dict):
        return ()
    return (_str(_sub(tool, "function").get("name")), _str(_sub(tool, "custom").get("name")),
            _str(tool.get("name")))


def chat(body: bytes, permits: Permits) -> Restricted | None:
    obj = _load(body)
    cut = _Cut(permits)
    declared = obj.get("tools")
    if isinstance(declared, list):
        tools = [t for t in declared if cut.keep(*_chat_tool_names(t))]
        choice = obj.get("tool_choice")
        if isinstance(choice, dict):
            if choice.get("type") == "allowed_tools":
                allowed = _sub(choice, "allowed_tools")
                refs = allowed.get("tools")
                if isinstance(refs, list):
                    left = [r for r in refs if not cut.gone(*_chat_tool_names(r))]
                    if not left and refs:
                        raise _forced(", ".join(str(_chat_tool_name(r)) for r in refs))
                    allowed["tools"] = left
            elif cut.gone(*_chat_tool_names(choice)):
                raise _forced(str(_chat_tool_name(choice)))
        obj["tools"] = tools
        if not tools and cut.removed:
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                obj.pop(key, None)
    legacy = obj.get("functions")
    if isinstance(legacy, list):
        before = len(cut.removed)
        functions = [f for f in legacy
                     if cut.keep(_str(f.get("name")) if isinstance(f, dict) else None)]
        forced = obj.get("function_call")
        if isinstance(forced, dict) and cut.gone(forced.get("name")):
            raise _forced(str(forced["name"]))
        obj["functions"] = functions
        if not functions and len(cut.removed) > before:
            obj.pop("functions", None)
            obj.pop("function_call", None)
    return cut.result(obj)


# --- OpenAI Responses (and Azure) --------------------------------------------------------


def _responses_name(tool: object) -> str | None:
    """Function and custom tools by name, hosted tools by their canonical name; an MCP
    server has none (its tools are judged one by one by the provider-tool gate)."""
    if not isinstance(tool, dict):
        return None
    kind = _str(tool.get("type"))
    if kind in ("function", "custom"):
        return _str(tool.get("name"))
    if kind is None or kind == "mcp":
        return None
    return openai_name(kind)


def _responses_tools(tools: list[object], cut: _Cut) -> list[object]:
    kept: list[object] = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(
                tool.get("tools"), list):
            inner = _responses_tools(tool["tools"], cut)
            if inner:
                kept.append({**tool, "tools": inner})
        elif cut.keep(_responses_name(tool)):
            kept.append(tool)
    return kept


def responses(body: bytes, permits: Permits) -> Restricted | None:
    obj = _load(body)
    cut = _Cut(permits)
    declared = obj.get("tools")
    if not isinstance(declared, list):
        return None
    tools = _responses_tools(declared, cut)
    choice = obj.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools" and isinstance(choice.get("tools"), list):
            refs = choice["tools"]
            left = [r for r in refs if not cut.gone(_responses_name(r))]
            if not left and refs:
                raise _forced(", ".join(str(_responses_name(r)) for r in refs))
            choice["tools"] = left
        elif cut.gone(_responses_name(choice)):
            raise _forced(str(_responses_name(choice)))
    obj["tools"] = tools
    if not tools and cut.removed:
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            obj.pop(key, None)
    return cut.result(obj)


# --- Anthropic Messages ------------------------------------------------------------------


def _anthropic_name(tool: object) -> str | None:
    """Custom and client tools (bash, computer ...) by name, as their calls come back;
    server tools by canonical name; an `mcp_toolset` is left to the provider-tool gate."""
    if not isinstance(tool, dict):
        return None
    kind = _str(tool.get("type"))
    if kind is None or kind.startswith(ANTHROPIC_CLIENT):
        return _str(tool.get("name"))
    if kind == "mcp_toolset":
        return None
    return anthropic_name(kind)


def anthropic(body: bytes, permits: Permits) -> Restricted | None:
    obj = _load(body)
    cut = _Cut(permits)
    declared = obj.get("tools")
    if not isinstance(declared, list):
        return None
    tools = [t for t in declared if cut.keep(_anthropic_name(t))]
    choice = obj.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        # A server tool is forced by its name (`web_search`) and scoped by its canonical one.
        scoped = {t.get("name"): _anthropic_name(t) for t in declared if isinstance(t, dict)}
        forced = choice.get("name")
        if cut.gone(scoped.get(forced) if isinstance(forced, str) and forced in scoped
                    else forced):
            raise _forced(str(forced))
    obj["tools"] = tools
    if not tools and cut.removed:
        obj.pop("tools", None)
        obj.pop("tool_choice", None)
    return cut.result(obj)


# --- Bedrock Converse --------------------------------------------------------------------


def _bedrock_name(tool: object) -> str | None:
    for kind in ("toolSpec", "systemTool"):
        spec = _sub(tool, kind)
        if spec:
            return _str(spec.get("name"))
    return None


def _bedrock_names(tool: object) -> tuple[str | None, ...]:
    return tuple(_str(_sub(tool, kind).get("name")) for kind in ("toolSpec", "systemTool"))


def bedrock(body: bytes, permits: Permits) -> Restricted | None:
    obj = _load(body)
    cut = _Cut(permits)
    config = obj.get("toolConfig")
    if not isinstance(config, dict) or not isinstance(config.get("tools"), list):
        return None
    tools = [t for t in config["tools"] if cut.keep(*_bedrock_names(t))]
    forced = _sub(_sub(config, "toolChoice"), "tool").get("name")
    if cut.gone(forced):
        raise _forced(str(forced))
    config["tools"] = tools
    # A cachePoint alone is not a tool: with no tool left, toolConfig (and its
    # toolChoice) is invalid, so it goes whole.
    if cut.removed and not any(_bedrock_name(t) is not None for t in tools):
        obj.pop("toolConfig")
    return cut.result(obj)


# --- Gemini ------------------------------------------------------------------------------


def _key(obj: JSONObject, camel: str) -> str | None:
    """Which spelling of a field the request used (Gemini accepts both). Both at once is
    refused: which one Google reads is not ours to guess, and the filter must not edit
    one while the other goes upstream."""
    snake = re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), camel)
    if snake != camel and camel in obj and snake in obj:
        raise BadRequest(f"both {camel!r} and {snake!r} are given")
    return camel if camel in obj else snake if snake in obj else None


def _camel(key: str) -> str:
    return _UNDERSCORE.sub(lambda m: m.group(1).upper(), key)


def gemini(body: bytes, permits: Permits) -> Restricted | None:
    obj = _load(body)
    cut = _Cut(permits)
    tools_key = _key(obj, "tools")
    declared = obj.get(tools_key) if tools_key else None
    if tools_key is None or not isinstance(declared, list):
        return None
    tools: list[object] = []
    for entry in declared:
        if not isinstance(entry, dict):
            tools.append(entry)
            continue
        kept: JSONObject = {}
        for key, value in entry.items():
            if _camel(key) == "functionDeclarations" and isinstance(value, list):
                decls = [d for d in value
                         if cut.keep(_str(d.get("name")) if isinstance(d, dict) else None)]
                if decls:
                    kept[key] = decls
            elif cut.keep(gemini_name(_camel(key))):  # a built-in tool: gemini:google_search
                kept[key] = value
        if kept:
            tools.append(kept)
    functions_left = any(_key(e, "functionDeclarations") for e in tools if isinstance(e, dict))
    config_key = _key(obj, "toolConfig")
    config = obj.get(config_key) if config_key else None
    if isinstance(config, dict):
        calling_key = _key(config, "functionCallingConfig")
        calling = config.get(calling_key) if calling_key else None
        if isinstance(calling, dict):
            names_key = _key(calling, "allowedFunctionNames")
            names = calling.get(names_key) if names_key else None
            if isinstance(names, list):
                left = [n for n in names if not cut.gone(n)]
                if names and not left:
                    raise _forced(", ".join(str(n) for n in names))
                calling[str(names_key)] = left
            if cut.removed and not functions_left:
                config.pop(str(calling_key))
        if cut.removed and not config:
            obj.pop(str(config_key))
    obj[tools_key] = tools
    if not tools and cut.removed:
        obj.pop(tools_key)
    return cut.result(obj)
