"""The command line, run as a user runs it: as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.fakes import FakeOpenAI
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def tether(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_check_accepts_the_example_config() -> None:
    result = tether("check", "rules/tether.yaml")
    assert result.returncode == 0, result.stderr
    assert "rules/tether.yaml: ok (4 rules" in result.stdout


def test_check_fails_with_file_line_and_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: ok\n    action: allow\n  - id: broken\n    match:\n"
                   "      args: {size: {gt: huge}}\n    action: deny\n")
    result = tether("check", str(bad))
    assert result.returncode == 1
    assert (f"{bad}:6:14: error: rule broken: match.args.size: gt needs a number"
            in result.stderr)


def test_policy_tests_pass_and_a_wrong_expectation_fails(tmp_path: Path) -> None:
    result = tether("test", "rules/tests/janitor_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 0 failed" in result.stdout
    wrong = tmp_path / "wrong_test.yaml"
    wrong.write_text(f"config: {ROOT / 'rules/tether.yaml'}\ncases:\n"
                     "  - {name: prod delete is allowed, tool: delete_volume, "
                     "args: {tags: {env: production}}, expect: allow}\n")
    result = tether("test", str(wrong))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "got deny" in result.stdout


def test_explain_names_every_rule() -> None:
    result = tether("explain", "--config", "rules/tether.yaml", "--tool", "delete_volume",
                    "--args", '{"volume_id": "v", "tags": {"env": "production-candidate"}}')
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "decision: deny"
    assert any(line.strip().startswith("MATCH no-prod-deletes") for line in lines)
    assert any(line.strip().startswith("MATCH deletes-only-disposable") for line in lines)
    assert any(line.strip().startswith("no    no-drop-database") for line in lines)


def test_explain_says_how_a_denial_reaches_the_agent(tmp_path: Path) -> None:
    """The default (continue), and a rule's own on_deny."""
    args = '{"volume_id": "v", "tags": {"env": "production-candidate"}}'
    result = tether("explain", "--config", "rules/tether.yaml", "--tool", "delete_volume",
                    "--args", args)
    assert "on_deny:  continue: the model reads the denial as the call's result" in result.stdout
    config = tmp_path / "tether.yaml"
    config.write_text("rules:\n  - {id: refuse-x, match: {tool: x}, action: deny, on_deny: error}\n")
    result = tether("explain", "--config", str(config), "--tool", "x")
    assert "on_deny:  error: the agent gets an error" in result.stdout, result.stdout
    result = tether("explain", "--config", str(config), "--tool", "y")
    assert "on_deny" not in result.stdout   # allowed: nothing to reach anyone


def test_the_azure_demo_keeps_the_candidate_disk_by_the_tags_tether_looked_up() -> None:
    """`tether demo --cloud azure`: the janitor's ARM deletes through the forward proxy,
    judged by the tags tether fetched from ARM itself (the agent's DELETE names no tag)."""
    result = tether("demo", "--cloud", "azure", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model: disk-cand, disk-tmp look temporary, deleting them" in out
    assert "agent: DELETE disk-cand -> HTTP 403 TetherRequestDenied" in out
    assert "agent: DELETE disk-tmp -> 202, operation polled to Succeeded" in out
    rows = [line.split() for line in out.splitlines() if "/disks/delete" in line
            and line.lstrip()[:1].isdigit()]
    assert [(r[2], r[4]) for r in rows] == [("disk-cand", "DENY"),
                                            ("disk-tmp", "HOLD->APPROVED")]
    assert '"env":"production-candidate"' in rows[0][3] and "no-prod-disk-deletes," in rows[0]
    assert "deleted in ARM:  disk-tmp" in out
    assert "still in ARM:    disk-prod (production), disk-cand (production-candidate)" in out
    assert "tags looked up:  2 (ARM's Tags API, as tether, token from Entra ID 1 time(s))" in out


def test_demo_runs_offline_and_shows_allowed_and_denied() -> None:
    started = time.monotonic()
    result = tether("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    out = result.stdout
    assert "deleted in the cloud: vol-0a1" in out
    assert "still in the cloud:   vol-0b2 (production-candidate), vol-0c3 (production)" in out
    denied = [line for line in out.splitlines() if " DENY " in line]
    assert len(denied) == 2
    assert "no-prod-deletes" in denied[0] and "vol-0b2" in denied[0]
    assert "tether:loop-repeat" in denied[1] and "describe_volume" in denied[1]
    held = [line for line in out.splitlines() if " HOLD->APPROVED " in line]
    assert len(held) == 1 and "vol-0a1" in held[0] and "demo-operator" in held[0]
    assert "2 calls allowed, 1 held for a human, 2 denied" in out
    # The loop breaker's denial was the whole answer: tether sent it to the model (the
    # default, on_deny: continue), which read it and finished, in the same answer.
    last = [line for line in out.splitlines() if line.startswith("  model (")][-1]
    assert "tether:loop-repeat" in last and last.endswith("Cleanup finished.")
    assert "1 denied answer(s) continued" in out


def test_serve_governs_requests_from_the_sdk(tmp_path: Path,
                                             fake_upstream: tuple[FakeOpenAI, int]) -> None:
    fake, upstream_port = fake_upstream
    port, admin = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "tether.yaml"
    config.write_text(f"include: [{ROOT / 'rules/janitor.yaml'}]\naudit: {{path: {audit}}}\n")
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream_port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
         "--admin-port", str(admin)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"proxy on http://127.0.0.1:{port}" in banner
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="sk-x",
                               max_retries=0)
        r = client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "go"}],
            tools=[{"type": "function", "function": {"name": n}}
                   for n in ("get_weather", "delete_volume")])
        client.close()
        assert [c.function.name for c in r.choices[0].message.tool_calls or []
                if c.type == "function"] == ["get_weather"]
        assert "no-prod-deletes" in (r.choices[0].message.content or "")
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0
    actions = [json.loads(line)["action"] for line in audit.read_text().splitlines()]
    assert actions == ["allow", "deny"]
    assert len(fake.requests) == 1
