from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.model import Action, Effect, Exchange, OnDeny, ToolCall
from proxy.policy.engine import PolicyEngine, effect_of
from proxy.policy.names import normalize
from proxy.providers.arguments import parse_arguments


def load(tmp_path: Path, text: str) -> PolicyEngine:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return PolicyEngine(config_mod.load(path, env={}).policy)


def call(name: str, args: object = None, raw: str | None = None) -> ToolCall:
    raw = raw if raw is not None else json.dumps(args or {})
    parsed, problem = parse_arguments(raw)
    return ToolCall(id="c1", name=name, raw_arguments=raw, arguments=parsed, problem=problem)


def exchange(*tools: str, agent: str | None = None) -> Exchange:
    return Exchange(provider="openai", model="m", declared_tools=tools, agent=agent)


CONDITIONS = [
    # (condition, arguments, matches)
    ("{equals: prod}", {"x": "prod"}, True),
    ("{equals: prod}", {"x": "PROD "}, True),
    ("{equals: prod}", {"x": "dev"}, False),
    ("{equals: 5}", {"x": 5}, True),
    ("{equals: true}", {"x": 1}, False),
    ("{in: [a, b]}", {"x": "b"}, True),
    ("{in: [a, b]}", {"x": "c"}, False),
    ("{in: [a, b]}", {}, False),
    ("{not_in: [a, b]}", {"x": "c"}, True),
    ("{not_in: [a, b]}", {"x": "a"}, False),
    ("{not_in: [a, b]}", {}, True),
    ("{not_in: [a, b]}", {"x": ["a", "z"]}, True),
    ("{matches: '^vol-[0-9]+$'}", {"x": "vol-12"}, True),
    ("{matches: '^vol-[0-9]+$'}", {"x": "vol-1a"}, False),
    ("{matches: '(?i)^PROD'}", {"x": "production"}, True),
    ("{exists: true}", {"x": None}, True),
    ("{exists: true}", {"y": 1}, False),
    ("{exists: false}", {"y": 1}, True),
    ("{gt: 100}", {"x": 101}, True),
    ("{gt: 100}", {"x": "250"}, True),
    ("{gt: 100}", {"x": 100}, False),
    ("{gt: 100}", {"x": "lots"}, False),
    ("{gt: 100}", {"x": True}, False),
    ("{lt: 0}", {"x": -1.5}, True),
    ("{in: [a]}", {"x": ["z", "a"]}, True),
]


@pytest.mark.parametrize("condition, args, matches", CONDITIONS)
def test_conditions(tmp_path: Path, condition: str, args: dict[str, object], matches: bool) -> None:
    engine = load(tmp_path, f"rules:\n  - id: r\n    match: {{args: {{x: {condition}}}}}\n"
                            f"    action: deny\n")
    decision = engine.decide(call("t", args), exchange("t"))
    assert (decision.action is Action.DENY) is matches


@pytest.mark.parametrize("args", [
    {"tags": {"env": "production"}},
    {"Tags": {"ENV": "Production"}},
    {"tags": [{"env": "dev"}, {"env": "production"}]},
    {"tags": {"env": ["dev", "production"]}},
    {"tags": {"env": "produ\u200bction"}},
])
def test_dotted_paths_reach_every_spelling(tmp_path: Path, args: dict[str, object]) -> None:
    engine = load(tmp_path, "rules:\n  - id: r\n    match: {args: {tags.env: {in: [production]}}}\n"
                            "    action: deny\n")
    assert engine.decide(call("t", args), exchange("t")).action is Action.DENY


STRICT = """
rules:
  - id: allow-all
    match: {tool: "*"}
    action: allow
  - id: hold-writes
    match: {effect: write}
    action: hold
    timeout: 10m
  - id: deny-deletes
    match: {tool: "delete_*"}
    action: deny
    message: no deletes
"""


@pytest.mark.parametrize("tool, action, rules", [
    ("get_thing", Action.ALLOW, ("allow-all",)),
    ("put_thing", Action.HOLD, ("allow-all", "hold-writes")),
    ("delete_thing", Action.DENY, ("allow-all", "hold-writes", "deny-deletes")),
])
def test_strictest_action_wins_and_every_match_is_named(
    tmp_path: Path, tool: str, action: Action, rules: tuple[str, ...]
) -> None:
    decision = load(tmp_path, STRICT).decide(call(tool), exchange(tool))
    assert decision.action is action
    assert decision.rules == rules


REVERSED = """
rules:
  - id: deny-deletes
    match: {tool: "delete_*"}
    action: deny
    message: no deletes
  - id: hold-writes
    match: {effect: write}
    action: hold
    timeout: 10m
  - id: allow-all
    match: {tool: "*"}
    action: allow
"""


@pytest.mark.parametrize("tool", ["get_thing", "put_thing", "delete_thing"])
def test_rule_order_does_not_matter(tmp_path: Path, tool: str) -> None:
    first = load(tmp_path, STRICT).decide(call(tool), exchange(tool))
    second = load(tmp_path, REVERSED).decide(call(tool), exchange(tool))
    assert first.action is second.action
    assert set(first.rules) == set(second.rules)


@pytest.mark.parametrize("name", [
    "delete_volume", "Delete_Volume", "DELETE_VOLUME", " delete_volume ", "delete\u200b_volume",
    "\u202edelete_volume", "delete_volume\u0000", "ｄｅｌｅｔｅ_volume",
])
def test_name_variants_do_not_dodge_a_rule(tmp_path: Path, name: str) -> None:
    engine = load(tmp_path, "rules:\n  - id: r\n    match: {tool: delete_volume}\n"
                            "    action: deny\n")
    # Even when the request declared the variant itself, the rule still matches.
    decision = engine.decide(call(name), exchange(name))
    assert decision.action is Action.DENY and "r" in decision.rules
    assert normalize(name) == "delete_volume"


def test_undeclared_tool_is_denied(tmp_path: Path) -> None:
    engine = load(tmp_path, "rules: []\n")
    decision = engine.decide(call("Delete_volume"), exchange("delete_volume"))
    assert decision.action is Action.DENY and decision.rules == ("tether:undeclared-tool",)


def test_undeclared_tools_may_be_allowed_by_config(tmp_path: Path) -> None:
    engine = load(tmp_path, "defaults: {undeclared_tools: allow}\n")
    assert engine.decide(call("anything"), exchange()).action is Action.ALLOW


def test_agent_scope(tmp_path: Path) -> None:
    engine = load(tmp_path, "agents:\n  db-agent: {tools: [query_*, get_db_status]}\n")
    ok = engine.decide(call("query_tier"), exchange("query_tier", "delete_db", agent="db-agent"))
    no = engine.decide(call("delete_db"), exchange("query_tier", "delete_db", agent="db-agent"))
    other = engine.decide(call("delete_db"), exchange("delete_db", agent="ops"))
    assert ok.action is Action.ALLOW
    assert no.action is Action.DENY and no.rules == ("tether:agent-scope",)
    assert other.action is Action.ALLOW


def test_agent_and_effect_matching(tmp_path: Path) -> None:
    engine = load(tmp_path, """
tools:
  run_query: {effect: read}
rules:
  - id: interns-read-only
    match: {agent: "intern-*", effect: write}
    action: deny
""")
    assert engine.decide(call("run_query"), exchange("run_query", agent="intern-1")).allowed
    assert not engine.decide(call("set_x"), exchange("set_x", agent="intern-1")).allowed
    assert engine.decide(call("set_x"), exchange("set_x", agent="admin")).allowed


@pytest.mark.parametrize("name, effect", [
    ("get_volume", Effect.READ), ("list_x", Effect.READ), ("describe_y", Effect.READ),
    ("delete_z", Effect.WRITE), ("getaway", Effect.WRITE), ("frobnicate", Effect.WRITE),
])
def test_effect_from_name(name: str, effect: Effect) -> None:
    assert effect_of(name, {}) is effect


def test_on_deny_error_and_message(tmp_path: Path) -> None:
    engine = load(tmp_path, "rules:\n  - id: r\n    match: {tool: x}\n    action: deny\n"
                            "    on_deny: error\n    message: never x\n")
    decision = engine.decide(call("x"), exchange("x"))
    assert decision.on_deny is OnDeny.ERROR and decision.message == "never x"


def test_malformed_call_is_denied(tmp_path: Path) -> None:
    decision = load(tmp_path, "").decide(call("x", raw='{"a": 1, "a": 2}'), exchange("x"))
    assert decision.action is Action.DENY and decision.rules == ("tether:malformed-call",)


def test_default_action(tmp_path: Path) -> None:
    engine = load(tmp_path, "defaults: {action: deny}\n")
    decision = engine.decide(call("x"), exchange("x"))
    assert decision.action is Action.DENY and decision.rules == ()


BAD = [
    ("rules:\n  - id: r\n    match: {tool: x}\n    action: maybe\n", 4, "rule r: action"),
    ("rules:\n  - id: r\n    match:\n      args: {a.b: {inn: [1]}}\n    action: deny\n", 4,
     "rule r: match.args.a.b: unknown operator 'inn'"),
    ("rules:\n  - id: r\n    match:\n      tools: x\n    action: deny\n", 4, "match.tools"),
    ("rules:\n  - match: {tool: x}\n    action: deny\n", 2, "needs an 'id'"),
    ("rules:\n  - id: r\n    action: deny\n  - id: r\n    action: allow\n", 4,
     "duplicate rule id"),
    ("rules:\n  - id: r\n    match: {args: {x: {matches: '('}}}\n    action: deny\n", 3,
     "bad regular expression"),
    ("rules:\n  - id: r\n    action: deny\n    action: allow\n", 4, "duplicate key 'action'"),
    ("rule:\n  - id: r\n", 1, "unknown top-level key"),
    ("defaults: {action: perhaps}\n", 1, "defaults"),
    ("rules:\n  - id: r\n    match: {args: {x: {gt: big}}}\n    action: deny\n", 3, "needs a number"),
    ("rules:\n  - id: 'tether:x'\n    action: deny\n", 2, "reserved"),
    ("rules: [\n", 2, "invalid YAML"),
    ("rules:\n  - id: r\n    action: hold\n    timeout: soon\n", 4, "duration"),
]


@pytest.mark.parametrize("text, line, message", BAD)
def test_bad_policy_names_file_line_rule_and_key(tmp_path: Path, text: str, line: int,
                                                  message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    text_of = str(info.value)
    assert text_of.startswith(f"{path}:{line}: "), text_of
    assert message in text_of


def test_included_rule_errors_name_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "more.yaml").write_text("rules:\n  - id: a\n    action: nope\n")
    (tmp_path / "main.yaml").write_text("include: [more.yaml]\n")
    with pytest.raises(ConfigError, match=r"more\.yaml:3: rule a: action"):
        config_mod.load(tmp_path / "main.yaml", env={})


def test_telemetry_section_is_checked(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("defaults: {action: allow}\n"
                                     "telemetry: {legacy_gen_ai_system: true}\n")
    cfg = config_mod.load(tmp_path / "c.yaml", env={})
    assert cfg.telemetry.legacy_gen_ai_system and not cfg.warnings
    (tmp_path / "c.yaml").write_text("defaults: {action: allow}\ntelemetry: {}\n")
    cfg = config_mod.load(tmp_path / "c.yaml", env={})
    assert not cfg.telemetry.legacy_gen_ai_system and not cfg.warnings
    (tmp_path / "c.yaml").write_text("server: {}\ntelemetry:\n  legacy_gen_ai_system: yes!\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: telemetry\.legacy_gen_ai_system: must be "
                                          r"true or false"):
        config_mod.load(tmp_path / "c.yaml", env={})
    (tmp_path / "c.yaml").write_text("telemetry:\n  exporter: otlp\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: telemetry\.exporter: unknown key"):
        config_mod.load(tmp_path / "c.yaml", env={})


def test_upstream_override_from_environment(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("upstreams:\n  openai: {url: 'https://api.openai.com'}\n")
    cfg = config_mod.load(tmp_path / "c.yaml", env={"TETHER_UPSTREAM_OPENAI": "http://127.0.0.1:9/"})
    assert cfg.upstreams["openai"].url == "http://127.0.0.1:9"


@pytest.mark.parametrize("pattern, api, matches", [
    ("jira.createIssue", "jira.createIssue", True),
    ("jira.createIssue", "JIRA.CreateIssue", True),
    ("jira.createIssue", "jira.createIssues", False),
    ("aws.ec2.Delete*", "aws.ec2.DeleteVolume", True),
    ("aws.ec2.Delete*", "aws.ec2.DescribeVolumes", False),
    ("aws.*.Delete*", "aws.s3.DeleteObject", True),
])
def test_api_names_and_globs(tmp_path: Path, pattern: str, api: str, matches: bool) -> None:
    engine = load(tmp_path, f"rules:\n  - id: r\n    match: {{api: '{pattern}'}}\n"
                            "    action: deny\n")
    decision = engine.decide(call("op"), exchange("op"), api=api)
    assert (decision.action is Action.DENY) is matches


def test_the_policy_revision_ignores_how_the_process_runs(tmp_path: Path) -> None:
    """Replicas with other ports, audit paths or stores agree on the revision (tickets
    are bound to it); a rule, or its formatting-independent content, decides it."""
    rules = "rules:\n  - {id: r, match: {tool: x}, action: deny}\n"
    texts = {
        "a": f"server: {{port: 1}}\naudit: {{path: a.jsonl}}\nstore: memory\n{rules}",
        "b": f"audit: {{path: b.jsonl}}\nserver: {{port: 2}}\n{rules}",
        "c": "rules:\n- id: r\n  match: {tool: x}\n  action: deny\n",
        "d": "rules:\n  - {id: r, match: {tool: y}, action: deny}\n",
    }
    revision = {}
    for name, text in texts.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        revision[name] = config_mod.load(tmp_path / f"{name}.yaml", env={}).policy.revision
    assert revision["a"] == revision["b"] == revision["c"]
    assert revision["d"] != revision["a"]
