"""The reload plan without a server: what counts as a change, what is refused, what
waits for a restart; the watched files and their fingerprints; the open-gate warning
of `tether check`; `tether replay` over a log that crosses revisions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy import config
from proxy.cli import main
from proxy.reload import Refused, diff_rules, fingerprint, plan, watched

ROOT = Path(__file__).resolve().parent.parent
BASE = """upstreams:
  openai: {url: https://api.openai.com, api_key_env: OPENAI_API_KEY}
server: {port: 8080}
defaults: {action: allow}
tools:
  get_weather: {effect: read}
agents:
  janitor: {tools: ["get_*", "delete_*"]}
budgets:
  session: {tokens: 1000, llm_calls: 5}
approvals: {timeout: 60s, max_pending: 10}
apis:
  jira: {url: https://jira.example.com, spec: openapi/jira.yaml}
opa: {embedded: opa}
include: [more.yaml]
rules:
  - id: a
    match: {tool: delete_*, args: {tags.env: {in: [production]}}}
    action: deny
  - id: b
    match: {tool: resize_*}
    action: hold
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "openapi").mkdir()
    (tmp_path / "openapi" / "jira.yaml").write_text(
        (ROOT / "rules" / "openapi" / "jira.yaml").read_text())
    (tmp_path / "opa").mkdir()
    (tmp_path / "opa" / "tether.rego").write_text((ROOT / "rules/opa/tether.rego").read_text())
    (tmp_path / "opa" / "data.json").write_text((ROOT / "rules/opa/data.json").read_text())
    (tmp_path / "more.yaml").write_text("rules:\n  - {id: c, match: {tool: x}, action: deny}\n")
    (tmp_path / "tether.yaml").write_text(BASE)
    return tmp_path / "tether.yaml"


def test_the_same_files_loaded_twice_change_nothing(files: Path) -> None:
    assert plan(config.load(files), config.load(files)).empty


def test_every_file_the_policy_was_read_from_is_watched_as_named(files: Path) -> None:
    cfg = config.load(files)
    d = files.parent
    assert set(watched(cfg)) == {str(files), str(d / "more.yaml"), str(d / "openapi/jira.yaml"),
                                 str(d / "opa"), str(d / "opa/tether.rego"),
                                 str(d / "opa/data.json")}


def test_a_fingerprint_changes_with_an_overwrite_a_rename_and_a_vanished_file(
        tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("one")
    first = fingerprint([str(f)])
    f.write_text("two!")
    second = fingerprint([str(f)])
    assert second != first
    (tmp_path / "b").write_text("two!")
    os.replace(tmp_path / "b", f)
    assert fingerprint([str(f)]) != second
    f.unlink()
    assert fingerprint([str(f)]) == ((str(f), None),)


@pytest.mark.parametrize(("edit", "rules", "changed"), [
    (lambda t: t.replace("action: hold", "action: deny"), ([], [], ["b"]), ["policy"]),
    (lambda t: t + "  - {id: d, match: {tool: y}, action: deny}\n", (["d"], [], []), ["policy"]),
    (lambda t: t.replace("  - id: b\n    match: {tool: resize_*}\n    action: hold\n", ""),
     ([], ["b"], []), ["policy"]),
    (lambda t: t.replace("tokens: 1000", "tokens: 2000"), ([], [], []), ["policy", "budgets"]),
    (lambda t: t.replace("timeout: 60s", "timeout: 90s"), ([], [], []), ["approvals"]),
    (lambda t: "# a comment\n" + t, ([], [], []), []),
])
def test_what_changed_is_named_by_rule_id_and_section(files: Path, edit, rules, changed) -> None:  # type: ignore[no-untyped-def]
    running = config.load(files)
    files.write_text(edit(BASE))
    p = plan(running, config.load(files))
    assert (list(p.rules.added), list(p.rules.removed), list(p.rules.changed)) == rules
    assert list(p.changed) == changed and p.needs_restart == ()


def test_moving_a_rule_is_no_change(files: Path) -> None:
    running = config.load(files)
    files.write_text(BASE.replace("rules:\n", "rules:\n\n\n"))
    assert plan(running, config.load(files)).empty


def test_what_needs_a_restart_is_reported_and_kept_as_it_runs(files: Path) -> None:
    running = config.load(files)
    files.write_text(BASE.replace("port: 8080", "port: 8081")
                     .replace("max_pending: 10", "max_pending: 20")
                     .replace("https://api.openai.com", "https://other.example")
                     + "store: redis://127.0.0.1:6379/0\naudit: {path: /tmp/elsewhere.jsonl}\n")
    p = plan(running, config.load(files))
    assert set(p.needs_restart) == {"server.port", "upstreams", "store", "audit.path",
                                    "approvals.max_pending"}
    kept = p.config
    assert (kept.port, kept.store_url, kept.audit_path, kept.upstreams) == (
        running.port, running.store_url, running.audit_path, running.upstreams)
    assert kept.approvals.max_pending == 10


@pytest.mark.parametrize("text", ["", "# nothing\n", "upstreams: {openai: {url: https://x.example}}\n",
                                  "defaults: {on_error: deny}\n"])
def test_a_config_that_opens_the_gate_is_refused(files: Path, text: str) -> None:
    running = config.load(files)
    files.write_text(text)
    new = config.load(files)
    assert new.open_gate
    with pytest.raises(Refused, match="allows every call"):
        plan(running, new)


def test_an_explicit_allow_with_no_rules_is_what_it_says(files: Path) -> None:
    running = config.load(files)
    files.write_text("defaults: {action: allow}\n")
    new = config.load(files)
    assert not new.open_gate and set(plan(running, new).rules.removed) == {"a", "b", "c"}


def test_check_and_serve_warn_about_an_open_gate(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["check", str(empty)]) == 0
    err = capsys.readouterr().err
    assert "no rules and no defaults.action: every tool call is allowed" in err
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("defaults: {action: allow}\n")
    assert main(["check", str(explicit)]) == 0
    assert "every tool call" not in capsys.readouterr().err


def test_diff_rules_by_id() -> None:
    a = config.load(ROOT / "rules" / "janitor.yaml").policy.rules
    assert not diff_rules(a, a)
    d = diff_rules(a, a[1:])
    assert d.removed == (a[0].id,) and not d.added and not d.changed


def test_replay_reads_a_log_across_revisions(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tether.yaml"
    cfg.write_text("defaults: {action: allow}\nrules:\n"
                   "  - {id: no-deletes, match: {tool: delete_*}, action: deny}\n")
    log = tmp_path / "audit.jsonl"
    lines = [
        {"kind": "decision", "tool": "delete_volume", "arguments": {}, "action": "allow",
         "rules": [], "policy_revision": "aaaaaaaaaaaa"},
        {"kind": "reload", "result": "ok", "old_revision": "aaaaaaaaaaaa",
         "revision": "bbbbbbbbbbbb", "rules": {"added": ["no-deletes"], "removed": [],
                                               "changed": []}},
        {"kind": "decision", "tool": "delete_volume", "arguments": {}, "action": "deny",
         "rules": ["no-deletes"], "policy_revision": "bbbbbbbbbbbb"},
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["replay", str(log), "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 2 and out["changed"] == 1
    assert out["recorded_revisions"] == {"aaaaaaaaaaaa": 1, "bbbbbbbbbbbb": 1}
    assert [c["old"]["revision"] for c in out["calls"]] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    assert main(["replay", str(log), "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "recorded under 2 revisions: aaaaaaaaaaaa (1), bbbbbbbbbbbb (1)" in text
    assert "reload at" in text and "aaaaaaaaaaaa -> bbbbbbbbbbbb" in text
