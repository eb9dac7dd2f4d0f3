"""`tether check` reports every error in every file in one run (file:line:column, the key
path, what was expected), then the warnings apart; `--format json` for CI. And the
commands that set a config up: `tether init`, `tether schema`, `tether --version`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from proxy.config_reference import schema

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
include: [rules.yaml]
defaults: {action: maybe}
server:
  port: 99999
budgets:
  session: {tokens: 100, repeets: 3}
"""
RULES = """\
tools:
  get_volume: {effect: read}
rules:
  - id: a
    match: {tool: get_volume}
    action: allow
  - id: b
    match: {tool: get_volume, args: {size: {gt: huge}}}
    action: deny
  - id: c
    match: {tool: get_volume}
    action: allow
  - id: d
    match: {tool: "delete_*"}
    action: deny
  - id: e
    mtach: {tool: get_volume}
    action: deny
"""


def tether(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _five(tmp_path: Path) -> Path:
    (tmp_path / "tether.yaml").write_text(CONFIG)
    (tmp_path / "rules.yaml").write_text(RULES)
    return tmp_path / "tether.yaml"


def test_five_mistakes_in_two_files_are_all_reported(tmp_path: Path) -> None:
    config, rules = _five(tmp_path), tmp_path / "rules.yaml"
    out = tether("check", str(config))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert errors == [
        f"{config}:2:12: error: defaults.action: must be one of allow, hold, deny",
        f"{config}:4:3: error: server.port: must be a port number",
        f"{config}:6:26: error: budgets.session.repeets: unknown key (expected one of "
        "cost_usd, input_tokens, llm_calls, max_age, mode, output_tokens, pingpong, repeats, "
        "tokens, tools, trip)",
        f"{rules}:8:38: error: rule b: match.args.size: gt needs a number",
        f"{rules}:17:5: error: rule e: mtach: unknown key (expected one of action, approvers, "
        "description, id, match, message, mode, on_deny, timeout)",
    ], out.stderr
    warnings = lines[len(errors):]   # apart, after every error
    assert warnings == [
        f"{rules}:10:5: warning: rule c: match: shadowed: rule a ({rules}:4) has the same "
        "match and action allow, as strict or stricter; this rule never changes a decision",
        f"{rules}:13:5: warning: rule d: match.tool: no tool can match: tools: declares "
        "get_volume and none fits match.tool",
    ], out.stderr
    assert out.stdout.strip() == f"{config}: 5 errors"


def test_rules_that_fail_to_load_are_not_also_an_open_gate(tmp_path: Path) -> None:
    """A config whose only rule is broken has errors; it is not warned of as a config
    that allows every call on purpose."""
    config = tmp_path / "tether.yaml"
    config.write_text("rules:\n  - id: a\n    match: {tool: x}\n    action: explode\n")
    out = tether("check", str(config))
    assert out.returncode == 1
    assert "action must be allow, deny or hold" in out.stderr
    assert "every tool call is allowed" not in out.stderr + out.stdout
    config.write_text("server: {port: 8080}\n")   # no rules at all: the warning stays
    assert "every tool call is allowed" in tether("check", str(config)).stderr


def test_json_output_for_ci_annotations(tmp_path: Path) -> None:
    config = _five(tmp_path)
    out = tether("check", "--format", "json", str(config), "rules/tether.yaml")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False
    assert [(f["file"], f["ok"], f["errors"]) for f in report["files"]] == [
        (str(config), False, 5), ("rules/tether.yaml", True, 0)]
    problems = report["problems"]
    assert [p["severity"] for p in problems] == ["error"] * 5 + ["warning"] * 2
    first = problems[0]
    assert first == {"severity": "error", "file": str(config), "line": 2, "column": 12,
                     "key": "defaults.action", "rule": None,
                     "message": "must be one of allow, hold, deny"}
    assert {p["rule"] for p in problems if p["file"].endswith("rules.yaml")} == {
        "b", "e", "c", "d"}


def test_an_unreadable_include_is_named_where_it_is_included(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("defaults: {action: deny}\ninclude: [gone.yaml]\nrules: [{id: x}]\n")
    out = tether("check", str(config))
    assert out.returncode == 1
    assert f"{config}:2:1: error: include: gone.yaml: cannot read" in out.stderr
    assert f"{config}:3" in out.stderr and "rule x" in out.stderr   # and the rest goes on


def test_an_id_yaml_reads_as_a_boolean_or_a_number_says_so(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("rules:\n  - id: no\n    match: {tool: a}\n    action: deny\n"
                      "  - id: 42\n    match: {tool: b}\n    action: deny\n")
    out = tether("check", str(config))
    assert out.returncode == 1
    assert f"{config}:2:" in out.stderr and "'id' is the bool false here" in out.stderr
    assert 'quote the id (id: "no")' in out.stderr
    assert f"{config}:5:" in out.stderr and "'id' is the int 42 here" in out.stderr


def test_a_yaml_syntax_error_has_its_column(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("rules:\n  - id: a\n    action: [deny\n")
    out = tether("check", "--format", "json", str(config))
    assert out.returncode == 1
    (problem,) = json.loads(out.stdout)["problems"]
    assert problem["line"] == 4 and problem["column"] == 1
    assert problem["message"].startswith("invalid YAML")


def test_serve_still_stops_at_the_first_error(tmp_path: Path) -> None:
    from proxy import config
    from proxy.errors import ConfigError

    try:
        config.load(_five(tmp_path))
    except ConfigError as e:
        assert e.line is not None and e.file is not None
    else:
        raise AssertionError("a config with five mistakes loaded")


def test_init_writes_a_starter_that_check_accepts(tmp_path: Path) -> None:
    out = tether("init", str(tmp_path / "new"))
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert written == ["rules.yaml", "tether.schema.json", "tether.yaml"]
    config = (tmp_path / "new" / "tether.yaml").read_text()
    assert config.startswith("# yaml-language-server: $schema=./tether.schema.json\n")
    assert json.loads((tmp_path / "new" / "tether.schema.json").read_text()) == schema()
    out = tether("check", str(tmp_path / "new" / "tether.yaml"))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "ok (2 rules" in out.stdout
    decided = tether("explain", "--config", str(tmp_path / "new" / "tether.yaml"),
                     "--tool", "delete_volume", "--args", '{"tags": {"env": "production"}}')
    assert decided.stdout.startswith("decision: deny"), decided.stdout


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "tether.yaml").write_text("mine\n")
    out = tether("init", str(tmp_path))
    assert out.returncode == 1 and "already exist" in out.stderr and "--force" in out.stderr
    assert (tmp_path / "tether.yaml").read_text() == "mine\n"
    assert not (tmp_path / "rules.yaml").exists()
    out = tether("init", "--force", str(tmp_path))
    assert out.returncode == 0 and (tmp_path / "tether.yaml").read_text() != "mine\n"


def test_schema_prints_the_schema_and_the_reference(tmp_path: Path) -> None:
    out = tether("schema")
    assert out.returncode == 0 and json.loads(out.stdout) == schema()
    jsonschema.Draft202012Validator.check_schema(json.loads(out.stdout))
    target = tmp_path / "ref.md"
    assert tether("schema", "--format", "markdown", "-o", str(target)).returncode == 0
    assert target.read_text() == (ROOT / "docs" / "config-reference.md").read_text()


def test_version() -> None:
    import proxy

    out = tether("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"tether {proxy.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{proxy.__version__}"' in pyproject   # the fallback keeps up
