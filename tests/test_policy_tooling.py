"""Policy tooling: `mode: shadow` rules and `tether replay`.

A shadow rule is driven end to end with the official openai SDK through a real
tether; replay runs as users run it, `python -m proxy replay`, over an audit log
recorded by a real tether governing a janitor run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import ConfigError
from proxy.model import Action, Exchange, ToolCall
from proxy.policy.engine import Policy, PolicyEngine
from proxy.policy.rules import compile_rule
from proxy.policy.source import YMap, load_yaml
from tests.conftest import POLICY, MakeStack
from tests.fakes import Call, Reply

ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "clean up"}]


def tools(*names: str) -> list[ChatCompletionToolParam]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in names]


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def rules_of(text: str) -> PolicyEngine:
    doc = load_yaml(text, "rules.yaml")
    assert isinstance(doc, YMap)
    raw = doc["rules"]
    assert isinstance(raw, list)
    return PolicyEngine(Policy(rules=tuple(compile_rule(r, "rules.yaml", 0) for r in raw)))


# --- mode: shadow, as a unit -------------------------------------------------------------

SHADOW_RULES = """
rules:
  - id: held-resize
    match: {tool: resize_volume}
    action: hold
  - id: try-deny-resize
    match: {tool: resize_volume, args: {size: {gt: 100}}}
    action: deny
    mode: shadow
  - id: try-hold-weather
    match: {tool: get_weather}
    action: hold
    mode: shadow
"""


@pytest.mark.parametrize(("tool", "args", "action", "rules", "shadow"), [
    ("resize_volume", {"size": 500}, Action.HOLD, ("held-resize",), ("try-deny-resize",)),
    ("resize_volume", {"size": 5}, Action.HOLD, ("held-resize",), ()),
    ("get_weather", {}, Action.ALLOW, (), ("try-hold-weather",)),
    ("list_volumes", {}, Action.ALLOW, (), ()),
])
def test_a_shadow_rule_is_recorded_and_never_decides(
        tool: str, args: dict[str, object], action: Action, rules: tuple[str, ...],
        shadow: tuple[str, ...]) -> None:
    engine = rules_of(SHADOW_RULES)
    call = ToolCall("c1", tool, json.dumps(args), args)
    decision = engine.decide(call, Exchange("openai", "m", declared_tools=(tool,)))
    assert (decision.action, decision.rules, decision.shadow) == (action, rules, shadow)
    explained = engine.decide(call, Exchange("openai", "m", declared_tools=(tool,)), explain=True)
    assert [t.rule_id for t in explained.trace if t.shadow and t.matched] == list(shadow)


@pytest.mark.parametrize(("rule", "line", "message"), [
    ("  - id: r\n    match: {tool: x}\n    action: deny\n    mode: dry-run\n", 5,
     "mode must be wait or ticket (hold rules) or shadow (any rule)"),
    ("  - id: r\n    match: {tool: x}\n    action: deny\n    mode: ticket\n", 5,
     "mode wait or ticket only applies to action: hold"),
    ("  - id: r\n    match: {tool: x}\n    action: allow\n    mode: true\n", 5,
     "mode must be wait or ticket (hold rules) or shadow (any rule)"),
])
def test_a_bad_mode_names_file_line_and_rule(rule: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        rules_of("rules:\n" + rule)
    assert f"rules.yaml:{line}: rule r: mode: {message}" in str(e.value)


# --- mode: shadow, end to end --------------------------------------------------------------

SHADOW_POLICY = POLICY + """
  - id: shadow-no-prod-weather
    description: would refuse weather lookups for production
    match: {tool: get_weather, args: {region: {equals: production}}}
    action: deny
    on_deny: error
    mode: shadow
"""


async def test_a_shadow_rule_never_blocks_but_is_audited_and_counted(make_stack: MakeStack
                                                                     ) -> None:
    stack = await make_stack(SHADOW_POLICY)
    args = '{"region": "production"}'
    stack.fake.push(Reply(calls=(Call("get_weather", args),)), Reply(calls=(Call("get_weather", args),)))
    client = stack.client()
    r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES,
                                             tools=tools("get_weather"))
    calls = r.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls if c.type == "function"] == [
        ("get_weather", args)]
    stream = await client.chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                  tools=tools("get_weather"), stream=True)
    streamed = "".join([tc.function.arguments or "" async for chunk in stream
                        for choice in chunk.choices for tc in choice.delta.tool_calls or []
                        if tc.function is not None])
    assert streamed == args
    records = stack.decisions()
    assert len(records) == 2
    for record in records:
        assert record["action"] == "allow" and record["rules"] == []
        assert record["shadow_rules"] == ["shadow-no-prod-weather"]
    async with aiohttp.ClientSession() as http, http.get(stack.admin_url + "/metrics") as resp:
        text = await resp.text()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert [(s.labels, s.value) for s in samples if s.name == "tether_shadow_matches_total"] == [
        ({"rule": "shadow-no-prod-weather"}, 2)]
    decided = [(s.labels["action"], s.labels["rule"], s.value) for s in samples
               if s.name == "tether_tool_decisions_total"]
    assert decided == [("allow", "none", 2)]


def test_explain_shows_a_shadow_match_as_such(tmp_path: Path) -> None:
    cfg = tmp_path / "tether.yaml"
    cfg.write_text(SHADOW_POLICY)
    result = tether("explain", "--config", str(cfg), "--tool", "get_weather",
                    "--args", '{"region": "production"}')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: allow"
    [shown] = [line for line in lines if "shadow-no-prod-weather" in line and "SHADOW" in line]
    assert "-> deny (shadow: not enforced)" in shown
    assert "  (shadow rules matched, not enforced: shadow-no-prod-weather)" in lines
    other = tether("explain", "--config", str(cfg), "--tool", "get_weather",
                   "--args", '{"region": "dev"}')
    assert any(line.strip().startswith("no    shadow-no-prod-weather")
               for line in other.stdout.splitlines())


# --- tether replay --------------------------------------------------------------------------

JANITOR = (ROOT / "rules/janitor.yaml").read_text().replace("timeout: 10m", "timeout: 200ms")
JANITOR_TOOLS = ("list_volumes", "describe_volume", "delete_volume")
RUN = (
    Call("list_volumes", "{}"),
    Call("describe_volume", '{"volume_id": "vol-0a1", "api_token": "tok-123"}'),
    Call("delete_volume", '{"volume_id": "vol-0b2", "tags": {"env": "production-candidate"}}'),
    Call("delete_volume", '{"volume_id": "vol-0c3", "tags": {"env": "production"}}'),
)


async def record_janitor_run(make_stack: MakeStack) -> Path:
    """A janitor agent's calls through a real tether under rules/janitor.yaml."""
    stack = await make_stack(JANITOR)
    client = stack.client(default_headers={"X-Tether-Agent": "janitor"})
    for call in RUN:
        stack.fake.push(Reply(calls=(call,)))
        await client.chat.completions.create(model="gpt-x", messages=MESSAGES,
                                             tools=tools(*JANITOR_TOOLS))
    records = stack.decisions()
    assert [(r["tool"], r["action"]) for r in records] == [
        ("list_volumes", "allow"), ("describe_volume", "allow"),
        ("delete_volume", "deny"), ("delete_volume", "deny")]
    assert records[1]["masked"] == ["arguments.api_token"]
    return stack.audit_path


def replay(audit: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return tether("replay", str(audit), "--config", str(config), *extra)


async def test_replay_shows_what_removing_a_deny_rule_would_change(
        make_stack: MakeStack, tmp_path: Path) -> None:
    audit = await record_janitor_run(make_stack)
    new = tmp_path / "new.yaml"
    # No more hard deny for production; "only disposable" becomes a dry run.
    relaxed = JANITOR.replace("  - id: no-prod-deletes\n", "  - id: no-prod-deletes\n    mode: shadow\n")
    relaxed = relaxed.replace("  - id: deletes-only-disposable\n",
                              "  - id: deletes-only-disposable\n    mode: shadow\n")
    new.write_text(relaxed)
    result = replay(audit, new)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    changed = [line for line in out if line.startswith("CHANGED")]
    assert len(changed) == 2
    assert all(": deny [no-prod-deletes, deletes-only-disposable, deletes-need-approval] -> "
               "hold [deletes-need-approval]" in line for line in changed)
    assert "summary: 2 unchanged, 2 changed" in out
    assert "  deny -> hold: 2" in out
    assert "flagged: 1 re-decided on redacted arguments" in out
    assert any("arguments redacted (arguments.api_token)" in line for line in out)
    assert any("shadow rules would match: no-prod-deletes, deletes-only-disposable" in line
               for line in out)

    as_json = json.loads(replay(audit, new, "--json").stdout)
    assert (as_json["unchanged"], as_json["changed"]) == (2, 2)
    assert as_json["transitions"] == {"deny -> hold": 2}
    assert [c["tool"] for c in as_json["calls"] if c["changed"]] == ["delete_volume"] * 2
    assert as_json["calls"][2]["new"]["shadow_rules"] == ["no-prod-deletes",
                                                          "deletes-only-disposable"]
    assert as_json["calls"][1]["masked"] == ["arguments.api_token"]


async def test_replay_shows_a_new_deny_rule_and_an_unchanged_policy(
        make_stack: MakeStack, tmp_path: Path) -> None:
    audit = await record_janitor_run(make_stack)
    same = tmp_path / "same.yaml"
    same.write_text(JANITOR)
    result = replay(audit, same)
    assert result.returncode == 0, result.stderr
    assert "summary: 4 unchanged, 0 changed" in result.stdout
    assert "CHANGED" not in result.stdout

    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(JANITOR + """
  - id: janitor-reads-nothing
    match: {tool: ["list_*", "describe_*"], agent: janitor}
    action: deny
""")
    result = replay(audit, stricter, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["transitions"] == {"allow -> deny": 2}
    changed = [c for c in report["calls"] if c["changed"]]
    assert [(c["tool"], c["agent"], c["new"]["rules"]) for c in changed] == [
        ("list_volumes", "janitor", ["janitor-reads-nothing"]),
        ("describe_volume", "janitor", ["janitor-reads-nothing"])]


def test_replay_carries_verdicts_from_outside_the_rules(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    records = [
        {"kind": "request", "status": 400},
        {"kind": "decision", "tool": "describe_volume", "arguments": {"volume_id": "v"},
         "agent": "janitor", "action": "deny", "rules": ["tether:loop-repeat"]},
        {"kind": "decision", "tool": "delete_volume", "arguments": '{"volume_id": ',
         "action": "deny", "rules": ["tether:malformed-call", "deletes-only-disposable"]},
    ]
    audit.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "new.yaml"
    config.write_text("rules: []\n")
    report = json.loads(replay(audit, config, "--json").stdout)
    loop, cut = report["calls"]
    assert (loop["new"]["action"], loop["new"]["rules"], loop["carried"]) == (
        "deny", ["tether:loop-repeat"], ["tether:loop-repeat"])
    assert loop["changed"] is False
    assert (cut["new"]["action"], cut["new"]["rules"]) == ("deny", ["tether:malformed-call"])
    assert report["transitions"] == {"deny -> deny": 1}


@pytest.mark.parametrize(("audit_text", "config_text", "error"), [
    ('{"kind": "decision", "tool": "x", "action": "allow"}\nnot json\n', "rules: []\n",
     "audit.jsonl:2: not a JSON record"),
    ('{"kind": "decision", "action": "allow"}\n', "rules: []\n",
     "audit.jsonl:1: a decision record needs 'tool' and 'action'"),
    ("", "rules:\n  - id: r\n    action: deny\n    mode: sometimes\n", "new.yaml:4: rule r: mode"),
])
def test_replay_fails_on_unreadable_input(tmp_path: Path, audit_text: str, config_text: str,
                                          error: str) -> None:
    audit, config = tmp_path / "audit.jsonl", tmp_path / "new.yaml"
    audit.write_text(audit_text)
    config.write_text(config_text)
    result = replay(audit, config)
    assert result.returncode == 1
    assert error in result.stderr
    missing = replay(tmp_path / "nowhere.jsonl", config if not config_text.startswith("rules:\n ")
                     else ROOT / "rules/tether.yaml")
    assert missing.returncode == 1 and "nowhere.jsonl" in missing.stderr
