"""OPA, without a socket: the input document, every answer shape, the config section,
the embedded engine and the `tether opa-test` runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import cli
from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.model import Action, Effect, Exchange, ToolCall
from proxy.opa.embedded import EmbeddedOpa
from proxy.opa.testing import run_tests
from proxy.policy.opa import (
    BAD_RESULT,
    INPUT_VERSION,
    UNAVAILABLE,
    UNDEFINED,
    Defined,
    Failed,
    Undefined,
    budget_view,
    input_for,
    interpret,
    read_http,
)

RULES = Path(__file__).resolve().parent.parent / "rules" / "opa"
PATH = "tether/decision"
OPA_RULE = "opa:tether/decision"
EXCHANGE = Exchange(provider="openai", model="gpt-4o", declared_tools=("resize_volume",),
                    session="s-1", agent="janitor", endpoint="v1/chat/completions",
                    claims={"roles": ["viewer"], "sub": "u-1"})
KEYS = {"version", "source", "agent", "claims", "session", "provider", "model", "endpoint",
        "tool", "arguments", "raw_arguments", "effect", "api", "declared_tools", "budget"}


# --- the input document ---------------------------------------------------------------

def test_input_document_carries_every_field() -> None:
    call = ToolCall(id="call_1", name="resize_volume", raw_arguments='{"size_gb": 5}',
                    arguments={"size_gb": 5})
    budget = budget_view({"tokens": 1200, "cost_usd": 2_500_000, "tool:resize_volume": 2,
                          "first_seen": 17}, {"tokens": 10000, "cost_usd": 5_000_000})
    doc = input_for(call, EXCHANGE, source="llm", effect=Effect.WRITE, api="volumes.resize",
                    budget=budget).document()
    assert set(doc) == KEYS
    assert doc == {
        "version": INPUT_VERSION, "source": "llm", "agent": "janitor",
        "claims": {"roles": ["viewer"], "sub": "u-1"}, "session": "s-1", "provider": "openai",
        "model": "gpt-4o", "endpoint": "v1/chat/completions", "tool": "resize_volume",
        "arguments": {"size_gb": 5}, "raw_arguments": None, "effect": "write",
        "api": "volumes.resize", "declared_tools": ["resize_volume"],
        "budget": {"scope": "session", "used": {"tokens": 1200, "cost_usd": 2.5},
                   "limits": {"tokens": 10000, "cost_usd": 5.0},
                   "remaining": {"tokens": 8800, "cost_usd": 2.5},
                   "tool_calls": {"resize_volume": 2}, "mode": "enforce"},
    }


def test_unparseable_arguments_are_null_with_the_raw_text() -> None:
    call = ToolCall(id="c", name="resize_volume", raw_arguments='{"size_gb": ', arguments=None,
                    problem="the arguments are not valid JSON")
    doc = input_for(call, EXCHANGE, source="llm", effect=Effect.WRITE).document()
    assert doc["arguments"] is None and doc["raw_arguments"] == '{"size_gb": '
    assert doc["budget"] is None and doc["api"] is None


def test_the_cache_key_ignores_call_ids_and_follows_the_content() -> None:
    one = ToolCall(id="call_1", name="t", raw_arguments='{"a": 1}', arguments={"a": 1})
    two = ToolCall(id="call_2", name="t", raw_arguments='{ "a" : 1 }', arguments={"a": 1})
    other = ToolCall(id="call_1", name="t", raw_arguments='{"a": 2}', arguments={"a": 2})

    def key(c: ToolCall) -> str:
        return input_for(c, EXCHANGE, source="llm", effect=Effect.READ).key()

    assert key(one) == key(two) != key(other)
    text = input_for(one, EXCHANGE, source="llm", effect=Effect.READ).canonical()
    assert "call_1" not in text and json.loads(text)["arguments"] == {"a": 1}


# --- answers ----------------------------------------------------------------------------

HTTP = [
    (200, b'{"result": true}', Defined(True)),
    (200, b'{"result": {"allow": true}, "decision_id": "x"}', Defined({"allow": True})),
    (200, b"{}", Undefined()),
    (200, b'{"warning": {"code": "api_usage_warning"}}', Undefined()),
    (200, b'{"result": null}', Defined(None)),
    (200, b"not json", Failed("bad_json", "")),
    (200, b"", Failed("bad_json", "")),
    (200, b"[true]", Failed("bad_json", "")),
    (200, b'"true"', Failed("bad_json", "")),
    (200, b'{"result": true, "result": false}', Failed("bad_json", "")),
    (200, b'{"result": NaN}', Failed("bad_json", "")),
    (200, b"\xff\xfe", Failed("bad_json", "")),
    (400, b'{"code": "invalid_parameter", "message": "bad"}', Failed("status", "")),
    (404, b"", Failed("status", "")),
    (500, b'{"code": "internal_error", "message": "x"}', Failed("status", "")),
    (503, b"<html>", Failed("status", "")),
]


@pytest.mark.parametrize(("status", "body", "want"), HTTP)
def test_read_http(status: int, body: bytes, want: object) -> None:
    got = read_http(status, body)
    if isinstance(want, Failed):
        assert isinstance(got, Failed) and got.reason == want.reason
    else:
        assert got == want


def test_a_status_names_opas_error_code() -> None:
    got = read_http(500, b'{"code": "internal_error", "message": "conflict"}')
    assert isinstance(got, Failed) and got.detail == "HTTP 500 (internal_error)"


RESULTS: list[tuple[object, Action, str, str | None]] = [
    # (result, action, rule id, error reason)
    (True, Action.ALLOW, OPA_RULE, None),
    (False, Action.DENY, OPA_RULE, None),
    ({"allow": True}, Action.ALLOW, OPA_RULE, None),
    ({"allow": True, "action": "allow"}, Action.ALLOW, OPA_RULE, None),
    ({"allow": False}, Action.DENY, OPA_RULE, None),
    ({"allow": False, "reason": "no"}, Action.DENY, OPA_RULE, None),
    ({"allow": True, "action": "deny"}, Action.DENY, OPA_RULE, None),
    ({"allow": True, "action": "hold"}, Action.HOLD, OPA_RULE, None),
    ({"allow": False, "action": "hold", "reason": "big"}, Action.HOLD, OPA_RULE, None),
    ({"action": "allow"}, Action.DENY, OPA_RULE, None),          # allow: true is required
    ({"action": "hold"}, Action.HOLD, OPA_RULE, None),
    ({}, Action.DENY, OPA_RULE, None),                           # an object without allow
    ({"allowed": True}, Action.DENY, OPA_RULE, None),            # a misspelt key allows nothing
    ({"allow": "true"}, Action.DENY, BAD_RESULT, "bad_result"),
    ({"allow": 1}, Action.DENY, BAD_RESULT, "bad_result"),
    ({"allow": None}, Action.DENY, OPA_RULE, None),              # null reads as absent
    ({"allow": True, "action": "ALLOW"}, Action.DENY, BAD_RESULT, "bad_result"),
    ({"allow": True, "action": 1}, Action.DENY, BAD_RESULT, "bad_result"),
    ({"allow": True, "reason": 5}, Action.DENY, BAD_RESULT, "bad_result"),
    ("true", Action.DENY, BAD_RESULT, "bad_result"),
    ("allow", Action.DENY, BAD_RESULT, "bad_result"),
    (1, Action.DENY, BAD_RESULT, "bad_result"),
    (1.0, Action.DENY, BAD_RESULT, "bad_result"),
    (0, Action.DENY, BAD_RESULT, "bad_result"),
    (None, Action.DENY, BAD_RESULT, "bad_result"),
    ([True], Action.DENY, BAD_RESULT, "bad_result"),
    ([], Action.DENY, BAD_RESULT, "bad_result"),
]


@pytest.mark.parametrize(("result", "action", "rule", "error"), RESULTS)
def test_interpret_results(result: object, action: Action, rule: str, error: str | None) -> None:
    v = interpret(Defined(result), PATH)
    assert (v.trace.action, v.trace.rule_id, v.error) == (action, rule, error)
    assert v.trace.matched
    assert v.cacheable is (error is None)
    assert v.result == ("error" if error else action.value)


@pytest.mark.parametrize(("reply", "rule", "reason"), [
    (Undefined(), UNDEFINED, "undefined"),
    (Failed("connect", "ClientConnectorError"), UNAVAILABLE, "connect"),
    (Failed("timeout", "no answer within 0.25 s"), UNAVAILABLE, "timeout"),
    (Failed("status", "HTTP 500"), UNAVAILABLE, "status"),
    (Failed("eval", "conflict"), UNAVAILABLE, "eval"),
    (Failed("internal", "KeyError"), UNAVAILABLE, "internal"),
    (Failed("bad_json", "not JSON"), BAD_RESULT, "bad_json"),
])
def test_failures_deny_and_are_never_cached(reply: Undefined | Failed, rule: str,
                                            reason: str) -> None:
    v = interpret(reply, PATH)
    assert (v.trace.action, v.trace.rule_id, v.error, v.result) == (Action.DENY, rule, reason,
                                                                     "error")
    assert not v.cacheable and "fail closed" in v.trace.reason


def test_the_reason_reaches_the_trace_bounded_and_on_one_line() -> None:
    v = interpret(Defined({"allow": False, "reason": "line one\nline\x00two " + "x" * 1000}), PATH)
    assert v.trace.reason.startswith("line one line two xxx")
    assert len(v.trace.reason) == 300 and "\n" not in v.trace.reason
    held = interpret(Defined({"action": "hold", "reason": "  "}), PATH)
    assert held.trace.reason == "held by the OPA policy"


# --- config -----------------------------------------------------------------------------

def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> config_mod.Config:
    path = tmp_path / "tether.yaml"
    path.write_text(text)
    return config_mod.load(path, env=env or {})


def test_config_remote_and_embedded(tmp_path: Path) -> None:
    cfg = load(tmp_path, "opa: {url: 'http://opa:8181/', path: /a/b_c/, timeout: 1, "
                         "cache: {ttl: 0}}\n")
    assert cfg.opa is not None and cfg.opa.url == "http://opa:8181" and cfg.opa.path == "a/b_c"
    assert cfg.opa.cache_ttl_s == 0 and cfg.opa.timeout_s == 1.0 and not cfg.warnings
    env = load(tmp_path, "opa: {url: 'http://opa:8181'}\n",
               {"TETHER_UPSTREAM_OPA": "http://127.0.0.1:9/"})
    assert env.opa is not None and env.opa.url == "http://127.0.0.1:9"
    emb = load(tmp_path, f"opa: {{embedded: {RULES}}}\n")
    assert emb.opa is not None and emb.opa.embedded
    assert [name for name, _ in emb.opa.modules] == ["tether.rego"]   # no *_test.rego
    assert emb.opa.data is not None and emb.opa.path == "tether/decision"
    assert emb.policy.revision != load(tmp_path, "{}\n").policy.revision
    assert load(tmp_path, "{}\n").opa is None


@pytest.mark.parametrize(("text", "message"), [
    ("opa: {}\n", "exactly one of url"),
    ("opa: {url: 'http://x', embedded: rules}\n", "exactly one of url"),
    ("opa: {url: 'ftp://x'}\n", r"not an http\(s\) URL"),
    ("opa: {url: 'http://x', path: 'a/b-c'}\n", "Rego identifier"),
    ("opa: {url: 'http://x', path: 'a//b'}\n", "Rego identifier"),
    ("opa: {url: 'http://x', timeout: 0}\n", "positive number"),
    ("opa: {url: 'http://x', cache: {size: 0}}\n", "positive whole number"),
    ("opa: {url: 'http://x', cache: {ttl: -1}}\n", "0 or more"),
    ("opa: {url: 'http://x', bogus: 1}\n", "unknown key"),
    ("opa: {embedded: nowhere}\n", "no such directory"),
])
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_a_rego_syntax_error_fails_at_load_naming_file_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "ok.rego").write_text("package tether\n\ndecision := true\n")
    (policy / "broken.rego").write_text("package tether\n\nimport rego.v1\n\nx := {\n")
    with pytest.raises(ConfigError, match=r"broken\.rego:5") as e:
        load(tmp_path, "opa: {embedded: policy}\n")
    assert "opa.embedded" in str(e.value)
    (policy / "broken.rego").unlink()
    (policy / "only_test.rego").unlink(missing_ok=True)
    assert load(tmp_path, "opa: {embedded: policy}\n").opa is not None


# --- the embedded engine ----------------------------------------------------------------

def doc(**kw: object) -> str:
    base: dict[str, object] = {"version": 1, "source": "llm", "agent": "janitor", "claims": {},
                               "effect": "write", "tool": "resize_volume",
                               "arguments": {"size_gb": 5}}
    return json.dumps({**base, **kw})


def test_embedded_engine_answers_like_the_data_api() -> None:
    from proxy.opa.settings import read_policy_dir

    modules, data = read_policy_dir(RULES)
    engine = EmbeddedOpa(modules, data, PATH)
    try:
        assert engine.evaluate(doc(effect="read")) == Defined({"allow": True})
        denied = engine.evaluate(doc())
        assert isinstance(denied, Defined) and isinstance(denied.value, dict)
        assert denied.value["allow"] is False and "deployer role" in denied.value["reason"]
        held = engine.evaluate(doc(agent="deployer-bot", arguments={"size_gb": 900}))
        assert isinstance(held, Defined) and isinstance(held.value, dict)
        assert held.value["action"] == "hold"
        assert engine.evaluate(doc(agent="deployer-bot")) == Defined({"allow": True})
    finally:
        engine.close()
    undefined = EmbeddedOpa([("p.rego", "package tether\nimport rego.v1\n"
                                        "decision := true if input.x\n")], None, PATH)
    conflict = EmbeddedOpa([("p.rego", "package tether\nimport rego.v1\ndecision := 1 if input.a\n"
                                       "decision := 2 if input.b\n")], None, PATH)
    try:
        assert undefined.evaluate("{}") == Undefined()
        assert undefined.evaluate('{"x": true}') == Defined(True)
        failed = conflict.evaluate('{"a": true, "b": true}')
        assert isinstance(failed, Failed) and failed.reason == "eval"
        assert interpret(failed, PATH).trace.rule_id == UNAVAILABLE
    finally:
        undefined.close()
        conflict.close()


# --- tether opa-test ----------------------------------------------------------------------

def test_the_shipped_policy_tests_pass() -> None:
    results = run_tests(RULES)
    assert len(results) >= 8 and all(r.passed for r in results), results
    assert cli.main(["opa-test", str(RULES)]) == 0


def test_opa_test_fails_on_false_undefined_and_errors(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nallow if input.ok\n"
                                     "helper if input.ok\nrule := true if helper\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\nimport rego.v1\nimport data.p\n"
        "test_passes if { not p.allow }\n"
        "test_false := false\n"
        "test_undefined if { p.allow }\n")
    results = {r.name.rsplit(".", 1)[1]: r for r in run_tests(tmp_path)}
    assert results["test_passes"].passed
    assert not results["test_false"].passed and results["test_false"].detail == "= false"
    assert not results["test_undefined"].passed and results["test_undefined"].detail == "undefined"
    assert cli.main(["opa-test", str(tmp_path)]) == 1
    assert "FAIL data.p_test.test_false: = false" in capsys.readouterr().out


def test_rego_cpps_with_gap_fails_the_tests_and_never_crashes(tmp_path: Path) -> None:
    """rego-cpp 1.5.2 cannot evaluate `with input as` over a rule that depends on another
    input-dependent rule; the module then evaluates nothing, so every test fails."""
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nhelper if input.ok\n"
                                     "rule := true if helper\n")
    (tmp_path / "p_test.rego").write_text(
        "package p_test\nimport rego.v1\nimport data.p\ntest_simple := true\n"
        "test_with_input if { p.rule with input as {\"ok\": true} }\n")
    results = run_tests(tmp_path)
    assert len(results) == 2 and not any(r.passed for r in results)
    assert cli.main(["opa-test", str(tmp_path)]) == 1


def test_opa_test_fails_with_no_tests_or_bad_rego(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package p\nx := 1\n")
    assert cli.main(["opa-test", str(tmp_path)]) == 1
    (tmp_path / "p.rego").write_text("package p\nx := {\n")
    assert cli.main(["opa-test", str(tmp_path)]) == 1
    assert cli.main(["opa-test", str(tmp_path / "missing")]) == 1
