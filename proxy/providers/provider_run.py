"""Provider-run tools in a request: judged, narrowed or refused before it goes upstream.

Sans-IO. One function per wire format reads the tools the provider would run
itself (policy/provider_tools.py names them), asks `judge` about each, and
returns the body to send: unchanged (`body` None), narrowed, or not at all
(`ProviderToolRefused`, a 400 in the provider's shape naming the rules).

- A server tool (web search, code execution ...) is allowed or refused whole: a
  `hold` is refused too, since the provider runs it before anyone could approve.
- An MCP server must be allow-listed (label and URL); of its configured tools,
  those the agent asked for and the rules allow are kept. OpenAI's `mcp` tool gets
  `allowed_tools` and a `require_approval` that asks for every `hold` tool and for
  every tool the agent wanted approval for (never looser than the agent's).
  Anthropic's connector has no approval step, so a `hold` tool is left out there.
  A server none of whose tools is allowed is refused.

`judge(name, effect, arguments)` is the front end's decision path (it audits).
The body was accepted by the format's parse_request, so it is sound JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import BadRequest
from ..model import Action, Decision, Effect
from ..policy.provider_tools import (
    MCP_UNLISTED,
    MCP_URL,
    McpAllow,
    ProviderTools,
    anthropic_name,
    effect_of,
    gemini_name,
    mcp_name,
    openai_name,
)
from ..surrogates import json_text

_KIND = re.compile(r"[A-Za-z0-9_]{1,64}")

type Judge = Callable[[str, Effect, Mapping[str, object]], Decision]
type JSONObject = dict[str, object]

OPENAI_CLIENT = frozenset({"function", "custom", "namespace", "computer", "computer_use_preview",
                           "local_shell", "shell", "apply_patch"})
ANTHROPIC_CLIENT = ("custom", "bash_", "text_editor_", "computer_", "memory_")
GEMINI_FUNCTIONS = frozenset({"functionDeclarations", "function_declarations"})


class ProviderToolRefused(BadRequest):
    code = "provider_tool_denied"


@dataclass(frozen=True, slots=True)
class Gated:
    body: bytes | None                 # None: nothing changed, the agent's bytes go up
    narrowed: tuple[str, ...] = ()     # what was changed, for the audit record
    # OpenAI MCP servers: label -> the tools whose approval requests the *agent* asked for
    # (its own `require_approval`); tether answers the others itself (mcp_approvals.py).
    agent_approves: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _refuse(what: str, rules: tuple[str, ...], message: str) -> ProviderToolRefused:
    named = ", ".join(rules) or "none"
    return ProviderToolRefused(f"provider-run tool {what} refused (rules: {named}): {message}; "
                               "the request was not forwarded")


def _load(body: bytes) -> JSONObject:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


class _Gate:
    def __init__(self, settings: ProviderTools, judge: Judge, provider: str) -> None:
        self.settings = settings
        self.judge = judge
        self.provider = provider
        self.narrowed: list[str] = []
        self.urls: dict[str, str] = {}
        self.seen: dict[str, Decision] = {}
        self.kept: dict[str, list[str]] = {}  # MCP server label -> the tools left to it
        self.agent_approves: dict[str, frozenset[str]] = {}

    def once(self, name: str, effect: Effect, arguments: Mapping[str, object]) -> Decision:
        """One decision (and one audit record) per distinct tool in a request, however
        often it is declared: 10,000 copies of `web_search` cost one."""
        key = json_text([name, effect.value, dict(arguments)])
        found = self.seen.get(key)
        if found is None:
            found = self.seen[key] = self.judge(name, effect, arguments)
        return found

    def whole(self, name: str, arguments: Mapping[str, object]) -> None:
        kind = name.partition(":")[2]
        if not _KIND.fullmatch(kind):
            # A type like `mcp:github:get_issue` would borrow another tool's canonical name.
            raise BadRequest(f"the provider-run tool type {kind[:80]!r} is not a plain name "
                             "(letters, digits, _); the request was not forwarded")
        decision = self.once(name, effect_of(name), arguments)
        if decision.action is Action.HOLD:
            raise _refuse(repr(name), decision.rules, (decision.message or "it needs approval")
                          + " (the provider runs it before anyone could approve)")
        if decision.action is not Action.ALLOW:
            raise _refuse(repr(name), decision.rules, decision.message or "denied")

    def server(self, label: object, url: object, where: str) -> McpAllow:
        """The allow-listed server a declaration names, or a refusal."""
        if not isinstance(label, str) or not label:
            raise BadRequest(f"{where}: an MCP server needs a non-empty string label")
        if url is None:
            raise _refuse(f"{where} ({label!r})", (MCP_URL,), "an MCP server without a URL "
                          "(a provider connector) cannot be allow-listed yet")
        known = self.urls.setdefault(label, url if isinstance(url, str) else "")
        if known != url:
            raise _refuse(f"{where} ({label!r})", (MCP_URL,),
                          "two MCP servers share this label with different URLs")
        allow = self.settings.mcp_servers.get(label)
        if allow is None:
            raise _refuse(f"{where} ({label!r})", (MCP_UNLISTED,), "this MCP server label is "
                          "not in provider_tools.mcp_servers")
        problem = allow.covers(url)
        if problem is not None:
            raise _refuse(f"{where} ({label!r})", (MCP_URL,), problem)
        return allow

    def tools(self, allow: McpAllow, url: str, candidates: list[str]) -> dict[str, Decision]:
        return {t: self.once(mcp_name(self.provider, allow.label, t), allow.tools[t],
                             {"server_label": allow.label, "server_url": url, "tool": t})
                for t in candidates}

    def none_left(self, allow: McpAllow, verdicts: Mapping[str, Decision]) -> ProviderToolRefused:
        rules = tuple(dict.fromkeys(r for d in verdicts.values() for r in d.rules))
        messages = "; ".join(dict.fromkeys(d.message for d in verdicts.values() if d.message))
        return _refuse(f"MCP server {allow.label!r}", rules,
                       "no tool of this server is allowed" + (f" ({messages})" if messages
                                                               else ""))

    def result(self, obj: JSONObject) -> Gated:
        if not self.narrowed:
            return Gated(None, agent_approves=self.agent_approves)
        return Gated(json_text(obj).encode(), tuple(self.narrowed), self.agent_approves)


def _names(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise BadRequest(f"{where} must be an array of tool names")
    return [str(n) for n in value]


def _filter(value: object, where: str, names_only: bool = True
            ) -> tuple[list[str] | None, bool | None]:
    """An OpenAI MCP tool filter: `{tool_names, read_only}`, or (`allowed_tools` only) a
    list of names."""
    if names_only and isinstance(value, list):
        return _names(value, where), None
    if not isinstance(value, dict) or set(value) - {"tool_names", "read_only"}:
        raise BadRequest(f"{where} must be a list of tool names or "
                         "{tool_names: [...], read_only: bool}")
    read_only = value.get("read_only")
    if read_only is not None and not isinstance(read_only, bool):
        raise BadRequest(f"{where}.read_only must be true or false")
    names = value.get("tool_names")
    return (_names(names, f"{where}.tool_names") if names is not None else None), read_only


def _approval_asked(value: object, tools: list[str], where: str) -> set[str]:
    """The tools the agent's `require_approval` wants approval for (absent: all, as OpenAI's
    default). A `never` filter with `read_only` is taken as asking approval: tether cannot
    know which tools the server marks read-only."""
    if value is None or value == "always":
        return set(tools)
    if value == "never":
        return set()
    if not isinstance(value, dict) or not value or set(value) - {"always", "never"}:
        raise BadRequest(f"{where} must be \"always\", \"never\" or "
                         "{always: {tool_names: [...]}, never: {tool_names: [...]}}")
    always_names, _ = _filter(value.get("always", {}), f"{where}.always", False)
    never_names, never_read_only = _filter(value.get("never", {}), f"{where}.never", False)
    skip = set(never_names or ()) if never_read_only is None else set()
    always = set(always_names or ())
    return {t for t in tools if t in always or t not in skip}


# --- OpenAI Responses (and Azure) --------------------------------------------------------


def _openai_mcp(gate: _Gate, tool: JSONObject, where: str) -> None:
    allow = gate.server(tool.get("server_label"), tool.get("server_url"), where)
    url = str(tool["server_url"])
    candidates = list(allow.tools)
    asked = tool.get("allowed_tools")
    if asked is not None:
        names, read_only = _filter(asked, f"{where}.allowed_tools")
        if names is not None:
            chosen = set(names)
            candidates = [t for t in candidates if t in chosen]
        if read_only:
            candidates = [t for t in candidates if allow.tools[t] is Effect.READ]
    verdicts = gate.tools(allow, url, candidates)
    allowed = [t for t in candidates if verdicts[t].action is not Action.DENY]
    if not allowed:
        raise gate.none_left(allow, verdicts)
    agent_asked = _approval_asked(tool.get("require_approval"), allowed,
                                  f"{where}.require_approval")
    gate.agent_approves[allow.label] = frozenset(agent_asked)
    need = {t for t in allowed if verdicts[t].action is Action.HOLD} | agent_asked
    tool["allowed_tools"] = {**asked, "tool_names": allowed} if isinstance(asked, dict) \
        else allowed
    if need == set(allowed):
        tool["require_approval"] = "always"
    elif not need:
        tool["require_approval"] = "never"
    else:
        tool["require_approval"] = {
            "always": {"tool_names": [t for t in allowed if t in need]},
            "never": {"tool_names": [t for t in allowed if t not in need]}}
    gate.kept[allow.label] = allowed
    gate.narrowed.append(f"{allow.label}: allowed {allowed}, approval {sorted(need)}")


def _openai_tools(gate: _Gate, tools: object, where: str) -> None:
    if not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            continue  # parse_request refused it already
        kind = tool.get("type")
        here = f"{where}[{i}]"
        if not isinstance(kind, str):
            raise BadRequest(f"{here}.type must be a string")
        if kind == "namespace":
            _openai_tools(gate, tool.get("tools"), f"{here}.tools")
        elif kind == "mcp":
            _openai_mcp(gate, tool, here)
        elif kind not in OPENAI_CLIENT:
            gate.whole(openai_name(kind), {"type": kind})


def openai(body: bytes, settings: ProviderTools, judge: Judge) -> Gated:
    obj = _load(body)
    gate = _Gate(settings, judge, "openai")
    _openai_tools(gate, obj.get("tools"), "tools")
    choice = obj.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "mcp":
        # Forcing a tool the narrowing took away would change what the agent asked for.
        label, name = choice.get("server_label"), choice.get("name")
        kept = gate.kept.get(label) if isinstance(label, str) else None
        if kept is None or (name is not None and name not in kept):
            raise BadRequest(f"the tool choice forces MCP tool {name!r} of server {label!r}, "
                             "which is not allowed; the request was not forwarded")
    return gate.result(obj)


# --- Anthropic Messages ------------------------------------------------------------------


def _enabled(config: object, where: str) -> bool | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise BadRequest(f"{where} must be an object")
    value = config.get("enabled")
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}.enabled must be true or false")
    return value


def _anthropic_server(gate: _Gate, server: JSONObject, toolsets: list[JSONObject],
                      where: str) -> None:
    if server.get("type", "url") != "url":
        raise _refuse(f"{where}", (MCP_URL,), "only MCP servers of type 'url' are known")
    allow = gate.server(server.get("name"), server.get("url"), where)
    url = str(server["url"])
    forms: list[tuple[JSONObject, list[str]]] = []  # (where the allow-list goes, candidates)
    old = server.get("tool_configuration")
    if old is not None or not toolsets:
        config: JSONObject = old if isinstance(old, dict) else {}
        if old is not None and not isinstance(old, dict):
            raise BadRequest(f"{where}.tool_configuration must be an object")
        candidates = list(allow.tools)
        if config.get("allowed_tools") is not None:
            names = set(_names(config["allowed_tools"],
                               f"{where}.tool_configuration.allowed_tools"))
            candidates = [t for t in candidates if t in names]
        if _enabled(config, f"{where}.tool_configuration") is False:
            candidates = []
        server["tool_configuration"] = config
        forms.append((config, candidates))
    for i, toolset in enumerate(toolsets):
        default = _enabled(toolset.get("default_config"), f"mcp_toolset[{i}].default_config")
        configs = toolset.get("configs") or {}
        if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
            raise BadRequest(f"mcp_toolset[{i}].configs must map tool names to objects")
        on = [t for t in allow.tools
              if (_enabled(configs.get(t), f"mcp_toolset[{i}].configs.{t}")
                  if configs.get(t) is not None and "enabled" in configs[t] else default)
              is not False]
        forms.append((toolset, on))
    wanted = list(dict.fromkeys(t for _, c in forms for t in c))
    if not wanted:
        return  # every form disables every tool: nothing of this server can run
    verdicts = gate.tools(allow, url, wanted)
    allowed = {t for t in wanted if verdicts[t].action is Action.ALLOW}
    if not allowed:
        raise gate.none_left(allow, verdicts)
    for target, candidates in forms:
        keep = [t for t in candidates if t in allowed]
        if target.get("type") == "mcp_toolset":
            if not keep and candidates:
                raise gate.none_left(allow, verdicts)
            configs = target.get("configs") if isinstance(target.get("configs"), dict) else {}
            assert isinstance(configs, dict)
            target["default_config"] = {**(target.get("default_config") or {}),  # type: ignore[dict-item]
                                        "enabled": False}
            target["configs"] = {t: {**(configs.get(t) or {}), "enabled": True} for t in keep}
        else:
            target["allowed_tools"] = keep
    gate.narrowed.append(f"{allow.label}: allowed {sorted(allowed)}")


def anthropic(body: bytes, settings: ProviderTools, judge: Judge) -> Gated:
    obj = _load(body)
    gate = _Gate(settings, judge, "anthropic")
    tools = obj.get("tools") if isinstance(obj.get("tools"), list) else []
    assert isinstance(tools, list)
    toolsets: dict[str, list[JSONObject]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind is None or (isinstance(kind, str) and kind.startswith(ANTHROPIC_CLIENT)):
            continue  # a custom or client tool: its calls come back and are judged then
        if not isinstance(kind, str):
            raise BadRequest(f"tools[{i}].type must be a string")
        if kind == "mcp_toolset":
            name = tool.get("mcp_server_name")
            if not isinstance(name, str):
                raise BadRequest(f"tools[{i}].mcp_server_name must be a string")
            toolsets.setdefault(name, []).append(tool)
        else:
            gate.whole(anthropic_name(kind), {"type": kind, "name": tool.get("name")})
    servers = obj.get("mcp_servers")
    if servers is not None and not isinstance(servers, list):
        raise BadRequest("'mcp_servers' must be an array")
    named: set[str] = set()
    for i, server in enumerate(servers or []):
        if not isinstance(server, dict):
            raise BadRequest(f"mcp_servers[{i}] must be an object")
        name = server.get("name")
        if isinstance(name, str) and name in named:
            gate.server(name, server.get("url"), f"mcp_servers[{i}]")  # refuses a URL clash
            raise BadRequest(f"mcp_servers[{i}]: the server name {name!r} is given twice")
        _anthropic_server(gate, server, toolsets.get(str(name), []), f"mcp_servers[{i}]")
        named.add(str(name))
    for name in toolsets:
        if name not in named:
            raise BadRequest(f"an mcp_toolset names {name!r}, which is not in mcp_servers")
    return gate.result(obj)


# --- Gemini ------------------------------------------------------------------------------


def gemini(body: bytes, settings: ProviderTools, judge: Judge) -> Gated:
    obj = _load(body)
    gate = _Gate(settings, judge, "gemini")
    tools = obj.get("tools")
    for entry in tools if isinstance(tools, list) else []:
        if not isinstance(entry, dict):
            continue
        for key in entry:
            if key not in GEMINI_FUNCTIONS:
                gate.whole(gemini_name(key), {"tool": key})
    return gate.result(obj)
