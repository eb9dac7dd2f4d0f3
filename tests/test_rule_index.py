"""The rule index (proxy/policy/rule_index.py): a decision through it is the decision
trying every rule makes (`explain=True` tries every rule), for exact names, globs by
their prefix, globs that start with a wildcard, sets, and rules with no tool."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config as config_mod
from proxy.model import Exchange, ToolCall
from proxy.policy.engine import PolicyEngine
from proxy.policy.rule_index import RuleIndex

TOOLS = ["delete_volume", "delete_*", "*_volume", "del?te_volume", "get_weather",
         "Delete-Volume", "svc_[ab]_x", "svc_a_x", "d*", "delete_volume_2"]
NAMES = ["delete_volume", "delete_vol", "get_weather", "svc_a_x", "svc_c_x", "d",
         "DELETE-volume", "resize_volume", "", "delete_volume_2"]


def engine(tmp: Path, rules: list[tuple[list[str] | None, str]]) -> PolicyEngine:
    lines = ["defaults: {action: allow}", "rules:"]
    for i, (tools, action) in enumerate(rules):
        names = ", ".join(f'"{t}"' for t in tools or ())
        match = "{}" if tools is None else f"{{tool: [{names}]}}"
        lines += [f"  - id: r{i}", f"    match: {match}", f"    action: {action}",
                  f"    message: rule {i}"]
    path = tmp / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    return PolicyEngine(config_mod.load(path, env={}).policy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=st.lists(st.tuples(st.none() | st.lists(st.sampled_from(TOOLS), min_size=1,
                                                       max_size=3),
                                st.sampled_from(["allow", "deny", "hold"])),
                      min_size=1, max_size=12),
       name=st.sampled_from(NAMES))
def test_a_decision_through_the_index_is_the_one_trying_every_rule(
        tmp_path: Path, rules: list[tuple[list[str] | None, str]], name: str) -> None:
    e = engine(tmp_path, rules)
    call = ToolCall("c", name or "x", "{}", {})
    exchange = Exchange("openai", "m", (call.name,))
    fast, full = e.decide(call, exchange), e.decide(call, exchange, explain=True)
    assert (fast.action, fast.rules, fast.message, fast.on_deny) == (
        full.action, full.rules, full.message, full.on_deny)


@pytest.mark.parametrize(("tools", "name", "candidate"), [
    (["delete_volume"], "delete_volume", True),
    (["delete_volume"], "delete_volumes", False),
    (["delete_*"], "delete_x", True),
    (["delete_*"], "get_x", False),
    (["*_volume"], "get_x", True),       # starts with a wildcard: tried for every call
    (["svc_[ab]_x"], "get_x", True),     # a set: not read back, tried for every call
    (None, "anything", True),
])
def test_what_the_index_files_where(tmp_path: Path, tools: list[str] | None, name: str,
                                    candidate: bool) -> None:
    policy = engine(tmp_path, [(tools, "deny")]).policy
    assert bool(RuleIndex(policy.rules).candidates(name)) is candidate
