"""Every key of the config, section by section: the one place a key is declared.

The section parsers take their allowed keys from these tables (`TABLE.names`); the
reference and the JSON Schema are generated from them (config_reference.py). Rules,
tools and agents may also sit in included files (`INCLUDED`). Plain data, no imports
of the parsers, so any parser may import it.
"""

from __future__ import annotations

from . import config_tables_run as run
from .config_keys import Key, table

ACTIONS = ("allow", "deny", "hold")
FAIL = ("deny", "allow")
EFFECTS = ("read", "write")
ON_DENY = ("continue", "rewrite", "error")

CONDITION = table(
    "match.args.PATH",
    Key("equals", "any", "the value at the path equals this (strings in normal form)"),
    Key("in", "any", "the value is one of this list"),
    Key("not_in", "any", "some value is outside this list, or there is none"),
    Key("matches", "string", "an RE2 pattern that searches the raw text"),
    Key("exists", "boolean", "true: the path holds a value; false: it holds none"),
    Key("gt", "number", "the value (or numeric text) is greater than this"),
    Key("lt", "number", "the value (or numeric text) is less than this"),
)
AFTER = table(
    "match.session.after",
    Key("label", "string|strings", "an earlier call carried one of these labels"),
    Key("tool", "string|strings", "an earlier call was one of these tools (globs)"),
    Key("effect", "string", "an earlier call had this effect", values=EFFECTS),
)
SESSION_MATCH = table(
    "match.session",
    Key("after", "mapping|list", "the session ran such a call before this one (one condition "
        "or a list: any of them)", each=AFTER, required=True),
)
MATCH = table(
    "rules[].match",
    Key("tool", "string|strings", "tool names or globs, matched in normal form"),
    Key("agent", "string|strings", "agent names or globs"),
    Key("effect", "string", "what the call does (an unknown tool counts as write)",
        values=EFFECTS),
    Key("api", "string|strings", "API operations (jira.createIssue, aws.ec2.DeleteVolume; "
        "globs, or a list of them)"),
    Key("args", "map", "dotted argument paths, each mapped to conditions; all must hold",
        each=CONDITION),
    Key("label", "string|strings", "the call carries one of these labels (flows.labels)"),
    Key("session", "mapping", "conditions on the session's earlier calls", keys=SESSION_MATCH),
)
RULE = table(
    "rules[]",
    Key("id", "string", "the rule's name in decisions, audit records and errors",
        required=True),
    Key("description", "string", "what the rule is for", ""),
    Key("match", "mapping", "when the rule applies; every named condition must hold (none: "
        "every call)", keys=MATCH),
    Key("action", "string", "the verdict when it matches; the strictest matching rule wins",
        values=ACTIONS, required=True),
    Key("message", "string", "told to the agent (and the approver) with the verdict", ""),
    Key("on_deny", "string", "how a deny reaches the agent (default: defaults.on_deny)",
        values=ON_DENY),
    Key("approvers", "strings", "who may decide a hold", []),
    Key("timeout", "duration", "a hold waits this long, then denies (default: "
        "approvals.timeout)"),
    Key("mode", "string", "wait or ticket for hold rules; shadow: evaluate and record, never "
        "enforce", "wait", values=("wait", "ticket", "shadow")),
)
TOOL = table(
    "tools.NAME",
    Key("effect", "string", "read or write, for rules on match.effect", values=EFFECTS),
    Key("description", "string", "for people"),
    Key("api", "string", "the API operation that carries the tool out (jira.createIssue, "
        "aws.ec2.DeleteVolume)"),
    Key("args", "map", "API parameter <- tool argument (a dotted path); needs api",
        value="string"),
)
LIMIT_DIMS = (
    Key("tokens", "number", "input plus output tokens"),
    Key("input_tokens", "number", "input tokens"),
    Key("output_tokens", "number", "output tokens"),
    Key("cost_usd", "number", "spend in US dollars (budgets.prices)"),
    Key("llm_calls", "number", "LLM requests"),
)
WINDOW_LIMIT = table(
    "budgets.agent",
    *LIMIT_DIMS,
    Key("per", "string", "the window the limits count over (none: for ever)",
        values=("hour", "day")),
    Key("mode", "string", "shadow: count and report, never refuse", "enforce",
        values=("enforce", "shadow")),
)
AGENT = table(
    "agents.NAME",
    Key("tools", "strings", "the tools (names or globs) this agent may call; others are "
        "denied"),
    Key("description", "string", "for people"),
    Key("budgets", "mapping", "this agent's own windowed limits", keys=WINDOW_LIMIT),
    Key("key_sha256", "strings", "lower-case hex SHA-256 of API keys that identify this "
        "agent", []),
    Key("filter_tools", "boolean", "cut the request's declared tools to the scope (default: "
        "defaults.filter_tools)"),
)
INCLUDED = table(
    "an included file",
    Key("include", "strings", "more rule files, relative to this file", []),
    Key("tools", "map", "tools by name: effect, API link", each=TOOL),
    Key("agents", "map", "agents by name: tool scope, budgets, keys", each=AGENT),
    Key("rules", "list", "the rules", each=RULE),
)
DEFAULTS = table(
    "defaults",
    Key("action", "string", "the verdict when no rule matches", "allow", values=ACTIONS),
    Key("on_error", "string", "the verdict when deciding fails (allow fails open)", "deny",
        values=FAIL),
    Key("undeclared_tools", "string", "a call to a tool the request did not declare", "deny",
        values=FAIL),
    Key("on_store_error", "string", "budgets when the session store is down", "deny",
        values=FAIL),
    Key("filter_tools", "boolean", "cut each request's declared tools to the agent's scope",
        True),
    Key("on_deny", "string", "how a deny reaches the agent (a rule's own on_deny wins)",
        "continue", values=ON_DENY),
    Key("max_continuations", "integer", "answers asked of the model after a denial, per "
        "answer (0 to 10; docs/continuations.md)", 3),
)
SESSION_LIMIT = table(
    "budgets.session",
    *LIMIT_DIMS,
    Key("max_age", "duration", "a session older than this is refused"),
    Key("tools", "map", "calls per session by tool name", value="integer"),
    Key("mode", "string", "shadow: count and report, never refuse", "enforce",
        values=("enforce", "shadow")),
    Key("repeats", "integer", "the same call (tool and arguments) this many times trips the "
        "loop breaker"),
    Key("pingpong", "integer", "two calls alternating this many times trips it"),
    Key("trip", "string", "call: refuse the looping call; session: stop the session", "call",
        values=("call", "session")),
)
PRICE = table(
    "budgets.prices.default",
    Key("input", "number", "USD per million input tokens", required=True),
    Key("output", "number", "USD per million output tokens", required=True),
    open=True,
)
MODEL_PRICE = table(
    "budgets.prices.models[]",
    Key("match", "string", "a model name glob", required=True),
    Key("input", "number", "USD per million input tokens", required=True),
    Key("output", "number", "USD per million output tokens", required=True),
    open=True,
)
PRICES = table(
    "budgets.prices",
    Key("default", "mapping", "the price of a model no entry matches", keys=PRICE),
    Key("models", "list", "prices by model glob, before the shipped table", each=MODEL_PRICE),
    open=True,
)
BUDGETS = table(
    "budgets",
    Key("session", "mapping", "limits per session (per agent and session id)",
        keys=SESSION_LIMIT),
    Key("agent", "mapping", "limits per agent, over a window", keys=WINDOW_LIMIT),
    Key("global", "mapping", "limits for everyone together, over a window", keys=WINDOW_LIMIT),
    Key("max_output_tokens", "integer", "the worst case reserved when a request names no "
        "max_tokens", 4096),
    Key("session_ttl", "duration", "an idle session's counters expire after this", "24h"),
    Key("prices", "mapping", "model prices for cost_usd", keys=PRICES),
)
FLOW_HISTORY = table(
    "flows.history",
    Key("keep", "integer", "calls kept per session", 1000),
    Key("ttl", "duration", "an idle session's history expires after this (default: "
        "budgets.session_ttl)"),
)
FLOWS = table(
    "flows",
    Key("labels", "map", "a label (untrusted, sensitive ...) to the tool names or globs that "
        "carry it", value="string|strings"),
    Key("history", "mapping", "the session history rules read", keys=FLOW_HISTORY),
)
EGRESS = table(
    "egress",
    Key("require_decided_call", "boolean", "a governed write no tool call asked for is "
        "denied", False),
    Key("decided_call_ttl", "duration", "how long an allowed or approved call may be "
        "redeemed", "10m"),
)
API = table(
    "apis.NAME",
    Key("url", "string", "the API's base URL (TETHER_UPSTREAM_NAME overrides it)",
        required=True),
    Key("spec", "string", "its OpenAPI file, YAML or JSON, relative to the config",
        required=True),
    Key("api_key_env", "string", "sent upstream as Authorization: Bearer"),
    Key("effects", "map", "read or write per operationId, over the method's",
        value="string"),
    Key("description", "string", "for people"),
    Key("hosts", "strings", "host names (or *.suffix) judged as this API in forward mode "
        "(default: the url's host)"),
)
MCP = table(
    "mcp.NAME",
    Key("url", "string", "the server's Streamable HTTP endpoint", required=True),
    Key("api_key_env", "string", "sent upstream as Authorization: Bearer"),
    Key("description", "string", "for people"),
    Key("deny_as", "string", "a denied call answers a tool result with isError, or a "
        "JSON-RPC error", "result", values=("result", "error")),
)
MCP_ALLOW = table(
    "provider_tools.mcp_servers.LABEL",
    Key("url", "string", "the server URL requests may declare (or one under it)",
        required=True),
    Key("tools", "map", "its tools, each read or write", value="string"),
    Key("allow_http", "boolean", "accept a plain http:// URL", False),
)
PROVIDER_TOOLS = table(
    "provider_tools",
    Key("mcp_servers", "map", "MCP servers a provider may call, by label", each=MCP_ALLOW),
)
LOOKUPS_AWS = table(
    "cloud.lookups.aws",
    Key("tags", "boolean", "EC2: fetch the tags of the resources a call names", False),
    Key("timeout", "duration", "per lookup; one that fails or times out denies", "5s"),
)
LOOKUPS_AZURE = table(
    "cloud.lookups.azure",
    Key("tags", "boolean", "ARM writes: fetch the tags of the resource a call names", False),
    Key("scopes", "strings", "whose tags, any of: resource (args.Tags), resource_group "
        "(args.ResourceGroupTags), subscription (args.SubscriptionTags)", ["resource"]),
    Key("apis", "strings", "the operations looked up (globs; writes only): narrow it to "
        "leave out resource types the Tags API cannot answer for", ["azure.*"]),
    Key("endpoint", "string", "the ARM endpoint tether asks (https; its host must be the "
        "one the call goes to)", "https://management.azure.com"),
    Key("credential", "string", "tether's own identity: the chain (environment, then "
        "workload identity, then managed identity) or one of them", "default",
        values=("default", "environment", "workload_identity", "managed_identity")),
    Key("timeout", "duration", "per lookup, token included; one that fails or times out "
        "denies", "5s"),
)
LOOKUPS_GCP_ENDPOINTS = table(
    "cloud.lookups.gcp.endpoints",
    Key("compute", "string", "GCE (disks, instances, snapshots, images): https://host[:port]",
        "https://compute.googleapis.com"),
    Key("storage", "string", "Cloud Storage (buckets): https://host[:port]",
        "https://storage.googleapis.com"),
    Key("container", "string", "GKE (clusters): https://host[:port]",
        "https://container.googleapis.com"),
)
LOOKUPS_GCP = table(
    "cloud.lookups.gcp",
    Key("labels", "boolean", "writes on GCE disks, instances, snapshots, images, GKE clusters "
        "and Cloud Storage buckets: fetch the resource's labels (args.Tags)", False),
    Key("timeout", "duration", "per lookup, token included; one that fails or times out "
        "denies", "5s"),
    Key("endpoints", "mapping", "where tether asks, by API (never the host the call goes to)",
        keys=LOOKUPS_GCP_ENDPOINTS),
)
LOOKUPS = table(
    "cloud.lookups",
    Key("aws", "mapping", "AWS lookups", keys=LOOKUPS_AWS),
    Key("azure", "mapping", "Azure Resource Manager lookups", keys=LOOKUPS_AZURE),
    Key("gcp", "mapping", "Google Cloud lookups", keys=LOOKUPS_GCP),
)
CLOUD = table(
    "cloud",
    Key("effects", "map", "read or write by api name or glob, over the built-in catalog",
        value="string"),
    Key("lookups", "mapping", "facts tether fetches before judging a cloud call",
        keys=LOOKUPS),
)
TOP = table(
    "the config file",
    Key("upstreams", "map", "LLM providers by name (openai, azure, anthropic, bedrock, "
        "gemini): where requests go, how tether authenticates", each=run.UPSTREAM),
    Key("include", "strings", "more files of rules, tools and agents, relative to this file",
        []),
    Key("defaults", "mapping", "what applies when no rule decides", keys=DEFAULTS),
    Key("agents", "map", "agents by name: tool scope, budgets, keys", each=AGENT),
    Key("tools", "map", "tools by name: effect, API link", each=TOOL),
    Key("rules", "list", "the rules; every matching rule counts and the strictest wins",
        each=RULE),
    Key("audit", "mapping", "the audit log and where it is shipped", keys=run.AUDIT),
    Key("admin", "mapping", "the admin port's token", keys=run.ADMIN),
    Key("server", "mapping", "listen addresses, ports and connection limits", keys=run.SERVER),
    Key("limits", "mapping", "size and time limits per request", keys=run.LIMITS),
    Key("identity", "mapping", "how sessions and agents are named", keys=run.IDENTITY),
    Key("budgets", "mapping", "tokens, cost, calls and loops per session, agent and "
        "everyone", keys=BUDGETS),
    Key("store", "string", "where sessions and holds live: memory or a redis:// URL "
        "(TETHER_STORE overrides it)", "memory"),
    Key("approvals", "mapping", "holds: how long, how many", keys=run.APPROVALS),
    Key("slack", "mapping", "approvals in Slack", keys=run.SLACK),
    Key("apis", "map", "tool APIs by name, governed by OpenAPI allow-lists", each=API),
    Key("forward", "mapping", "the HTTP_PROXY and transparent listeners", keys=run.FORWARD),
    Key("mcp", "map", "MCP servers behind tether, by name", each=MCP),
    Key("cloud", "mapping", "cloud APIs (AWS, Azure, GCP) called through the forward proxy",
        keys=CLOUD),
    Key("auth", "mapping", "agent identity from tokens", keys=run.AUTH),
    Key("opa", "mapping", "ask Open Policy Agent too", keys=run.OPA),
    Key("telemetry", "mapping", "how traces are spelled", keys=run.TELEMETRY),
    Key("provider_tools", "mapping", "tools the LLM provider runs itself", keys=PROVIDER_TOOLS),
    Key("flows", "mapping", "labels on tools and the session history rules read", keys=FLOWS),
    Key("egress", "mapping", "linking API requests to the tool calls that asked for them",
        keys=EGRESS),
)
