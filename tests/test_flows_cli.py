"""Flow rules offline: `tether explain --history`, a `tether test` case's `history:`, and
`tether replay` rebuilding each session's history from the audit records in order."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.errors import ConfigError
from proxy.policy_tests import parse_case_file
from tests.conftest import MakeStack
from tests.fakes import Call, Reply
from tests.test_e2e_flows import ASK, POLICY, READ, TOOLS, WRITE, after_read
from tests.test_policy_tooling import tether

CONFIG = POLICY.replace("approvals: {keepalive: 100ms}\n", "audit: {path: null}\n")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_explain_with_a_history_file(tmp_path: Path) -> None:
    config = write(tmp_path, "tether.yaml", CONFIG)
    history = write(tmp_path, "h.json", json.dumps([
        {"tool": "web_fetch", "args": {"url": "https://evil.example/x"}, "decision_id": "d-1",
         "at": 1765090800}]))
    result = tether("explain", "--config", str(config), "--tool", "update_record",
                    "--args", '{"id": 7}', "--history", str(history))
    assert result.returncode == 0, result.stderr
    assert "decision: hold" in result.stdout
    assert "web_fetch(url='https://evil.example/x') [decision d-1 at 2025-12-07T07:00:00Z]" \
        in result.stdout
    # Without it, the same call is allowed; with a denied read, too.
    assert "decision: allow" in tether("explain", "--config", str(config), "--tool",
                                       "update_record").stdout
    denied = write(tmp_path, "d.yaml", "- {tool: web_fetch, action: deny}\n")
    assert "decision: allow" in tether("explain", "--config", str(config), "--tool",
                                       "update_record", "--history", str(denied)).stdout


def test_explain_refuses_a_bad_history_file_with_its_line(tmp_path: Path) -> None:
    config = write(tmp_path, "tether.yaml", CONFIG)
    bad = write(tmp_path, "h.yaml", "- tool: web_fetch\n- tool: x\n  lables: [untrusted]\n")
    result = tether("explain", "--config", str(config), "--tool", "update_record",
                    "--history", str(bad))
    assert result.returncode == 1
    assert "h.yaml:3" in result.stderr and "unknown key" in result.stderr


def test_policy_test_cases_with_history(tmp_path: Path) -> None:
    write(tmp_path, "tether.yaml", CONFIG)
    cases = write(tmp_path, "flows_test.yaml", """
config: tether.yaml
cases:
  - name: a write after reading an untrusted page waits for a person
    tool: update_record
    args: {id: 7}
    history:
      - {tool: web_fetch, args: {url: "https://evil.example"}}
    expect: hold
    rules: [write-after-untrusted]
  - name: the same write alone is allowed
    tool: update_record
    expect: allow
  - name: the lethal trifecta is denied
    tool: send_email
    history:
      - {tool: query_customers}
      - {tool: web_fetch}
    expect: deny
    rules: [lethal-trifecta]
  - name: labels given in the history win over the config
    tool: update_record
    history: [{tool: some_tool, labels: [untrusted]}]
    expect: hold
""")
    result = tether("test", str(cases))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed, 0 failed" in result.stdout


def test_a_bad_history_in_a_case_names_its_line(tmp_path: Path) -> None:
    text = ("config: t.yaml\ncases:\n  - tool: x\n    expect: allow\n    history:\n"
            "      - {tool: web_fetch, action: maybe}\n")
    try:
        parse_case_file(text, "c.yaml")
    except ConfigError as e:
        assert "c.yaml:6" in str(e) and "action must be allow, deny or hold" in str(e)
    else:  # pragma: no cover
        raise AssertionError("a bad history passed")


async def test_replay_rebuilds_the_sessions_history(make_stack: MakeStack,
                                                    tmp_path: Path) -> None:
    """Recorded without flow rules, replayed with them: the write after the read changes,
    the same write in a session without the read does not."""
    stack = await make_stack(policy="tools: {web_fetch: {effect: read}}\n")
    for session, turns in (("s-read", [(READ, ASK), (WRITE, after_read())]),
                           ("s-clean", [(WRITE, ASK)])):
        client = stack.client(default_headers={"X-Tether-Session": session})
        for call, messages in turns:
            stack.fake.push(Reply(calls=(Call(call.name, call.arguments, id=call.id),)))
            await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    assert [r["action"] for r in stack.decisions()] == ["allow", "allow", "allow"]
    config = write(tmp_path, "flows.yaml", CONFIG)
    result = tether("replay", str(stack.audit_path), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(c["tool"], c["new"]["action"]) for c in report["calls"]] == [
        ("web_fetch", "allow"), ("update_record", "hold"), ("update_record", "allow")]
    assert report["calls"][1]["new"]["rules"] == ["write-after-untrusted"]
