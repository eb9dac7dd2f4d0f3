"""`tether test` files cannot pass by accident: unknown keys, missing or mistyped values
and files without cases are errors naming the file, line and key; nothing runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.model import Action
from proxy.policy_tests import parse_case_file

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "rules" / "tether.yaml"
# Before: `agrs` was ignored, the call ran with no arguments, deletes-only-disposable
# denied it (no tags) and the case passed without no-prod-deletes ever being tested.
MISSPELT = f"""config: {CONFIG}
cases:
  - name: production is never deleted
    tool: delete_volume
    agrs: {{volume_id: v, tags: {{env: production}}}}
    expect: deny
"""


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize(("text", "line", "key", "message"), [
    (MISSPELT, 5, "cases[0].agrs", "case 'production is never deleted': unknown key "
     "(expected one of name, tool, args, agent, declared, expect, rules, history)"),
    (f"config: {CONFIG}\ncases: []\n", 2, "cases",
     "there are no cases: a file that tests nothing cannot pass"),
    (f"config: {CONFIG}\ncases:\n", 2, "cases", "needs 'cases: [...]'"),
    (f"config: {CONFIG}\n", 1, "cases", "needs 'cases: [...]'"),
    ("", 1, None, "a test file is a mapping"),
    ("# nothing but a comment\n", 1, None, "a test file is a mapping"),
    ("- {tool: x, expect: allow}\n", 1, None, "a test file is a mapping"),
    ("cases: [{tool: x, expect: allow}]\n", 1, "config", "needs 'config: PATH'"),
    (f"config: {CONFIG}\ncase:\n  - {{tool: x, expect: allow}}\n", 2, "case",
     "unknown key (expected one of config, cases)"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: allow}}\n  - just text\n", 2,
     "cases[1]", "a case is a mapping"),
    (f"config: {CONFIG}\ncases:\n  - {{name: n, expect: allow}}\n", 3, "cases[0].tool",
     "case 'n': needs 'tool'"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x}}\n", 3, "cases[0].expect",
     "case 'case 1': needs 'expect': allow, deny or hold"),
    (f"config: {CONFIG}\ncases:\n  - tool: x\n    expect: denied\n", 4, "cases[0].expect",
     "needs 'expect': allow, deny or hold"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: deny, rules: no-prod-deletes}}\n", 3,
     "cases[0].rules", "rules must be a list of names"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: deny, declared: x}}\n", 3,
     "cases[0].declared", "declared must be a list of names"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: deny, args: [1]}}\n", 3,
     "cases[0].args", "args must be a mapping, or the raw JSON text"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: deny, agent: [a]}}\n", 3,
     "cases[0].agent", "agent must be text"),
    (f"config: {CONFIG}\ncases:\n  - {{tool: x, expect: deny}}\n  - {{tool: y, expect: deny, "
     "Expect: allow}\n", 4, "cases[1].Expect", "unknown key"),
])
def test_a_malformed_file_is_an_error(text: str, line: int, key: str | None,
                                      message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_case_file(text, "cases.yaml")
    assert (e.value.file, e.value.line, e.value.key) == ("cases.yaml", line, key)
    assert message in e.value.message


def test_a_good_file_is_read_whole() -> None:
    path = ROOT / "rules" / "tests" / "janitor_test.yaml"
    parsed = parse_case_file(path.read_text(), str(path))
    assert parsed.config == str(path.parent / "../tether.yaml")
    assert len(parsed.cases) == 6
    first, _, third, fourth, *_ = parsed.cases
    assert (first.name, first.tool, first.raw_args, first.expect, first.line) == (
        "listing volumes is allowed", "list_volumes", "{}", Action.ALLOW, 4)
    assert third.rules == {"no-prod-deletes", "deletes-only-disposable"}
    assert fourth.declared == ("Delete_Volume",)
    assert '"ENV": "Production"' in fourth.raw_args


def test_raw_json_args_are_kept_as_written() -> None:
    parsed = parse_case_file(f"config: {CONFIG}\ncases:\n  - tool: x\n    args: '{{\"a\": 1,'\n"
                             "    expect: deny\n", "c.yaml")
    assert parsed.cases[0].raw_args == '{"a": 1,'


def test_the_cli_refuses_a_misspelt_case_and_runs_the_right_one(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_test.yaml"
    wrong.write_text(MISSPELT)
    result = tether("test", str(wrong))
    assert result.returncode == 1
    assert f"error: {wrong}:5: cases[0].agrs: case 'production is never deleted': unknown key" \
        in result.stderr
    assert "passed" not in result.stdout
    # Spelt right, the case runs with its arguments and names the rule it is about.
    right = tmp_path / "right_test.yaml"
    right.write_text(MISSPELT.replace("agrs", "args") + "    rules: [no-prod-deletes]\n")
    result = tether("test", str(right))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 0 failed" in result.stdout


def test_the_cli_refuses_a_file_without_cases(tmp_path: Path) -> None:
    empty = tmp_path / "empty_test.yaml"
    empty.write_text(f"config: {CONFIG}\ncases: []\n")
    result = tether("test", str(ROOT / "rules" / "tests" / "janitor_test.yaml"), str(empty))
    assert result.returncode == 1
    assert f"error: {empty}:2: cases: there are no cases" in result.stderr
    nothing = tmp_path / "nothing_test.yaml"
    nothing.write_text("")
    result = tether("test", str(nothing))
    assert result.returncode == 1 and f"error: {nothing}:1: a test file is a mapping" \
        in result.stderr


def test_the_shipped_cases_still_pass_and_a_wrong_one_fails_with_its_line(
        tmp_path: Path) -> None:
    result = tether("test", *sorted(str(p) for p in (ROOT / "rules" / "tests").glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 0 failed" in result.stdout
    wrong = tmp_path / "wrong_test.yaml"
    wrong.write_text(MISSPELT.replace("agrs", "args").replace("expect: deny", "expect: allow"))
    result = tether("test", str(wrong))
    assert result.returncode == 1
    assert (f"FAIL {wrong}:3: production is never deleted: got deny (rules: no-prod-deletes, "
            "deletes-only-disposable, deletes-need-approval), want allow") in result.stdout
