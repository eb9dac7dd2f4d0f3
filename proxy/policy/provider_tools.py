"""Provider-run tools: their canonical names, effects, and the MCP server allow-list.

Sans-IO. A provider-run tool is one the LLM provider runs itself, inside the
request, before its answer reaches tether: OpenAI's hosted tools (`mcp`,
`web_search`, `file_search` ...), Anthropic's server tools and MCP connector,
Gemini's built-in tools. No tool call for them ever comes back for the agent to
run, so they are judged on the request side, by these names:

    openai:mcp:<server_label>:<tool>     anthropic:mcp:<server name>:<tool>
    openai:web_search                    anthropic:web_search
    openai:file_search                   anthropic:web_fetch
    openai:code_interpreter              anthropic:code_execution
    openai:image_generation              gemini:google_search
    openai:<type>  (any other type)      gemini:code_execution
    anthropic:<type less its date>       gemini:url_context, gemini:<key in snake case>

A versioned type loses its version (`web_search_20250305` and
`web_search_preview_2025_03_11` are `web_search`), so a rule written once keeps
matching the next version. An unknown type is named the same way and judged:
nothing passes because tether does not know it.

MCP servers are allow-listed like egress hosts (`provider_tools.mcp_servers`):
the label the request uses must be configured, and the URL it declares must be
the configured one or under it (scheme, host, port exact; path on a segment
boundary). Anything tether would have to guess about is refused: userinfo,
percent-escapes, dot or empty segments, a query or fragment, non-ASCII,
plain http unless the server is configured with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from ..config_tables import MCP_ALLOW, PROVIDER_TOOLS
from ..errors import ConfigError
from ..model import Effect
from .names import normalize
from .source import YMap

_DATE = re.compile(r"_(?:\d{8}|\d{4}_\d{2}_\d{2})$")
_CAMEL = re.compile(r"[A-Z]")
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_URL_TEXT = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
MAX_URL = 2048
DEFAULT_PORT = {"https": 443, "http": 80}

# Tools that only look things up; everything else a provider runs counts as a write.
READ_TOOLS = frozenset({
    "openai:web_search", "openai:file_search", "openai:tool_search",
    "anthropic:web_search", "anthropic:web_fetch", "anthropic:tool_search_tool_regex",
    "anthropic:tool_search_tool_bm25",
    "gemini:google_search", "gemini:google_search_retrieval", "gemini:url_context",
    "gemini:google_maps", "gemini:enterprise_web_search", "gemini:file_search",
})
PREFIXES = ("openai:", "anthropic:", "gemini:")
# OpenAI's spellings of one tool across versions.
_OPENAI_ALIASES = {"web_search_preview": "web_search"}

UNLISTED = "tether:provider-tool-unlisted"   # no rule mentions it; undeclared_tools is deny
MCP_UNLISTED = "tether:mcp-server-unlisted"  # the label is not in provider_tools.mcp_servers
MCP_URL = "tether:mcp-server-url"            # the URL is not the configured one


def openai_name(kind: str) -> str:
    base = _DATE.sub("", kind)
    return f"openai:{_OPENAI_ALIASES.get(base, base)}"


def anthropic_name(kind: str) -> str:
    return f"anthropic:{_DATE.sub('', kind)}"


def gemini_name(key: str) -> str:
    """`googleSearch` and `google_search` are one tool: `gemini:google_search`."""
    return "gemini:" + _CAMEL.sub(lambda m: "_" + m.group().lower(), key)


def mcp_name(provider: str, server: str, tool: str) -> str:
    return f"{provider}:mcp:{server}:{tool}"


def is_provider_run(name: str) -> bool:
    """`name` in normal form: a canonical name of a provider-run tool."""
    return name.startswith(PREFIXES)


def effect_of(name: str) -> Effect:
    return Effect.READ if name in READ_TOOLS else Effect.WRITE


@dataclass(frozen=True, slots=True)
class Place:
    """A URL taken apart the way it is compared."""

    scheme: str
    host: str
    port: int
    path: str  # no trailing slash; "" for the root


def place(url: object) -> Place | str:
    """The URL's parts, or why tether will not compare it (a refusal, never a guess)."""
    if not isinstance(url, str) or not url:
        return "the server URL must be a non-empty string"
    if len(url) > MAX_URL:
        return f"the server URL is over {MAX_URL} characters"
    if not _URL_TEXT.fullmatch(url):
        return "the server URL holds spaces, control or non-ASCII characters"
    if "%" in url or "\\" in url:
        return "the server URL holds a percent-escape or a backslash"
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the server URL does not parse"
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORT:
        return "the server URL must be https (or http where configured)"
    if "@" in parts.netloc:
        return "the server URL carries credentials (userinfo)"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "the server URL has a query or fragment"
    host = (parts.hostname or "").lower()
    host = host[:-1] if host.endswith(".") else host
    if "[" in parts.netloc:
        host = f"[{host}]"
    if not _HOST.fullmatch(host) or ".." in host:
        return "the server URL's host is not a plain host name or address"
    path = parts.path
    segments = path.split("/")[1:] if path else []
    if path and not path.startswith("/"):
        return "the server URL's path is not absolute"
    if any(s in ("", ".", "..") or ";" in s for s in segments[:-1]) or \
            (segments and segments[-1] in (".", "..")) or (segments and ";" in segments[-1]):
        return "the server URL's path has empty, dot or ;-parameter segments"
    return Place(scheme, host, port or DEFAULT_PORT[scheme], path.rstrip("/"))


@dataclass(frozen=True, slots=True)
class McpAllow:
    """One allow-listed MCP server: where it is, its tools and their effects."""

    label: str
    url: str
    at: Place
    tools: Mapping[str, Effect]

    def covers(self, url: object) -> str | None:
        """None when `url` is this server's URL or under it; else why not."""
        got = place(url)
        if isinstance(got, str):
            return got
        want = self.at
        if (got.scheme, got.host, got.port) != (want.scheme, want.host, want.port):
            return f"the server URL is not {self.url}"
        if got.path != want.path and not got.path.startswith(want.path + "/"):
            return f"the server URL is not under {self.url}"
        return None


@dataclass(frozen=True, slots=True)
class ProviderTools:
    mcp_servers: Mapping[str, McpAllow] = field(default_factory=dict)

    def effects(self) -> dict[str, Effect]:
        """The configured MCP tools' effects by canonical name (normal form), for the
        policy's effect table, so `tether explain` and rules see the same effect."""
        return {normalize(mcp_name(provider, s.label, tool)): effect
                for s in self.mcp_servers.values() for tool, effect in s.tools.items()
                for provider in ("openai", "anthropic")}


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def parse_provider_tools(doc: YMap) -> ProviderTools:
    """`provider_tools: {mcp_servers: {LABEL: {url, tools: {NAME: read|write}, allow_http}}}`."""
    node = doc.get("provider_tools")
    if node is None:
        return ProviderTools()
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=doc.file, line=doc.line_of("provider_tools"),
                          key="provider_tools")
    for key in node:
        if key not in PROVIDER_TOOLS.names:
            raise _err(f"unknown key (expected {PROVIDER_TOOLS.expected()})", node, key,
                       "provider_tools")
    servers_node = node.get("mcp_servers")
    if servers_node is None:
        return ProviderTools()
    if not isinstance(servers_node, YMap):
        raise _err("must be a mapping of server labels", node, "mcp_servers", "provider_tools")
    servers: dict[str, McpAllow] = {}
    for label, spec in servers_node.items():
        where = "provider_tools.mcp_servers"
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise _err("a server label is 1-128 letters, digits, _ . and -", servers_node,
                       str(label), where)
        if not isinstance(spec, YMap):
            raise _err("must be a mapping with url and tools", servers_node, label, where)
        where = f"{where}.{label}"
        for key in spec:
            if key not in MCP_ALLOW.names:
                raise _err(f"unknown key (expected one of {MCP_ALLOW.expected()})", spec, key,
                           where)
        allow_http = spec.get("allow_http", False)
        if not isinstance(allow_http, bool):
            raise _err("must be true or false", spec, "allow_http", where)
        url = spec.get("url")
        at = place(url)
        if isinstance(at, str):
            raise _err(at, spec, "url", where)
        if at.scheme == "http" and not allow_http:
            raise _err("must be https (set allow_http: true for a plain-http server)", spec,
                       "url", where)
        tools_node = spec.get("tools")
        if not isinstance(tools_node, YMap) or not tools_node:
            raise _err("must map each tool the provider may call to read or write", spec,
                       "tools", where)
        tools: dict[str, Effect] = {}
        for name, effect in tools_node.items():
            if not isinstance(name, str) or not name or len(name) > 128:
                raise _err("a tool name is a non-empty string", tools_node, str(name),
                           f"{where}.tools")
            if effect not in ("read", "write"):
                raise _err("must be read or write", tools_node, name, f"{where}.tools")
            tools[name] = Effect(effect)
        assert isinstance(url, str)
        servers[label] = McpAllow(label, url, at, tools)
    return ProviderTools(servers)
