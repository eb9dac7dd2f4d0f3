"""The config file: read once at start, checked completely, compiled to values.

This module reads files and the environment (upstream overrides, keys are only
*named* here); what it produces is plain data for the sans-IO core. Every error
is a `ConfigError` with file and line. `load` raises the first; `tether check` hands it a
collecting `Problems` and gets them all (config_check.py). The keys each section accepts
are declared once, in config_tables*.py, which also write the reference and the schema.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .approvals.settings import ApprovalSettings, SlackSettings, parse_approvals, parse_slack
from .audit.settings import AuditSettings, parse_audit
from .audit.shipping_settings import ShippingSettings, parse_shipping
from .auth.settings import AuthSettings, load_warnings, parse_auth
from .config_builder import Builder, Defaults, load_doc, parse_defaults, policy_text, read_text
from .config_keys import Table
from .config_nodes import Problems, as_map, check_keys, err, port
from .config_tables import TOP
from .config_tables_run import ADMIN, AUDIT, IDENTITY, LIMITS, SERVER
from .forward.lookup_settings import LookupSettings, parse_lookups
from .forward.settings import ForwardSettings, parse_forward
from .model import Action
from .opa.settings import OpaSettings, parse_opa
from .policy.apis_config import Apis, parse_apis
from .policy.cloud import CloudCatalog
from .policy.cloud_config import parse_cloud
from .policy.engine import Policy
from .policy.flows import Flows
from .policy.flows_config import load_flows
from .policy.mcp import McpServers, parse_mcp
from .policy.provider_tools import ProviderTools, parse_provider_tools
from .policy.source import YMap
from .policy.tool_apis import ToolApis, is_cloud_ref, parse_tool_apis
from .providers.held import DEFAULT_MAX_ARGUMENTS
from .server_settings import ServerLimits, parse_server_limits
from .sessions.budgets import Budgets, parse_budgets
from .telemetry_settings import TelemetrySettings, parse_telemetry
from .upstreams import Upstream as Upstream
from .upstreams import parse_upstreams

TOP_KEYS = TOP.names  # every key documented in config_tables.py
# Keys of the design that later versions enforce. Accepted so one config serves
# every version, but never silently: each one loaded unenforced is a warning.
NOT_YET: set[str] = set()
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
    declared_tools: tuple[str, ...] = ()  # `tools:` names, normalised (config_lint.py)




def _top_keys(doc: YMap, warnings: list[str], problems: Problems) -> None:
    for key in doc:
        if key in NOT_YET:
            warnings.append(
                f"{doc.file}:{doc.line_of(key)}: {key}: not enforced by this version of tether"
            )
        elif key not in TOP_KEYS:
            problems.add(err(f"unknown top-level key (expected one of "
                             f"{', '.join(sorted(TOP_KEYS | NOT_YET))})", doc, key))


def _section(doc: YMap, key: str, table: Table, problems: Problems) -> YMap:
    """A top-level mapping whose keys are checked here; an empty one when it is wrong."""
    def parse() -> YMap:
        node = as_map(doc.get(key), doc, key)
        check_keys(node, table, key)
        return node

    return problems.run(parse, as_map(None, doc, key))


def _positive_int(node: YMap, key: str, default: int) -> int:
    value = node.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise err("must be a positive whole number", node, key, "limits")
    return value


def _seconds(node: YMap, key: str, default: float) -> float:
    value = node.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise err("must be a number of seconds", node, key, "limits")
    return float(value)


def _string(node: YMap, key: str, default: str, message: str, section: str) -> str:
    value = node.get(key, default)
    if not isinstance(value, str):
        raise err(message, node, key, section)
    return value


def _audit_path(audit: YMap, base: Path) -> str | None:
    path = audit.get("path", "audit.jsonl")
    if path is not None and not isinstance(path, str):
        raise err("path must be a file path", audit, "path")
    if isinstance(path, str) and not Path(path).is_absolute():
        return os.path.normpath(base / path)
    return path


def _store(doc: YMap, env: Mapping[str, str]) -> str:
    url = doc.get("store", "memory")
    if not isinstance(url, str) or not (
            url == "memory" or url.startswith(("redis://", "rediss://", "unix://"))):
        raise err("must be memory or a redis:// URL", doc, "store")
    return env.get("TETHER_STORE", url)


def _bool(node: YMap, key: str, default: bool) -> bool:
    value = node.get(key, default)
    if not isinstance(value, bool):
        raise err("must be true or false", node, key, "identity")
    return value


def _open_gate_warnings(doc: YMap, d: Defaults, builder: Builder,
                        failed: bool = False) -> tuple[bool, list[str]]:
    out = []
    if d.on_store_error is Action.ALLOW:
        out.append(f"{doc.file}: defaults.on_store_error is allow: budgets fail OPEN "
                   "when the session store is down")
    if d.on_error is Action.ALLOW:
        out.append(f"{doc.file}: defaults.on_error is allow: internal errors fail OPEN")
    # Nothing that could refuse a call: no rule, no written default, no OPA, no tool scope.
    open_gate = (not builder.rules and not d.written_action and "opa" not in doc
                 and not builder.agents)
    if open_gate and not failed:   # rules that failed to load are errors, not an open gate
        out.append(f"{doc.file}: no rules and no defaults.action: every tool call is "
                   "allowed (write `defaults: {action: allow}` if that is meant; a reload "
                   "to such a config is refused)")
    return open_gate, out


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
         problems: Problems | None = None) -> Config:
    """The first error raises, unless `problems` collects them (`check`)."""
    env = os.environ if env is None else env
    p = Problems() if problems is None else problems
    file = Path(path)
    doc, _ = load_doc(file)
    warnings: list[str] = []
    _top_keys(doc, warnings, p)

    builder = Builder(p)
    builder.files.append(str(file))
    builder.seen.add(file.resolve())
    builder.texts.append(policy_text(doc))
    builder.add_tools(doc)
    builder.add_agents(doc)
    builder.include(doc, file.parent)
    builder.add_rules(doc)
    d = parse_defaults(doc, p)
    open_gate, more = _open_gate_warnings(doc, d, builder, failed=bool(p.errors))
    warnings += more

    server = _section(doc, "server", SERVER, p)
    limits = _section(doc, "limits", LIMITS, p)
    audit = _section(doc, "audit", AUDIT, p)
    admin = _section(doc, "admin", ADMIN, p)
    identity = _section(doc, "identity", IDENTITY, p)
    base = Config(policy=Policy(rules=()))

    budgets_node = doc.get("budgets")
    if budgets_node is not None and not isinstance(budgets_node, YMap):
        p.add(err("must be a mapping", doc, "budgets"))
        budgets_node = None
    budgets = p.run(lambda: parse_budgets(budgets_node, builder.agent_nodes), Budgets())

    # Tools linked to cloud operations (aws.ec2.DeleteVolume) are tool_apis.py's to check.
    api_names = tuple(doc["apis"]) if isinstance(doc.get("apis"), YMap) else ()
    def read_spec(spec: Path) -> str:
        builder.files.append(str(spec))
        return read_text(spec)

    apis = p.run(lambda: parse_apis(
        doc, file.parent, env, read_spec,
        [t for t in builder.tool_links if not is_cloud_ref(t.ref, api_names)], builder.rules),
        Apis())
    builder.texts.extend(apis.texts)
    cloud = p.run(lambda: parse_cloud(doc.get("cloud"), doc), None)
    tool_apis = p.run(lambda: parse_tool_apis(doc, builder.tool_api_specs, apis, cloud),
                      ToolApis())
    builder.effects = {**tool_apis.effects, **apis.effects, **builder.effects}
    opa = p.run(lambda: parse_opa(doc.get("opa"), doc, file.parent, env), None)
    builder.texts.extend(opa.texts if opa else ())
    provider_tools = p.run(lambda: parse_provider_tools(doc), ProviderTools())
    builder.effects = {**provider_tools.effects(), **builder.effects}
    revision = hashlib.sha256("\0".join(builder.texts).encode()).hexdigest()[:12]
    policy = Policy(
        rules=tuple(builder.rules),
        default_action=d.action,
        on_error=d.on_error,
        undeclared_tools=d.undeclared_tools,
        filter_tools=d.filter_tools,
        agents=builder.agents,
        effects=builder.effects,
        revision=revision,
        flows=p.run(lambda: load_flows(doc, builder.rules), Flows()),
        on_deny=d.on_deny,
        max_continuations=d.max_continuations,
    )
    no_upstreams: dict[str, Upstream] = {}
    upstreams = p.run(lambda: parse_upstreams(doc, env, file.parent), no_upstreams)
    forward = p.run(lambda: parse_forward(doc.get("forward"), doc, file.parent),
                    ForwardSettings())
    auth = p.run(lambda: parse_auth(doc.get("auth"), doc, file.parent), AuthSettings())
    unnamed = forward.transparent_port is not None and forward.transparent_agent is None
    warnings.extend(load_warnings(auth, upstreams, unnamed, str(doc.file)))
    return Config(
        policy=policy,
        upstreams=upstreams,
        host=p.run(lambda: _string(server, "host", "127.0.0.1",
                                   "must be a host name or address", "server"), base.host),
        port=p.run(lambda: port(server.get("port", 8080), server, "port", "server"), base.port),
        admin_port=p.run(lambda: port(server.get("admin_port", 9090), server, "admin_port",
                                      "server"), base.admin_port),
        max_body_bytes=p.run(lambda: _positive_int(limits, "max_body_bytes", DEFAULT_MAX_BODY),
                             DEFAULT_MAX_BODY),
        max_response_bytes=p.run(lambda: _positive_int(limits, "max_response_bytes",
                                                       base.max_response_bytes),
                                 base.max_response_bytes),
        max_arguments_bytes=p.run(lambda: _positive_int(limits, "max_arguments_bytes",
                                                        DEFAULT_MAX_ARGUMENTS),
                                  DEFAULT_MAX_ARGUMENTS),
        upstream_timeout_s=p.run(lambda: _seconds(limits, "upstream_timeout", 600.0), 600.0),
        connections=p.run(lambda: parse_server_limits(server), ServerLimits()),
        audit_path=p.run(lambda: _audit_path(audit, file.parent), None),
        audit=p.run(lambda: parse_audit(audit), AuditSettings()),
        audit_shipping=p.run(lambda: parse_shipping(audit, file.parent), ShippingSettings()),
        admin_token_env=p.run(lambda: _string(admin, "token_env", base.admin_token_env,
                                              "names an environment variable", "admin"),
                              base.admin_token_env),
        trust_identity_headers=p.run(lambda: _bool(identity, "trust_headers", True), True),
        budgets=budgets,
        store_url=p.run(lambda: _store(doc, env), "memory"),
        on_store_error=d.on_store_error,
        agent_keys=builder.agent_keys,
        approvals=p.run(lambda: parse_approvals(doc.get("approvals"), doc),
                        ApprovalSettings()),
        slack=p.run(lambda: parse_slack(doc.get("slack"), doc, env), None),
        apis=apis,
        mcp=p.run(lambda: parse_mcp(doc, env), McpServers()),
        provider_tools=provider_tools,
        tool_apis=tool_apis,
        forward=forward,
        auth=auth,
        cloud=cloud,
        lookups=p.run(lambda: parse_lookups(doc.get("cloud")), LookupSettings()),
        opa=opa,
        telemetry=p.run(lambda: parse_telemetry(doc.get("telemetry"), doc),
                        TelemetrySettings()),
        source=str(file),
        warnings=tuple(warnings),
        files=tuple(dict.fromkeys(builder.files)),
        open_gate=open_gate,
        declared_tools=tuple(builder.declared_tools),
    )
