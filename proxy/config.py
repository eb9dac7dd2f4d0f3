"""The config file: read once at start, checked completely, compiled to values.

This module reads files and the environment (upstream overrides, keys are only
*named* here); what it produces is plain data for the sans-IO core. Every error
is a `ConfigError` with file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .approvals.settings import ApprovalSettings, SlackSettings, parse_approvals, parse_slack
from .audit.settings import AuditSettings, parse_audit
from .audit.shipping_settings import ShippingSettings, parse_shipping
from .auth.settings import AuthSettings, load_warnings, parse_auth
from .config_nodes import as_map, check_keys, err, port
from .errors import ConfigError
from .forward.lookup_settings import LookupSettings, parse_lookups
from .forward.settings import ForwardSettings, parse_forward
from .model import Action, Effect, OnDeny
from .opa.settings import OpaSettings, parse_opa
from .policy.apis_config import Apis, ToolLink, parse_apis
from .policy.cloud import CloudCatalog
from .policy.cloud_config import parse_cloud
from .policy.engine import DEFAULT_CONTINUATIONS, DEFAULT_ON_DENY, AgentScope, Policy
from .policy.flows_config import load_flows
from .policy.mcp import McpServers, parse_mcp
from .policy.names import normalize
from .policy.provider_tools import ProviderTools, parse_provider_tools
from .policy.rules import Rule, _glob, compile_rule
from .policy.source import YMap, load_yaml
from .policy.tool_apis import ToolApis, is_cloud_ref, parse_tool_apis
from .providers.held import DEFAULT_MAX_ARGUMENTS
from .server_settings import KEYS as SERVER_LIMIT_KEYS
from .server_settings import ServerLimits, parse_server_limits
from .sessions.budgets import Budgets, parse_budgets
from .telemetry_settings import TelemetrySettings, parse_telemetry
from .upstreams import Upstream as Upstream
from .upstreams import parse_upstreams

TOP_KEYS = {
    "upstreams", "include", "defaults", "agents", "tools", "rules", "audit", "admin",
    "server", "limits", "identity", "budgets", "store", "approvals", "slack", "apis",
    "forward", "mcp", "cloud", "auth", "opa", "telemetry", "provider_tools", "flows",
    "egress",  # linked calls (policy/tool_apis.py)
}
# Keys of the design that later versions enforce. Accepted so one config serves
# every version, but never silently: each one loaded unenforced is a warning.
NOT_YET: set[str] = set()
INCLUDE_KEYS = {"rules", "tools", "agents"}
# Keys that say how this process runs, not what it decides: left out of the policy
# revision, so replicas that differ only in ports, audit path or store still agree on it
# (approval tickets are bound to the revision).
OPERATIONAL_KEYS = {"server", "audit", "admin", "limits", "store", "slack", "telemetry",
                    "upstreams", "approvals"}
DEFAULT_MAX_BODY = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    policy: Policy
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9090
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_response_bytes: int = 64 * 1024 * 1024
    # One tool call's arguments; in a stream, what is held back for the client at once.
    max_arguments_bytes: int = DEFAULT_MAX_ARGUMENTS
    upstream_timeout_s: float = 600.0
    # Connection timeouts and limits, and the SIGTERM drain (`server:`, server_settings.py).
    connections: ServerLimits = field(default_factory=ServerLimits)
    audit_path: str | None = "audit.jsonl"
    audit: AuditSettings = field(default_factory=AuditSettings)
    audit_shipping: ShippingSettings = field(default_factory=ShippingSettings)  # sinks, spool
    admin_token_env: str = "TETHER_ADMIN_TOKEN"
    trust_identity_headers: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    store_url: str = "memory"
    on_store_error: Action = Action.DENY
    agent_keys: Mapping[str, str] = field(default_factory=dict)  # sha256(key) -> agent
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)
    slack: SlackSettings | None = None
    apis: Apis = field(default_factory=Apis)
    mcp: McpServers = field(default_factory=McpServers)
    provider_tools: ProviderTools = field(default_factory=ProviderTools)  # MCP allow-list
    tool_apis: ToolApis = field(default_factory=ToolApis)  # tools carried out by API operations
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    cloud: CloudCatalog | None = None      # None: the built-in catalog
    lookups: LookupSettings = field(default_factory=LookupSettings)  # cloud.lookups
    opa: OpaSettings | None = None         # None: no OPA is asked
    auth: AuthSettings = field(default_factory=AuthSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    source: str | None = None
    warnings: tuple[str, ...] = ()
    # Every file the policy was read from, as named (not resolved: a kubelet `..data`
    # swap changes what they point at); the reload watcher polls them (proxy/reload.py).
    files: tuple[str, ...] = ()
    # No rule and no written `defaults.action`: every call is allowed. A reload to such a
    # config is refused (an emptied ConfigMap must not open the gate); check/serve warn.
    open_gate: bool = False


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError("not UTF-8 text", file=str(path)) from e


def _load_doc(path: Path) -> tuple[YMap, str]:
    text = _read(path)
    doc = load_yaml(text, str(path))
    if doc is None:
        doc = YMap()
        doc.line, doc.key_lines, doc.file = 1, {}, str(path)
    if not isinstance(doc, YMap):
        raise ConfigError("the file must hold a YAML mapping", file=str(path), line=1)
    return doc, text


class _Builder:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.rule_where: dict[str, str] = {}
        self.effects: dict[str, Effect] = {}
        self.agents: dict[str, AgentScope] = {}
        self.agent_nodes: dict[str, object] = {}
        self.agent_keys: dict[str, str] = {}
        self.texts: list[str] = []
        self.seen: set[Path] = set()
        self.tool_links: list[ToolLink] = []
        self.tool_api_specs: list[tuple[str, YMap]] = []  # `tools.X` with `api:` (tool_apis.py)
        self.files: list[str] = []  # as named, for the reload watcher (Config.files)

    def add_rules(self, doc: YMap) -> None:
        items = doc.get("rules")
        if items is None:
            return
        if not isinstance(items, list):
            raise err("rules must be a list", doc, "rules")
        for i, raw in enumerate(items):
            rule = compile_rule(raw, doc.file, doc.line_of("rules") + i)
            if rule.id in self.rule_where:
                raise ConfigError(
                    f"duplicate rule id (first defined at {self.rule_where[rule.id]})",
                    file=rule.file, line=rule.line, rule_id=rule.id, key="id",
                )
            self.rule_where[rule.id] = f"{rule.file}:{rule.line}"
            self.rules.append(rule)

    def add_tools(self, doc: YMap) -> None:
        tools = as_map(doc.get("tools"), doc, "tools")
        for name, spec in tools.items():
            spec = as_map(spec, tools, name)
            check_keys(spec, {"effect", "description", "api", "args"}, f"tools.{name}")
            if "args" in spec and "api" not in spec:
                raise err("args maps a tool's arguments to its api's; name the api too", spec,
                          "args", f"tools.{name}")
            if "api" in spec:
                if not isinstance(spec["api"], str):
                    raise err("api names an operation, like jira.createIssue", spec, "api")
                self.tool_links.append(ToolLink(normalize(name), spec["api"], spec.file,
                                                spec.line_of("api")))
                self.tool_api_specs.append((name, spec))
            if "effect" in spec:
                try:
                    self.effects[normalize(name)] = Effect(spec["effect"])
                except ValueError:
                    raise err("effect must be read or write", spec, "effect") from None

    def add_agents(self, doc: YMap) -> None:
        agents = as_map(doc.get("agents"), doc, "agents")
        for name, spec in agents.items():
            spec = as_map(spec, agents, name)
            check_keys(spec, {"tools", "description", "budgets", "key_sha256", "filter_tools"},
                       f"agents.{name}")
            self.agent_nodes[name] = spec
            hashes = spec.get("key_sha256", [])
            if not isinstance(hashes, list) or not all(
                    isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)
                    for h in hashes):
                raise err("must be a list of lower-case hex SHA-256 digests of API keys",
                           spec, "key_sha256", f"agents.{name}")
            for h in hashes:
                if h in self.agent_keys and self.agent_keys[h] != name:
                    raise err(f"this key already names agent {self.agent_keys[h]!r}", spec,
                               "key_sha256", f"agents.{name}")
                self.agent_keys[h] = name
            if "tools" in spec:
                globs = spec["tools"]
                if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
                    raise err("tools must be a list of tool names or globs", spec, "tools")
                filter_tools = spec.get("filter_tools")
                if filter_tools is not None and not isinstance(filter_tools, bool):
                    raise err("must be true or false", spec, "filter_tools", f"agents.{name}")
                self.agents[name] = AgentScope(tuple(_glob(g) for g in globs), tuple(globs),
                                               filter_tools)

    def include(self, doc: YMap, base: Path, named: Path | None = None) -> None:
        """`named`: `base` as the includer named it (symlinks unresolved), for Config.files."""
        named = base if named is None else named
        items = doc.get("include", [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise err("include must be a list of file paths", doc, "include")
        for item in items:
            path = (base / item).resolve()
            if path in self.seen:
                raise err(f"{item} is included twice (or includes itself)", doc, "include")
            self.seen.add(path)
            self.files.append(str(named / item))
            sub, text = _load_doc(path)
            self.texts.append(text)
            check_keys(sub, INCLUDE_KEYS | {"include"}, "an included file")
            self.add_tools(sub)
            self.add_agents(sub)
            self.add_rules(sub)
            self.include(sub, path.parent, (named / item).parent)


def _policy_text(doc: YMap) -> str:
    """The main file as the policy revision sees it: every key but the operational ones,
    canonical (key order and formatting do not change the revision)."""
    policy = {k: v for k, v in doc.items() if k not in OPERATIONAL_KEYS}
    return json.dumps(policy, sort_keys=True, default=str, ensure_ascii=False)


def _action(value: object, node: YMap, key: str, allowed: tuple[Action, ...]) -> Action:
    try:
        action = Action(str(value))
    except ValueError:
        action = None
    if action not in allowed:
        raise err(f"must be one of {', '.join(a.value for a in allowed)}", node, key,
                   "defaults")
    assert action is not None
    return action


def _on_deny(defaults: YMap) -> tuple[OnDeny, int]:
    """`defaults.on_deny` (continue | rewrite | error; a rule's own `on_deny` wins) and
    `defaults.max_continuations`, the bound on the answers tether asks the model for after
    a denial, per answer the agent gets (0: never continue). docs/continuations.md."""
    try:
        on_deny = OnDeny(str(defaults.get("on_deny", DEFAULT_ON_DENY.value)))
    except ValueError:
        raise err("must be one of continue, rewrite, error", defaults, "on_deny",
                  "defaults") from None
    bound = defaults.get("max_continuations", DEFAULT_CONTINUATIONS)
    if not isinstance(bound, int) or isinstance(bound, bool) or not 0 <= bound <= 10:
        raise err("must be a whole number from 0 to 10", defaults, "max_continuations",
                  "defaults")
    return on_deny, bound


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    file = Path(path)
    doc, text = _load_doc(file)
    warnings: list[str] = []
    for key in doc:
        if key in NOT_YET:
            warnings.append(
                f"{doc.file}:{doc.line_of(key)}: {key}: not enforced by this version of tether"
            )
        elif key not in TOP_KEYS:
            raise err(f"unknown top-level key (expected one of "
                       f"{', '.join(sorted(TOP_KEYS | NOT_YET))})", doc, key)

    builder = _Builder()
    builder.files.append(str(file))
    builder.seen.add(file.resolve())
    builder.texts.append(_policy_text(doc))
    builder.add_tools(doc)
    builder.add_agents(doc)
    builder.include(doc, file.parent)
    builder.add_rules(doc)

    defaults = as_map(doc.get("defaults"), doc, "defaults")
    check_keys(defaults, {"action", "on_error", "undeclared_tools", "on_store_error",
                          "filter_tools", "on_deny", "max_continuations"}, "defaults")
    filter_tools = defaults.get("filter_tools", True)
    if not isinstance(filter_tools, bool):
        raise err("must be true or false", defaults, "filter_tools", "defaults")
    default_action = _action(defaults.get("action", "allow"), defaults, "action", tuple(Action))
    on_error = _action(defaults.get("on_error", "deny"), defaults, "on_error",
                       (Action.DENY, Action.ALLOW))
    undeclared = _action(defaults.get("undeclared_tools", "deny"), defaults, "undeclared_tools",
                         (Action.DENY, Action.ALLOW))
    on_store_error = _action(defaults.get("on_store_error", "deny"), defaults, "on_store_error",
                             (Action.DENY, Action.ALLOW))
    if on_store_error is Action.ALLOW:
        warnings.append(f"{doc.file}: defaults.on_store_error is allow: budgets fail OPEN "
                        "when the session store is down")
    if on_error is Action.ALLOW:
        warnings.append(f"{doc.file}: defaults.on_error is allow: internal errors fail OPEN")
    on_deny, max_continuations = _on_deny(defaults)
    # Nothing that could refuse a call: no rule, no written default, no OPA, no tool scope.
    open_gate = (not builder.rules and "action" not in defaults and "opa" not in doc
                 and not builder.agents)
    if open_gate:
        warnings.append(f"{doc.file}: no rules and no defaults.action: every tool call is "
                        "allowed (write `defaults: {action: allow}` if that is meant; a reload "
                        "to such a config is refused)")

    server = as_map(doc.get("server"), doc, "server")
    check_keys(server, {"host", "port", "admin_port", *SERVER_LIMIT_KEYS}, "server")
    limits = as_map(doc.get("limits"), doc, "limits")
    check_keys(limits, {"max_body_bytes", "max_response_bytes", "max_arguments_bytes",
                        "upstream_timeout"}, "limits")
    audit = as_map(doc.get("audit"), doc, "audit")
    check_keys(audit, {"path", "max_bytes", "keep", "fsync", "fsync_interval", "redact",
                       "instance", "sign", "sinks", "spool"}, "audit")
    admin = as_map(doc.get("admin"), doc, "admin")
    check_keys(admin, {"token_env"}, "admin")
    identity = as_map(doc.get("identity"), doc, "identity")
    check_keys(identity, {"trust_headers"}, "identity")

    def positive_int(node: YMap, key: str, default: int) -> int:
        value = node.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise err("must be a positive whole number", node, key)
        return value

    audit_path = audit.get("path", "audit.jsonl")
    if audit_path is not None and not isinstance(audit_path, str):
        raise err("path must be a file path", audit, "path")
    if isinstance(audit_path, str):
        audit_path = os.path.normpath(file.parent / audit_path) if not Path(audit_path).is_absolute() \
            else audit_path
    audit_settings = parse_audit(audit)
    audit_shipping = parse_shipping(audit, file.parent)
    trust = identity.get("trust_headers", True)
    if not isinstance(trust, bool):
        raise err("must be true or false", identity, "trust_headers")
    host = server.get("host", "127.0.0.1")
    if not isinstance(host, str):
        raise err("must be a host name or address", server, "host")
    token_env = admin.get("token_env", "TETHER_ADMIN_TOKEN")
    if not isinstance(token_env, str):
        raise err("names an environment variable", admin, "token_env")
    timeout = limits.get("upstream_timeout", 600)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise err("must be a number of seconds", limits, "upstream_timeout")

    budgets_node = doc.get("budgets")
    if budgets_node is not None and not isinstance(budgets_node, YMap):
        raise err("must be a mapping", doc, "budgets")
    budgets = parse_budgets(budgets_node, builder.agent_nodes)
    store_url = doc.get("store", "memory")
    if not isinstance(store_url, str) or not (
            store_url == "memory" or store_url.startswith(("redis://", "rediss://", "unix://"))):
        raise err("must be memory or a redis:// URL", doc, "store")
    store_url = env.get("TETHER_STORE", store_url)

    # Tools linked to cloud operations (aws.ec2.DeleteVolume) are tool_apis.py's to check.
    api_names = tuple(doc["apis"]) if isinstance(doc.get("apis"), YMap) else ()
    def read_spec(spec: Path) -> str:
        builder.files.append(str(spec))
        return _read(spec)

    apis = parse_apis(doc, file.parent, env, read_spec,
                      [t for t in builder.tool_links if not is_cloud_ref(t.ref, api_names)],
                      builder.rules)
    builder.texts.extend(apis.texts)
    tool_apis = parse_tool_apis(doc, builder.tool_api_specs, apis,
                                parse_cloud(doc.get("cloud"), doc))
    builder.effects = {**tool_apis.effects, **apis.effects, **builder.effects}
    opa = parse_opa(doc.get("opa"), doc, file.parent, env)
    builder.texts.extend(opa.texts if opa else ())
    provider_tools = parse_provider_tools(doc)
    builder.effects = {**provider_tools.effects(), **builder.effects}
    revision = hashlib.sha256("\0".join(builder.texts).encode()).hexdigest()[:12]
    policy = Policy(
        rules=tuple(builder.rules),
        default_action=default_action,
        on_error=on_error,
        undeclared_tools=undeclared,
        filter_tools=filter_tools,
        agents=builder.agents,
        effects=builder.effects,
        revision=revision,
        flows=load_flows(doc, builder.rules),
        on_deny=on_deny,
        max_continuations=max_continuations,
    )
    upstreams = parse_upstreams(doc, env, file.parent)
    forward = parse_forward(doc.get("forward"), doc, file.parent)
    auth = parse_auth(doc.get("auth"), doc, file.parent)
    warnings.extend(load_warnings(auth, upstreams, forward, str(doc.file)))
    return Config(
        policy=policy,
        upstreams=upstreams,
        host=host,
        port=port(server.get("port", 8080), server, "port"),
        admin_port=port(server.get("admin_port", 9090), server, "admin_port"),
        max_body_bytes=positive_int(limits, "max_body_bytes", DEFAULT_MAX_BODY),
        max_response_bytes=positive_int(limits, "max_response_bytes", 64 * 1024 * 1024),
        max_arguments_bytes=positive_int(limits, "max_arguments_bytes", DEFAULT_MAX_ARGUMENTS),
        upstream_timeout_s=float(timeout),
        connections=parse_server_limits(server),
        audit_path=audit_path,
        audit=audit_settings,
        audit_shipping=audit_shipping,
        admin_token_env=token_env,
        trust_identity_headers=trust,
        budgets=budgets,
        store_url=store_url,
        on_store_error=on_store_error,
        agent_keys=builder.agent_keys,
        approvals=parse_approvals(doc.get("approvals"), doc),
        slack=parse_slack(doc.get("slack"), doc, env),
        apis=apis,
        mcp=parse_mcp(doc, env),
        provider_tools=provider_tools,
        tool_apis=tool_apis,
        forward=forward,
        auth=auth,
        cloud=parse_cloud(doc.get("cloud"), doc),
        lookups=parse_lookups(doc.get("cloud")),
        opa=opa,
        telemetry=parse_telemetry(doc.get("telemetry"), doc),
        source=str(file),
        warnings=tuple(warnings),
        files=tuple(dict.fromkeys(builder.files)),
        open_gate=open_gate,
    )
