"""What the fakes check of provider-run tool declarations, as the real APIs do.

The fake Responses and Messages servers refuse (400) a request whose MCP
declarations the real API would refuse, so an end-to-end test cannot pass on a
body tether narrowed into something the provider would reject.
"""

from __future__ import annotations

from typing import Any

Body = dict[str, Any]


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _filter(value: object) -> bool:
    """An OpenAI MCP tool filter: a list of names or {tool_names, read_only}."""
    if _names(value):
        return True
    return (isinstance(value, dict) and not set(value) - {"tool_names", "read_only"}
            and (value.get("tool_names") is None or _names(value["tool_names"]))
            and isinstance(value.get("read_only", False), bool))


def responses_problem(body: Body) -> str | None:
    """Why OpenAI would refuse the request's `mcp` tools, or None."""
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        if not isinstance(tool.get("server_label"), str) or not tool["server_label"]:
            return f"Missing required parameter: 'tools[{i}].server_label'."
        if not isinstance(tool.get("server_url"), str) and "connector_id" not in tool:
            return f"Missing required parameter: 'tools[{i}].server_url'."
        if "allowed_tools" in tool and not _filter(tool["allowed_tools"]):
            return f"Invalid value for 'tools[{i}].allowed_tools'."
        approval = tool.get("require_approval", "always")
        if approval not in ("always", "never") and not (
                isinstance(approval, dict) and approval
                and not set(approval) - {"always", "never"}
                and all(isinstance(v, dict) and _filter(v) for v in approval.values())):
            return f"Invalid value for 'tools[{i}].require_approval'."
    return None


def anthropic_problem(body: Body) -> str | None:
    """Why Anthropic would refuse the request's `mcp_servers` (and `mcp_toolset`s), or None."""
    servers = body.get("mcp_servers")
    names: set[str] = set()
    for i, server in enumerate(servers if isinstance(servers, list) else []):
        if not isinstance(server, dict) or server.get("type") != "url":
            return f"mcp_servers.{i}.type: Input should be 'url'"
        if not isinstance(server.get("url"), str) or not isinstance(server.get("name"), str):
            return f"mcp_servers.{i}: url and name are required"
        if server["name"] in names:
            return f"mcp_servers.{i}.name: MCP server names must be unique"
        names.add(server["name"])
        config = server.get("tool_configuration")
        if config is not None and (not isinstance(config, dict)
                                   or set(config) - {"enabled", "allowed_tools"}
                                   or ("allowed_tools" in config
                                       and not _names(config["allowed_tools"]))):
            return f"mcp_servers.{i}.tool_configuration: invalid"
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, dict) and tool.get("type") == "mcp_toolset" \
                and tool.get("mcp_server_name") not in names:
            return f"tools.{i}.mcp_server_name: no MCP server of that name"
    return None
