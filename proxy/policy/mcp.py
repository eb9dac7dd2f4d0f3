"""MCP servers behind tether: their configuration, and the JSON-RPC messages sent to them.

Sans-IO. An agent POSTs JSON-RPC to an MCP server (Streamable HTTP); tether
must know, before a byte goes upstream, which messages are `tools/call` and
what they call, and must refuse what it cannot read unambiguously (a parse
error, a duplicate key, a batch where the protocol version has none, a lone
UTF-16 surrogate in a `tools/call`'s params) rather than let the server read it
another way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..config_tables import MCP
from ..errors import ConfigError
from ..model import Decision, ToolCall
from ..providers.arguments import parse_arguments
from ..surrogates import find, json_bytes, may_hold
from .source import YMap

MCP_KEYS = MCP.names  # documented in config_tables.py
DENY_AS = ("result", "error")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
# Implementation-defined band (-32000..-32019): -32000 and -32001 are the SDK's own
# (connection closed, timeout) and -32002 is retired, so a deny is -32003.
DENIED = -32003
# Batches exist in 2025-03-26 only; a request without the version header is taken
# as that version, as the spec tells servers to.
BATCH_VERSIONS = frozenset({"2025-03-26"})
DEFAULT_VERSION = "2025-03-26"


@dataclass(frozen=True, slots=True)
class McpServer:
    name: str
    url: str                         # the server's endpoint, no trailing slash
    api_key_env: str | None = None
    # How a denied tools/call is answered: "result", a tool result with `isError: true` whose
    # text the model reads (the MCP spec's place for errors the model should see); "error",
    # a JSON-RPC error (-32003), which clients such as the OpenAI Agents SDK hide from it.
    deny_as: str = "result"

    @property
    def provider(self) -> str:
        """The provider name in audit records and metrics."""
        return f"mcp:{self.name}"


@dataclass(frozen=True, slots=True)
class McpServers:
    servers: Mapping[str, McpServer] = field(default_factory=dict)

    def get(self, name: str) -> McpServer | None:
        return self.servers.get(name)


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def parse_mcp(doc: YMap, env: Mapping[str, str]) -> McpServers:
    """`mcp: {NAME: {url, api_key_env}}`; `TETHER_UPSTREAM_<NAME>` overrides the url."""
    node = doc.get("mcp")
    if node is None:
        return McpServers()
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping of MCP server names to {url}", file=doc.file,
                          line=doc.line_of("mcp"), key="mcp")
    servers: dict[str, McpServer] = {}
    for name, spec in node.items():
        where = f"mcp.{name}"
        if not _NAME.fullmatch(name):
            raise _err("an MCP server name is letters, digits, _ and -", node, name, "mcp")
        if not isinstance(spec, YMap):
            raise _err("must be a mapping with url", node, name, "mcp")
        for key in spec:
            if key not in MCP_KEYS:
                raise _err(f"unknown key (expected one of {', '.join(sorted(MCP_KEYS))})",
                           spec, key, where)
        url = spec.get("url")
        if not isinstance(url, str):
            raise _err("url is required (the server's Streamable HTTP endpoint)", spec, "url",
                       where)
        url = (env.get(f"TETHER_UPSTREAM_{name.upper().replace('-', '_')}") or url).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise _err(f"{url!r} is not an http(s) endpoint URL", spec, "url", where)
        key_env = spec.get("api_key_env")
        if key_env is not None and not isinstance(key_env, str):
            raise _err("names an environment variable", spec, "api_key_env", where)
        deny_as = spec.get("deny_as", "result")
        if deny_as not in DENY_AS:
            raise _err("must be result (a tool result with isError, which the model reads) or "
                       "error (a JSON-RPC error)", spec, "deny_as", where)
        servers[name] = McpServer(name, url, key_env, str(deny_as))
    return McpServers(servers)


class RpcRefused(Exception):
    """The body is not JSON-RPC tether can read unambiguously; nothing is forwarded."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message. `rpc_id` is the id exactly as sent (None: a notification
    or a response); `call` is set for `tools/call`."""

    method: str | None
    rpc_id: str | int | None
    call: ToolCall | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    messages: tuple[Message, ...]
    batch: bool

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(m.call for m in self.messages if m.call is not None)


def _pairs(items: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in items:
        if key in out:
            raise RpcRefused(INVALID_REQUEST, f"duplicate key {key!r}: the message is ambiguous")
        out[key] = value
    return out


def parse_body(body: bytes, version: str | None) -> Envelope:
    """The messages of one POST body. Raises `RpcRefused` for the whole body: one bad
    element of a batch refuses the batch, since the server would still run the rest."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_pairs)
    except RpcRefused:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RpcRefused(PARSE_ERROR, "the body is not valid JSON") from None
    if isinstance(doc, list):
        version = version or DEFAULT_VERSION
        if version not in BATCH_VERSIONS:
            raise RpcRefused(INVALID_REQUEST,
                             f"JSON-RPC batches are not part of MCP protocol version {version}")
        if not doc:
            raise RpcRefused(INVALID_REQUEST, "an empty batch")
        suspect = may_hold(body)
        return Envelope(tuple(_message(item, i, suspect) for i, item in enumerate(doc)),
                        batch=True)
    return Envelope((_message(doc, 0, may_hold(body)),), batch=False)


def _message(doc: object, index: int, suspect: bool = False) -> Message:
    """`suspect`: the body could hold a lone surrogate (surrogates.may_hold)."""
    if not isinstance(doc, dict):
        raise RpcRefused(INVALID_REQUEST, "a JSON-RPC message is an object")
    if doc.get("jsonrpc") != "2.0":
        raise RpcRefused(INVALID_REQUEST, 'a JSON-RPC message has "jsonrpc": "2.0"')
    rpc_id = doc.get("id")
    if "id" in doc and (isinstance(rpc_id, bool) or not isinstance(rpc_id, str | int)):
        raise RpcRefused(INVALID_REQUEST, "an id is a string or an integer")
    method = doc.get("method")
    if method is None:
        if "id" not in doc or ("result" in doc) == ("error" in doc):
            raise RpcRefused(INVALID_REQUEST, "a message without a method is a response: "
                             "it has an id and one of result or error")
        return Message(None, None)             # the client answering a server's request
    if not isinstance(method, str):
        raise RpcRefused(INVALID_REQUEST, "method is a string")
    if "params" in doc and not isinstance(doc["params"], dict):
        raise RpcRefused(INVALID_REQUEST, "params is an object")
    rpc_id = rpc_id if "id" in doc else None
    if method != "tools/call":
        return Message(method, rpc_id)
    if rpc_id is None:
        raise RpcRefused(INVALID_REQUEST, "tools/call is a request: it needs an id")
    params = doc.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str) \
            or not params["name"]:
        raise RpcRefused(INVALID_PARAMS, "tools/call names its tool in params.name")
    where = find(params) if suspect else None
    if where is not None:
        raise RpcRefused(INVALID_PARAMS, f"tools/call params hold an unpaired UTF-16 surrogate "
                                         f"(\\ud800-\\udfff) at {where}, which is not text")
    return Message(method, rpc_id, _tool_call(params, rpc_id, index))


def _tool_call(params: dict[str, object], rpc_id: str | int, index: int) -> ToolCall:
    """The call as the policy sees it. The arguments are re-serialised only to be
    parsed by the one strict argument parser; what is forwarded is the body as sent."""
    name = str(params["name"])
    raw = params.get("arguments", {})
    if not isinstance(raw, dict):
        return ToolCall(id=str(rpc_id), name=name, raw_arguments=json.dumps(raw),
                        arguments=None, index=index,
                        problem="params.arguments is not a JSON object")
    text = json.dumps(raw, ensure_ascii=False)
    args, problem = parse_arguments(text)
    return ToolCall(id=str(rpc_id), name=name, raw_arguments=text, arguments=args,
                    index=index, problem=problem)


def error_object(rpc_id: str | int | None, code: int, message: str,
                 data: Mapping[str, object] | None = None) -> dict[str, object]:
    error: dict[str, object] = {"code": code, "message": message}
    if data is not None:
        error["data"] = dict(data)
    return {"jsonrpc": "2.0", "id": rpc_id, "error": error}


def denied_object(message: Message, decision: Decision, rule: str | None,
                  as_result: bool = True) -> dict[str, object]:
    """A denied call's answer: a tool result with `isError: true` (the text the model reads,
    with the rules in `_meta`), or with `as_result` False a JSON-RPC error (-32003)."""
    call = message.call
    assert call is not None
    text = (f"[tether] The tool call {call.name} was denied by {rule or 'policy'}: "
            f"{decision.message or 'it is not allowed'}. It was not run.")
    data = {"rule": rule, "rules": list(decision.rules), "tool": call.name}
    if not as_result:
        return error_object(message.rpc_id, DENIED, text, data)
    return {"jsonrpc": "2.0", "id": message.rpc_id, "result": {
        "content": [{"type": "text", "text": text}], "isError": True,
        "_meta": {"tether": data}}}


def render(objects: list[dict[str, object]], batch: bool) -> bytes:
    return json_bytes(objects if batch else objects[0])
