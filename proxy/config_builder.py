"""The policy's parts of the config, across the main file and the files it includes:
rules, tools, agents, and `defaults:`. Each rule, tool, agent and included file is
checked on its own, so `tether check` reports every one that is wrong (Problems)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .config_nodes import Problems, as_map, check_keys, err
from .config_tables import AGENT, DEFAULTS, INCLUDED, TOOL
from .errors import ConfigError
from .model import Action, Effect, OnDeny
from .policy.apis_config import ToolLink
from .policy.engine import DEFAULT_CONTINUATIONS, DEFAULT_ON_DENY, AgentScope
from .policy.names import normalize
from .policy.rules import Rule, _glob, compile_rule
from .policy.source import YMap, load_yaml

# Keys that say how this process runs, not what it decides: left out of the policy
# revision, so replicas that differ only in ports, audit path or store still agree on it
# (approval tickets are bound to the revision).
OPERATIONAL_KEYS = {"server", "audit", "admin", "limits", "store", "slack", "telemetry",
                    "upstreams", "approvals"}


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError("not UTF-8 text", file=str(path)) from e


def load_doc(path: Path) -> tuple[YMap, str]:
    text = read_text(path)
    doc = load_yaml(text, str(path))
    if doc is None:
        doc = YMap()
        doc.line, doc.key_lines, doc.file = 1, {}, str(path)
    if not isinstance(doc, YMap):
        raise ConfigError("the file must hold a YAML mapping", file=str(path), line=1)
    return doc, text


def policy_text(doc: YMap) -> str:
    """The main file as the policy revision sees it: every key but the operational ones,
    canonical (key order and formatting do not change the revision)."""
    policy = {k: v for k, v in doc.items() if k not in OPERATIONAL_KEYS}
    return json.dumps(policy, sort_keys=True, default=str, ensure_ascii=False)


class Builder:
    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.rules: list[Rule] = []
        self.rule_where: dict[str, str] = {}
        self.effects: dict[str, Effect] = {}
        self.declared_tools: dict[str, str] = {}  # normalised name -> file:line (lint.py)
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
            self.problems.add(err("rules must be a list", doc, "rules"))
            return
        for i, raw in enumerate(items):
            rule = self.problems.run(
                partial(compile_rule, raw, doc.file, doc.line_of("rules") + i), None)
            if rule is None:
                continue
            if rule.id in self.rule_where:
                self.problems.add(ConfigError(
                    f"duplicate rule id (first defined at {self.rule_where[rule.id]})",
                    file=rule.file, line=rule.line, rule_id=rule.id, key="id",
                ))
                continue
            self.rule_where[rule.id] = f"{rule.file}:{rule.line}"
            self.rules.append(rule)

    def add_tools(self, doc: YMap) -> None:
        tools = self.problems.run(lambda: as_map(doc.get("tools"), doc, "tools"), YMap())
        for name, spec in tools.items():
            self.problems.run(partial(self._tool, tools, name, spec), None)

    def _tool(self, tools: YMap, name: str, spec: object) -> None:
        spec = as_map(spec, tools, name)
        check_keys(spec, TOOL, f"tools.{name}")
        if "args" in spec and "api" not in spec:
            raise err("args maps a tool's arguments to its api's; name the api too", spec,
                      "args", f"tools.{name}")
        effect = None
        if "effect" in spec:
            try:
                effect = Effect(spec["effect"])
            except ValueError:
                raise err("effect must be read or write", spec, "effect") from None
        if "api" in spec:
            if not isinstance(spec["api"], str):
                raise err("api names an operation, like jira.createIssue", spec, "api")
            self.tool_links.append(ToolLink(normalize(name), spec["api"], spec.file,
                                            spec.line_of("api")))
            self.tool_api_specs.append((name, spec))
        if effect is not None:
            self.effects[normalize(name)] = effect
        self.declared_tools.setdefault(normalize(name), f"{tools.file}:{tools.line_of(name)}")

    def add_agents(self, doc: YMap) -> None:
        agents = self.problems.run(lambda: as_map(doc.get("agents"), doc, "agents"), YMap())
        for name, spec in agents.items():
            self.problems.run(partial(self._agent, agents, name, spec), None)

    def _agent(self, agents: YMap, name: str, spec: object) -> None:
        spec = as_map(spec, agents, name)
        check_keys(spec, AGENT, f"agents.{name}")
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
        scope = None
        if "tools" in spec:
            globs = spec["tools"]
            if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
                raise err("tools must be a list of tool names or globs", spec, "tools")
            filter_tools = spec.get("filter_tools")
            if filter_tools is not None and not isinstance(filter_tools, bool):
                raise err("must be true or false", spec, "filter_tools", f"agents.{name}")
            scope = AgentScope(tuple(_glob(g) for g in globs), tuple(globs), filter_tools)
        self.agent_nodes[name] = spec
        for h in hashes:
            self.agent_keys[h] = name
        if scope is not None:
            self.agents[name] = scope

    def include(self, doc: YMap, base: Path, named: Path | None = None) -> None:
        """`named`: `base` as the includer named it (symlinks unresolved), for Config.files."""
        named = base if named is None else named
        items = doc.get("include", [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            self.problems.add(err("include must be a list of file paths", doc, "include"))
            return
        for item in items:
            path = (base / item).resolve()
            if path in self.seen:
                self.problems.add(err(f"{item} is included twice (or includes itself)", doc,
                                      "include"))
                continue
            self.seen.add(path)
            self.files.append(str(named / item))
            try:
                loaded = load_doc(path)
            except ConfigError as e:  # unreadable: named where it is included
                self.problems.add(e if e.line is not None else err(
                    f"{item}: {e.message}", doc, "include"))
                continue
            sub, text = loaded
            self.texts.append(text)
            self.problems.run(partial(check_keys, sub, INCLUDED, "an included file"), None)
            self.add_tools(sub)
            self.add_agents(sub)
            self.add_rules(sub)
            self.include(sub, path.parent, (named / item).parent)


@dataclass(frozen=True, slots=True)
class Defaults:
    action: Action = Action.ALLOW
    on_error: Action = Action.DENY
    undeclared_tools: Action = Action.DENY
    on_store_error: Action = Action.DENY
    filter_tools: bool = True
    on_deny: OnDeny = DEFAULT_ON_DENY
    max_continuations: int = DEFAULT_CONTINUATIONS
    written_action: bool = False  # `defaults.action` is in the file


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


def _on_deny(defaults: YMap) -> OnDeny:
    try:
        return OnDeny(str(defaults.get("on_deny", DEFAULT_ON_DENY.value)))
    except ValueError:
        raise err("must be one of continue, rewrite, error", defaults, "on_deny",
                  "defaults") from None


def _continuations(defaults: YMap) -> int:
    bound = defaults.get("max_continuations", DEFAULT_CONTINUATIONS)
    if not isinstance(bound, int) or isinstance(bound, bool) or not 0 <= bound <= 10:
        raise err("must be a whole number from 0 to 10", defaults, "max_continuations",
                  "defaults")
    return bound


def _filter_tools(defaults: YMap) -> bool:
    value = defaults.get("filter_tools", True)
    if not isinstance(value, bool):
        raise err("must be true or false", defaults, "filter_tools", "defaults")
    return value


def parse_defaults(doc: YMap, problems: Problems) -> Defaults:
    """`defaults:`, each key on its own. `on_deny` (continue | rewrite | error; a rule's
    own `on_deny` wins) and `max_continuations`, the bound on the answers tether asks the
    model for after a denial, per answer the agent gets (0: never continue):
    docs/continuations.md."""
    d = Defaults()
    defaults = problems.run(partial(as_map, doc.get("defaults"), doc, "defaults"), None)
    if defaults is None:
        return d
    problems.run(partial(check_keys, defaults, DEFAULTS, "defaults"), None)
    fail = (Action.DENY, Action.ALLOW)

    def action(key: str, default: Action, allowed: tuple[Action, ...]) -> Action:
        return problems.run(partial(_action, defaults.get(key, default.value), defaults, key,
                                    allowed), default)

    return Defaults(action("action", d.action, tuple(Action)),
                    action("on_error", d.on_error, fail),
                    action("undeclared_tools", d.undeclared_tools, fail),
                    action("on_store_error", d.on_store_error, fail),
                    problems.run(partial(_filter_tools, defaults), d.filter_tools),
                    problems.run(partial(_on_deny, defaults), d.on_deny),
                    problems.run(partial(_continuations, defaults), d.max_continuations),
                    "action" in defaults)
