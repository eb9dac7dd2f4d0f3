"""The sans-IO parts of continuing after a denial (providers/continuation.py, the policy's
`on_deny` resolution, the config keys); the end-to-end behaviour is
tests/test_e2e_continuations.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.model import Action, Decision, OnDeny, ToolCall
from proxy.policy.engine import on_deny_of
from proxy.policy.rules import Rule
from proxy.providers.anthropic_continue import AnthropicContinues
from proxy.providers.continuation import Denied, add_usage, to_continue
from proxy.providers.openai_chat_continue import ChatContinues
from proxy.providers.provider_ran import VIOLATION

CALL = ToolCall("call_1", "delete_volume", "{}", {})
DENY_C = Decision(Action.DENY, ("r",), "no", OnDeny.CONTINUE)
DENY_R = Decision(Action.DENY, ("r",), "no", OnDeny.REWRITE)
ALLOW = Decision(Action.ALLOW, on_deny=OnDeny.CONTINUE)


@pytest.mark.parametrize(("named", "default", "expected"), [
    ((), OnDeny.CONTINUE, OnDeny.CONTINUE),
    ((), OnDeny.REWRITE, OnDeny.REWRITE),
    ((OnDeny.CONTINUE,), OnDeny.REWRITE, OnDeny.CONTINUE),
    ((OnDeny.REWRITE, OnDeny.CONTINUE), OnDeny.CONTINUE, OnDeny.REWRITE),
    ((OnDeny.ERROR, OnDeny.REWRITE), OnDeny.CONTINUE, OnDeny.ERROR),
    ((None, OnDeny.CONTINUE), OnDeny.REWRITE, OnDeny.CONTINUE),
])
def test_on_deny_the_strictest_named_else_the_default(
        named: tuple[OnDeny | None, ...], default: OnDeny, expected: OnDeny) -> None:
    rules = [Rule(id=f"r{i}", action=Action.DENY, on_deny=n) for i, n in enumerate(named)]
    assert on_deny_of(rules, default) is expected


@pytest.mark.parametrize(("calls", "decisions", "continued"), [
    ((), (), False),                                 # no call: nothing to continue
    ((CALL,), (DENY_C,), True),
    ((CALL, CALL), (DENY_C, DENY_C), True),
    ((CALL, CALL), (DENY_C, ALLOW), False),          # the agent has a call to run
    ((CALL, CALL), (DENY_C, DENY_R), False),         # a rule said rewrite
    ((CALL,), (Decision(Action.DENY, on_deny=OnDeny.ERROR),), False),
    # the provider ran a tool the policy forbids: that answer is not asked for more
    ((CALL,), (Decision(Action.DENY, (VIOLATION,), "ran", OnDeny.CONTINUE),), False),
])
def test_which_answers_continue(calls: tuple[ToolCall, ...], decisions: tuple[Decision, ...],
                                continued: bool) -> None:
    assert (to_continue(calls, decisions) is not None) is continued


def test_usage_adds_up_field_by_field() -> None:
    a = {"prompt_tokens": 3, "details": {"cached": 1}, "tier": "x"}
    b = {"prompt_tokens": 4, "details": {"cached": 2}, "tier": "y", "new": 5}
    assert add_usage(a, b) == {"prompt_tokens": 7, "details": {"cached": 3}, "tier": "y",
                               "new": 5}
    assert add_usage(None, {"n": 1}) == {"n": 1} and add_usage(True, 1) == 1


def test_chat_follow_up_is_the_call_and_its_result() -> None:
    sent = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}]}).encode()
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok",
                                                  "tool_calls": []}}]}).encode()
    body = json.loads(ChatContinues().follow_whole(sent, answer, [Denied(CALL, DENY_C)]) or b"")
    assert body["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_1",
                                   "content": "[tether] The tool call 'delete_volume' was "
                                              "denied by r: no. It was not executed."}
    # n > 1: which choice would the loop go on from? Not continued.
    many = json.dumps({"model": "m", "n": 2, "messages": []}).encode()
    assert ChatContinues().follow_whole(many, answer, [Denied(CALL, DENY_C)]) is None


def test_anthropic_prefill_is_not_continued() -> None:
    sent = json.dumps({"messages": [{"role": "user", "content": "go"},
                                    {"role": "assistant", "content": "{"}]}).encode()
    answer = json.dumps({"content": []}).encode()
    assert AnthropicContinues().follow_whole(sent, answer, [Denied(CALL, DENY_C)]) is None


@pytest.mark.parametrize(("text", "line", "message"), [
    ("defaults:\n  on_deny: later\n", 2, "defaults.on_deny: must be one of continue, rewrite"),
    ("defaults:\n  max_continuations: -1\n", 2, "defaults.max_continuations: must be a whole"),
    ("defaults:\n  max_continuations: true\n", 2, "defaults.max_continuations"),
    ("rules:\n  - id: x\n    match: {tool: a}\n    action: deny\n    on_deny: maybe\n", 5,
     "on_deny must be continue, rewrite or error"),
])
def test_bad_values_name_file_and_line(tmp_path: Path, text: str, line: int,
                                       message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_mod.load(path, env={})
    assert f"t.yaml:{line}:" in str(e.value) and message in str(e.value)


def test_the_keys_read(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("defaults: {on_deny: continue, max_continuations: 0}\n")
    policy = config_mod.load(path, env={}).policy
    assert (policy.on_deny, policy.max_continuations) == (OnDeny.CONTINUE, 0)


def test_continue_is_the_default(tmp_path: Path) -> None:
    """A denial the model never reads ends the common agent loop (docs/continuations.md,
    "The default"): unless the config says otherwise, it is sent back to the model."""
    path = tmp_path / "t.yaml"
    path.write_text("rules: []\n")
    policy = config_mod.load(path, env={}).policy
    assert (policy.on_deny, policy.max_continuations) == (OnDeny.CONTINUE, 3)
    rule = Rule(id="r", action=Action.DENY)
    assert on_deny_of([rule], policy.on_deny) is OnDeny.CONTINUE
