"""The config reference and its JSON Schema are written from the tables the loader takes
its allowed keys from (proxy/config_tables*.py), so neither can drift from the loader:
the committed files must be what the generator writes now, no parser may accept a key
no table lists, and every example config in the repo validates against the schema and
loads."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy import config
from proxy.cli_setup import CONFIG, RULES
from proxy.config_keys import Table
from proxy.config_reference import REFERENCE_FILE, SCHEMA_FILE, reference, schema, schema_text
from proxy.config_tables import INCLUDED, TOP
from proxy.errors import ConfigError
from proxy.policy.source import YMap, load_yaml
from tests.conftest import POLICY

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"
CHECKERS = {"check_keys", "_keys", "_check_keys"}


def _tables() -> list[Table]:
    out: list[Table] = []
    todo = [TOP, INCLUDED]
    while todo:
        t = todo.pop()
        if any(t is seen for seen in out):
            continue
        out.append(t)
        todo += [k.keys or k.each for k in t if (k.keys or k.each) is not None]  # type: ignore[misc]
    return out


def _parsers() -> list[Path]:
    """The modules that read config mappings."""
    return sorted(p for p in PROXY.rglob("*.py") if "YMap" in p.read_text(encoding="utf-8"))


def test_the_committed_reference_and_schema_are_what_the_tables_write() -> None:
    fix = "run `python -m proxy.config_reference` and commit the result"
    assert (ROOT / "docs" / REFERENCE_FILE).read_text(encoding="utf-8") == reference(), fix
    assert (ROOT / "docs" / SCHEMA_FILE).read_text(encoding="utf-8") == schema_text(), fix
    jsonschema.Draft202012Validator.check_schema(schema())


def test_the_reference_lists_every_key_of_every_table() -> None:
    text = reference()
    for t in _tables():
        for key in t:
            assert f"| `{key.name}` |" in text, f"{t.title}.{key.name}"


def test_every_key_set_a_parser_holds_is_a_tables() -> None:
    """A module-level *KEYS set in a parser is (part of) one table's keys."""
    names = [t.names for t in _tables()]
    found = 0
    for path in _parsers():
        module = importlib.import_module(
            ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for attr, value in vars(module).items():
            sets = list(value.values()) if isinstance(value, dict) else [value]
            if not attr.endswith("KEYS") or not all(isinstance(s, set | frozenset)
                                                    for s in sets):
                continue
            for keys in sets:
                found += 1
                assert any(keys <= n for n in names), (
                    f"{path.name}: {attr} accepts {sorted(keys)}, not all in one table: "
                    "add the keys to proxy/config_tables*.py")
    assert found >= 20


def _literal(node: ast.expr) -> bool:
    return isinstance(node, ast.Set | ast.Tuple | ast.List) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)


def test_no_parser_accepts_keys_written_inline() -> None:
    """Allowed keys come from a table: no key check is given a literal set, and no loop
    over a mapping's keys compares them with one (`for key in node: if key not in (...)`)."""
    offenders = []
    for path in _parsers():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in CHECKERS and len(node.args) > 1
                    and _literal(node.args[1])):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                var = node.target.id
                for inner in ast.walk(node):
                    if (isinstance(inner, ast.Compare) and isinstance(inner.left, ast.Name)
                            and inner.left.id == var and isinstance(inner.ops[0], ast.NotIn)
                            and _literal(inner.comparators[0])):
                        offenders.append(f"{path.name}:{inner.lineno}")
    assert not offenders, f"allowed keys written inline, not taken from a table: {offenders}"


def test_a_key_left_out_of_a_table_is_refused(tmp_path: Path) -> None:
    """The loader's own check follows the table: a key the reference does not list is an
    error naming it, at every depth."""
    file = tmp_path / "t.yaml"
    for text, key in [("server: {prot: 1}\n", "server.prot"),
                      ("budgets: {session: {tokns: 5}}\n", "budgets.session.tokns"),
                      ("rules: [{id: a, action: deny, match: {tol: x}}]\n", "match.tol"),
                      ("audit: {sinks: [{type: stdout, pth: x}]}\n", "audit.sinks[0].pth")]:
        file.write_text(text)
        with pytest.raises(ConfigError, match="unknown key") as info:
            config.load(file)
        assert info.value.key == key


def _validate(doc: object, where: str) -> None:
    errors = [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema()).iter_errors(doc)]
    assert not errors, errors


def _deploy_config(tmp_path: Path) -> Path:
    """The sidecar's config with its mounted secrets and volumes moved under tmp_path."""
    dst = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy/k8s/base/config", dst)
    text = (dst / "tether.yaml").read_text()
    (tmp_path / "secrets").mkdir()
    for name in re.findall(r"/var/run/secrets/tether/(\w+)", text):
        (tmp_path / "secrets" / name).write_text("sk-test\n")
    text = text.replace("/var/run/secrets/tether", str(tmp_path / "secrets"))
    (dst / "tether.yaml").write_text(text.replace("/var/lib/tether", str(tmp_path / "state")))
    return dst / "tether.yaml"


def test_every_example_config_validates_and_loads(tmp_path: Path) -> None:
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "tether.yaml").write_text(CONFIG)
    (tmp_path / "init" / "rules.yaml").write_text(RULES)
    (tmp_path / "policy.yaml").write_text(POLICY)
    mains = [ROOT / "rules/tether.yaml", _deploy_config(tmp_path),
             tmp_path / "init" / "tether.yaml", tmp_path / "policy.yaml"]
    loaded = 0
    for main in mains:
        cfg = config.load(main, env={})
        for file in cfg.files:   # the main file and every file it includes
            if file.endswith((".yaml", ".yml")) and "openapi" not in file:
                _validate(load_yaml(Path(file).read_text(), file), file)
                loaded += 1
    gateway = ROOT / "deploy/k8s/overlays/gateway/tether.yaml"
    _validate(load_yaml(gateway.read_text(), str(gateway)), str(gateway))
    assert loaded >= 7


def _doc_snippets() -> list[tuple[str, object]]:
    """The README's and docs/' YAML blocks marked as a config or a rule file
    (tests/test_docs_examples.py loads them too)."""
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = md.read_text(encoding="utf-8")
        for m in re.finditer(r"<!-- example: (?:config|rules)\b[^>]*-->\n```yaml\n(.*?)```",
                             text, re.DOTALL):
            out.append((f"{md.name}:{text[:m.start()].count(chr(10)) + 2}",
                        yaml.safe_load(m.group(1))))
    return out


def test_the_docs_config_examples_validate() -> None:
    snippets = _doc_snippets()
    assert len(snippets) >= 5
    for where, doc in snippets:
        _validate(json.loads(json.dumps(doc, default=str)), where)


def test_the_schema_catches_what_the_loader_refuses() -> None:
    """Not a schema that accepts anything: typos, wrong types and closed values fail."""
    validator = jsonschema.Draft202012Validator(schema())
    for bad in [{"rulez": []}, {"server": {"port": "eighty"}},
                {"rules": [{"id": "a", "action": "maybe"}]},
                {"rules": [{"action": "deny"}]},
                {"budgets": {"session_ttl": "soon"}},
                {"audit": {"sinks": [{"type": "stdout", "pth": "x"}]}}]:
        assert list(validator.iter_errors(bad)), bad
    assert not list(validator.iter_errors(YMap({"rules": [{"id": "a", "action": "deny"}]})))


def _seconds(value: object) -> float:
    from proxy.policy.rules import parse_duration

    return parse_duration(value, ConfigError)


def test_the_documented_defaults_are_the_loaders(tmp_path: Path) -> None:
    """What an empty config loads to is what the reference says each default is."""
    from proxy import config_tables as policy_keys
    from proxy import config_tables_run as run

    file = tmp_path / "empty.yaml"
    file.write_text("")
    cfg = config.load(file, env={})
    p, b, a = cfg.policy, cfg.budgets, cfg.approvals
    pairs: list[tuple[object, object]] = [
        (run.SERVER["host"].default, cfg.host), (run.SERVER["port"].default, cfg.port),
        (run.SERVER["admin_port"].default, cfg.admin_port),
        (_seconds(run.SERVER["drain_timeout"].default), cfg.connections.drain_timeout_s),
        (_seconds(run.SERVER["idle_timeout"].default), cfg.connections.idle_timeout_s),
        (run.SERVER["max_connections"].default, cfg.connections.max_connections),
        (run.LIMITS["max_body_bytes"].default, cfg.max_body_bytes),
        (run.LIMITS["max_response_bytes"].default, cfg.max_response_bytes),
        (run.LIMITS["max_arguments_bytes"].default, cfg.max_arguments_bytes),
        (run.LIMITS["upstream_timeout"].default, cfg.upstream_timeout_s),
        (run.ADMIN["token_env"].default, cfg.admin_token_env),
        (run.IDENTITY["trust_headers"].default, cfg.trust_identity_headers),
        (run.AUDIT["max_bytes"].default, cfg.audit.max_bytes),
        (run.AUDIT["fsync"].default, cfg.audit.fsync.value),
        (run.AUDIT["fsync_interval"].default, cfg.audit.fsync_interval_s),
        (run.SPOOL["max_bytes"].default, cfg.audit_shipping.spool.max_bytes),
        (_seconds(run.APPROVALS["timeout"].default), a.timeout_s),
        (_seconds(run.APPROVALS["lease"].default), a.lease_s),
        (run.APPROVALS["max_pending"].default, a.max_pending),
        (policy_keys.TOP["store"].default, cfg.store_url),
        (policy_keys.DEFAULTS["action"].default, p.default_action.value),
        (policy_keys.DEFAULTS["on_error"].default, p.on_error.value),
        (policy_keys.DEFAULTS["undeclared_tools"].default, p.undeclared_tools.value),
        (policy_keys.DEFAULTS["on_store_error"].default, cfg.on_store_error.value),
        (policy_keys.DEFAULTS["filter_tools"].default, p.filter_tools),
        (policy_keys.DEFAULTS["on_deny"].default, p.on_deny.value),
        (policy_keys.DEFAULTS["max_continuations"].default, p.max_continuations),
        (policy_keys.BUDGETS["max_output_tokens"].default, b.max_output_tokens),
        (_seconds(policy_keys.BUDGETS["session_ttl"].default), b.session_ttl_s),
        (run.TELEMETRY["legacy_gen_ai_system"].default, cfg.telemetry.legacy_gen_ai_system),
    ]
    assert [d for d, _ in pairs] == [v for _, v in pairs]
