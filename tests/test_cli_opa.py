"""`tether explain` and `tether test` consult OPA when the config has an `opa:` section,
so an explanation or a policy test agrees with what the proxy would decide."""

from __future__ import annotations

import json
from pathlib import Path

from tests.redis_server import free_port
from tests.test_cli import ROOT, tether

RULES = ROOT / "rules" / "opa"
YAML_RULES = """
tools: {resize_volume: {effect: write}, list_volumes: {effect: read}}
rules:
  - id: no-drop
    match: {tool: drop_database}
    action: deny
"""


def write_config(tmp_path: Path, opa: str) -> Path:
    cfg = tmp_path / "tether.yaml"
    cfg.write_text(f"audit: {{path: null}}\nopa: {opa}\n{YAML_RULES}")
    return cfg


def test_explain_shows_the_opa_verdict_merged_with_the_rules(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"{{embedded: '{RULES}'}}")
    denied = tether("explain", "--config", str(cfg), "--tool", "resize_volume",
                    "--args", '{"size_gb": 10}', "--agent", "janitor")
    assert denied.returncode == 0, denied.stderr
    assert "decision: deny" in denied.stdout
    assert "MATCH opa:tether/decision -> deny: agent janitor may not make write calls" \
        in denied.stdout
    held = tether("explain", "--config", str(cfg), "--tool", "resize_volume",
                  "--args", '{"size_gb": 900}', "--agent", "deployer-bot")
    assert "decision: hold" in held.stdout and "size_gb 900 is over 500" in held.stdout
    read = tether("explain", "--config", str(cfg), "--tool", "list_volumes", "--args", "{}")
    assert "decision: allow" in read.stdout and "opa:tether/decision -> allow" in read.stdout


def test_policy_tests_see_opa(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"{{embedded: '{RULES}'}}")
    cases = tmp_path / "cases.yaml"
    cases.write_text(json.dumps({"config": str(cfg), "cases": [
        {"name": "a reader may not write", "tool": "resize_volume", "agent": "janitor",
         "args": {"size_gb": 10}, "expect": "deny", "rules": ["opa:tether/decision"]},
        {"name": "a writer may", "tool": "resize_volume", "agent": "deployer-bot",
         "args": {"size_gb": 10}, "expect": "allow"},
        {"name": "OPA never overrides a YAML deny", "tool": "drop_database",
         "agent": "deployer-bot", "expect": "deny", "rules": ["no-drop"]},
    ]}))
    result = tether("test", str(cases))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout
    # Without OPA in the config the first case would be allowed: the expectation is OPA's.
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"audit: {{path: null}}\n{YAML_RULES}")
    cases.write_text(cases.read_text().replace(str(cfg), str(plain)))
    assert "FAIL" in tether("test", str(cases)).stdout


def test_an_unreachable_opa_is_a_deny_offline_too(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"{{url: 'http://127.0.0.1:{free_port()}', timeout: 1}}")
    result = tether("explain", "--config", str(cfg), "--tool", "list_volumes", "--args", "{}")
    assert result.returncode == 0, result.stderr
    assert "decision: deny" in result.stdout and "tether:opa-unavailable" in result.stdout
