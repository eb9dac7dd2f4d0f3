"""Provider-run tools on the request side: names, the MCP allow-list, judging and narrowing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.audit import AuditLog
from proxy.errors import BadRequest, ConfigError
from proxy.governor import Governor
from proxy.model import Action, Decision, Effect, Exchange, ToolCall
from proxy.policy.engine import PolicyEngine
from proxy.policy.provider_tools import (
    MCP_UNLISTED,
    MCP_URL,
    McpAllow,
    ProviderTools,
    anthropic_name,
    effect_of,
    gemini_name,
    openai_name,
    place,
)
from proxy.providers import provider_run
from proxy.providers.provider_run import ProviderToolRefused
from proxy.server.provider_gate import judge_for
from proxy.telemetry import Metrics

GITHUB_URL = "https://api.githubcopilot.com/mcp/"
TOOLS = {"get_issue": Effect.READ, "list_issues": Effect.READ, "create_issue": Effect.WRITE,
         "delete_repo": Effect.WRITE}


def allow_list(url: str = GITHUB_URL) -> ProviderTools:
    at = place(url)
    assert not isinstance(at, str)
    return ProviderTools({"github": McpAllow("github", url, at, TOOLS)})


class Judge:
    """Rules as a table: canonical name -> action (absent: deny); records what it was asked."""

    def __init__(self, actions: Mapping[str, Action]) -> None:
        self.actions = actions
        self.asked: list[tuple[str, Effect, dict[str, object]]] = []

    def __call__(self, name: str, effect: Effect, arguments: Mapping[str, object]) -> Decision:
        self.asked.append((name, effect, dict(arguments)))
        action = self.actions.get(name, Action.DENY)
        return Decision(action, (f"rule-{action.value}",), f"{name} is {action.value}")


GH = "openai:mcp:github:"
READS_ALLOWED_CREATE_HELD = {GH + "get_issue": Action.ALLOW, GH + "list_issues": Action.ALLOW,
                             GH + "create_issue": Action.HOLD}


def mcp_tool(**kw: Any) -> dict[str, Any]:
    return {"type": "mcp", "server_label": "github", "server_url": GITHUB_URL, **kw}


def run_openai(tools: list[Any], actions: Mapping[str, Action],
               settings: ProviderTools | None = None) -> tuple[dict[str, Any] | None, Judge]:
    judge = Judge(actions)
    out = provider_run.openai(json.dumps({"model": "m", "tools": tools}).encode(),
                              settings or allow_list(), judge)
    return (json.loads(out.body) if out.body is not None else None), judge


# --- names and effects -------------------------------------------------------------------


@pytest.mark.parametrize(("made", "name"), [
    (openai_name("web_search"), "openai:web_search"),
    (openai_name("web_search_preview"), "openai:web_search"),
    (openai_name("web_search_preview_2025_03_11"), "openai:web_search"),
    (openai_name("web_search_2025_08_26"), "openai:web_search"),
    (openai_name("file_search"), "openai:file_search"),
    (openai_name("code_interpreter"), "openai:code_interpreter"),
    (openai_name("image_generation"), "openai:image_generation"),
    (openai_name("brand_new_tool"), "openai:brand_new_tool"),
    (anthropic_name("web_search_20250305"), "anthropic:web_search"),
    (anthropic_name("web_fetch_20250910"), "anthropic:web_fetch"),
    (anthropic_name("code_execution_20250825"), "anthropic:code_execution"),
    (anthropic_name("mystery_20991231"), "anthropic:mystery"),
    (gemini_name("googleSearch"), "gemini:google_search"),
    (gemini_name("google_search"), "gemini:google_search"),
    (gemini_name("codeExecution"), "gemini:code_execution"),
    (gemini_name("urlContext"), "gemini:url_context"),
])
def test_canonical_names(made: str, name: str) -> None:
    assert made == name


@pytest.mark.parametrize(("name", "effect"), [
    ("openai:web_search", Effect.READ), ("anthropic:web_fetch", Effect.READ),
    ("gemini:url_context", Effect.READ), ("openai:code_interpreter", Effect.WRITE),
    ("anthropic:code_execution", Effect.WRITE), ("openai:brand_new_tool", Effect.WRITE),
])
def test_effects(name: str, effect: Effect) -> None:
    assert effect_of(name) is effect


# --- the MCP URL allow-list --------------------------------------------------------------


@pytest.mark.parametrize("url", [
    GITHUB_URL, "https://api.githubcopilot.com/mcp", "https://API.githubcopilot.com/mcp/",
    "https://api.githubcopilot.com./mcp/", "https://api.githubcopilot.com:443/mcp/x/y",
])
def test_url_under_the_configured_one(url: str) -> None:
    assert allow_list().mcp_servers["github"].covers(url) is None


@pytest.mark.parametrize("url", [
    "https://api.githubcopilot.com/mcpx", "https://api.githubcopilot.com/", "https://evil.example/mcp/",
    "https://api.githubcopilot.com.evil.example/mcp/", "http://api.githubcopilot.com/mcp/",
    "https://api.githubcopilot.com:8443/mcp/", "https://user:pw@api.githubcopilot.com/mcp/",
    "https://api.githubcopilot.com@evil.example/mcp/", "https://api.githubcopilot.com/mcp/%2e%2e/x",
    "https://api.githubcopilot.com/%6dcp/", "https://api%2egithubcopilot.com/mcp/",
    "https://api.githubcopilot.com/mcp/../admin", "https://api.githubcopilot.com/mcp//x",
    "https://api.githubcopilot.com/mcp/;x", "https://api.githubcopilot.com/mcp/#frag",
    "https://api.githubcopilot.com/mcp/?a=b", "https://api.githubcopilot.com\\@evil/mcp/",
    "https://аpi.githubcopilot.com/mcp/", "https://api.githubcopilot.com/mcp/\u200b",
    "https://api.githubcopilot.com /mcp/", "ftp://api.githubcopilot.com/mcp/", "", 7, None,
    "https://api.githubcopilot.com:99999/mcp/", "https://" + "a" * 3000 + ".com/mcp/",
])
def test_url_refused(url: object) -> None:
    assert isinstance(allow_list().mcp_servers["github"].covers(url), str)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tether.yaml"
    path.write_text(text)
    return path


def test_config_loads_the_allow_list(tmp_path: Path) -> None:
    cfg = config_mod.load(write_config(tmp_path, """
provider_tools:
  mcp_servers:
    github: {url: "https://api.githubcopilot.com/mcp/", tools: {get_issue: read, create_issue: write}}
    local: {url: "http://127.0.0.1:9000/mcp", allow_http: true, tools: {ping: read}}
"""), env={})
    servers = cfg.provider_tools.mcp_servers
    assert servers["github"].tools == {"get_issue": Effect.READ, "create_issue": Effect.WRITE}
    assert servers["local"].at.port == 9000


@pytest.mark.parametrize(("body", "line", "needle"), [
    ("provider_tools: []\n", 2, "must be a mapping"),
    ("provider_tools:\n  servers: {}\n", 3, "unknown key"),
    ("provider_tools:\n  mcp_servers:\n    gh: {url: 'https://u:p@x.example/mcp', tools: {a: read}}\n",
     4, "credentials"),
    ("provider_tools:\n  mcp_servers:\n    gh: {url: 'http://x.example/mcp', tools: {a: read}}\n",
     4, "allow_http"),
    ("provider_tools:\n  mcp_servers:\n    gh: {url: 'https://x.example/%6d', tools: {a: read}}\n",
     4, "percent"),
    ("provider_tools:\n  mcp_servers:\n    gh: {url: 'https://x.example/mcp'}\n", 4, "tools"),
    ("provider_tools:\n  mcp_servers:\n    gh:\n      url: 'https://x.example/mcp'\n"
     "      tools: {a: delete}\n", 6, "read or write"),
    ("provider_tools:\n  mcp_servers:\n    'g h': {url: 'https://x.example/mcp', tools: {a: read}}\n",
     4, "label"),
])
def test_config_errors_name_file_and_line(tmp_path: Path, body: str, line: int,
                                          needle: str) -> None:
    path = write_config(tmp_path, "\n" + body)
    with pytest.raises(ConfigError) as e:
        config_mod.load(path, env={})
    assert f"{path}:{line}" in str(e.value) and needle in str(e.value)


# --- OpenAI Responses --------------------------------------------------------------------


def test_function_and_allowed_server_tools_pass_unchanged() -> None:
    body, judge = run_openai([{"type": "function", "name": "get_weather"}, {"type": "web_search"}],
                             {"openai:web_search": Action.ALLOW})
    assert body is None
    assert judge.asked == [("openai:web_search", Effect.READ, {"type": "web_search"})]


@pytest.mark.parametrize("kind", ["web_search_preview", "code_interpreter", "image_generation",
                                  "file_search", "brand_new_tool"])
def test_server_tool_no_rule_allows_is_refused(kind: str) -> None:
    with pytest.raises(ProviderToolRefused, match="rule-deny"):
        run_openai([{"type": kind}], {})


def test_held_server_tool_is_refused() -> None:
    with pytest.raises(ProviderToolRefused, match="approve"):
        run_openai([{"type": "code_interpreter"}], {"openai:code_interpreter": Action.HOLD})


def test_hosted_tool_inside_a_namespace_is_judged() -> None:
    with pytest.raises(ProviderToolRefused):
        run_openai([{"type": "namespace", "name": "ns", "tools": [{"type": "web_search"}]}], {})


def test_tool_type_not_a_string_is_refused() -> None:
    with pytest.raises(BadRequest):
        run_openai([{"type": 7}], {})


def test_mcp_narrowed_to_allowed_tools_and_holds_need_approval() -> None:
    body, judge = run_openai([mcp_tool(require_approval="never")], READS_ALLOWED_CREATE_HELD)
    assert body is not None
    tool = body["tools"][0]
    assert tool["allowed_tools"] == ["get_issue", "list_issues", "create_issue"]
    assert tool["require_approval"] == {"always": {"tool_names": ["create_issue"]},
                                        "never": {"tool_names": ["get_issue", "list_issues"]}}
    assert [a[0] for a in judge.asked] == [GH + t for t in TOOLS]
    assert judge.asked[0][2] == {"server_label": "github", "server_url": GITHUB_URL,
                                 "tool": "get_issue"}


@pytest.mark.parametrize(("asked", "expected"), [
    (None, "always"),  # OpenAI's default asks for every tool
    ("always", "always"),
    ("never", {"always": {"tool_names": ["create_issue"]},
               "never": {"tool_names": ["get_issue", "list_issues"]}}),
    ({"never": {"tool_names": ["get_issue"]}},
     {"always": {"tool_names": ["list_issues", "create_issue"]},
      "never": {"tool_names": ["get_issue"]}}),
    ({"always": {"tool_names": ["get_issue"]}, "never": {"tool_names": ["get_issue",
                                                                       "list_issues"]}},
     {"always": {"tool_names": ["get_issue", "create_issue"]},
      "never": {"tool_names": ["list_issues"]}}),
    ({"never": {"read_only": True}}, "always"),  # which tools are read-only: tether can't know
    ({"never": {"tool_names": ["create_issue", "get_issue", "list_issues"]}},
     {"always": {"tool_names": ["create_issue"]},
      "never": {"tool_names": ["get_issue", "list_issues"]}}),  # a hold is never loosened
])
def test_require_approval_every_form_never_loosened(asked: object, expected: object) -> None:
    tool = mcp_tool() if asked is None else mcp_tool(require_approval=asked)
    body, _ = run_openai([tool], READS_ALLOWED_CREATE_HELD)
    assert body is not None and body["tools"][0]["require_approval"] == expected


@pytest.mark.parametrize("asked", ["sometimes", 1, {}, {"maybe": {}}, {"never": ["x"]},
                                   {"never": {"tool_names": "get_issue"}},
                                   {"always": {"read_only": "yes"}}])
def test_require_approval_bad_forms_refused(asked: object) -> None:
    with pytest.raises(BadRequest):
        run_openai([mcp_tool(require_approval=asked)], READS_ALLOWED_CREATE_HELD)


@pytest.mark.parametrize(("asked", "expected"), [
    (["get_issue", "delete_repo", "not_configured"], ["get_issue"]),
    ({"tool_names": ["list_issues", "create_issue"]},
     {"tool_names": ["list_issues", "create_issue"]}),
    ({"read_only": True}, {"read_only": True, "tool_names": ["get_issue", "list_issues"]}),
    ({"tool_names": ["create_issue", "get_issue"], "read_only": True},
     {"tool_names": ["get_issue"], "read_only": True}),
])
def test_agents_allowed_tools_intersected(asked: object, expected: object) -> None:
    body, judge = run_openai([mcp_tool(allowed_tools=asked)], READS_ALLOWED_CREATE_HELD)
    assert body is not None and body["tools"][0]["allowed_tools"] == expected
    assert GH + "not_configured" not in [a[0] for a in judge.asked]


@pytest.mark.parametrize("asked", ["get_issue", 3, [1], {"names": []}, {"read_only": "no"}])
def test_allowed_tools_bad_forms_refused(asked: object) -> None:
    with pytest.raises(BadRequest):
        run_openai([mcp_tool(allowed_tools=asked)], READS_ALLOWED_CREATE_HELD)


def test_mcp_server_no_tool_allowed_is_refused_naming_rules() -> None:
    with pytest.raises(ProviderToolRefused, match="rule-deny"):
        run_openai([mcp_tool()], {})
    with pytest.raises(ProviderToolRefused, match="no tool"):  # the agent asked only for denied
        run_openai([mcp_tool(allowed_tools=["delete_repo"])], READS_ALLOWED_CREATE_HELD)


@pytest.mark.parametrize(("tool", "rule"), [
    (mcp_tool(server_label="gitlab"), MCP_UNLISTED),
    (mcp_tool(server_url="https://evil.example/mcp/"), MCP_URL),
    (mcp_tool(server_url="https://x:y@api.githubcopilot.com/mcp/"), MCP_URL),
    (mcp_tool(server_url="https://api.githubcopilot.com/mcp/%2e%2e/"), MCP_URL),
    ({"type": "mcp", "server_label": "github", "connector_id": "connector_gmail"}, MCP_URL),
])
def test_mcp_server_not_allow_listed_is_refused(tool: dict[str, Any], rule: str) -> None:
    with pytest.raises(ProviderToolRefused, match=rule):
        run_openai([tool], READS_ALLOWED_CREATE_HELD)


def test_mcp_without_label_refused() -> None:
    with pytest.raises(BadRequest):
        run_openai([{"type": "mcp", "server_url": GITHUB_URL}], READS_ALLOWED_CREATE_HELD)


def test_two_mcp_tools_same_label_different_urls_refused() -> None:
    with pytest.raises(ProviderToolRefused, match="share this label"):
        run_openai([mcp_tool(), mcp_tool(server_url=GITHUB_URL + "x")], READS_ALLOWED_CREATE_HELD)


# --- Anthropic ---------------------------------------------------------------------------

AH = "anthropic:mcp:github:"
ANTHROPIC_ALLOWED = {AH + "get_issue": Action.ALLOW, AH + "list_issues": Action.ALLOW,
                     AH + "create_issue": Action.HOLD}


def run_anthropic(obj: dict[str, Any], actions: Mapping[str, Action]
                  ) -> tuple[dict[str, Any] | None, Judge]:
    judge = Judge(actions)
    out = provider_run.anthropic(json.dumps({"model": "m", **obj}).encode(), allow_list(), judge)
    return (json.loads(out.body) if out.body is not None else None), judge


def server(**kw: Any) -> dict[str, Any]:
    return {"type": "url", "url": GITHUB_URL, "name": "github", **kw}


def test_anthropic_mcp_server_narrowed_and_holds_left_out() -> None:
    body, _ = run_anthropic({"mcp_servers": [server()]}, ANTHROPIC_ALLOWED)
    assert body is not None
    assert body["mcp_servers"][0]["tool_configuration"] == {
        "allowed_tools": ["get_issue", "list_issues"]}
    body, _ = run_anthropic({"mcp_servers": [server(tool_configuration={
        "enabled": True, "allowed_tools": ["list_issues", "delete_repo"]})]}, ANTHROPIC_ALLOWED)
    assert body is not None
    assert body["mcp_servers"][0]["tool_configuration"] == {"enabled": True,
                                                            "allowed_tools": ["list_issues"]}


def test_anthropic_mcp_toolset_narrowed() -> None:
    toolset = {"type": "mcp_toolset", "mcp_server_name": "github",
               "configs": {"get_issue": {"defer_loading": True}, "list_issues": {"enabled": False}}}
    body, _ = run_anthropic({"mcp_servers": [server()], "tools": [toolset]}, ANTHROPIC_ALLOWED)
    assert body is not None
    assert "tool_configuration" not in body["mcp_servers"][0]
    assert body["tools"][0]["default_config"] == {"enabled": False}
    assert body["tools"][0]["configs"] == {"get_issue": {"defer_loading": True, "enabled": True}}


def test_anthropic_refusals() -> None:
    with pytest.raises(ProviderToolRefused, match=MCP_UNLISTED):
        run_anthropic({"mcp_servers": [server(name="gitlab")]}, ANTHROPIC_ALLOWED)
    with pytest.raises(ProviderToolRefused, match="no tool"):
        run_anthropic({"mcp_servers": [server()]}, {AH + "create_issue": Action.HOLD})
    with pytest.raises(ProviderToolRefused, match="share this label"):
        run_anthropic({"mcp_servers": [server(), server(url=GITHUB_URL + "x")]}, ANTHROPIC_ALLOWED)
    with pytest.raises(BadRequest, match="not in mcp_servers"):
        run_anthropic({"tools": [{"type": "mcp_toolset", "mcp_server_name": "github"}]},
                      ANTHROPIC_ALLOWED)
    with pytest.raises(ProviderToolRefused, match="rule-deny"):
        run_anthropic({"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, {})
    with pytest.raises(ProviderToolRefused):
        run_anthropic({"tools": [{"type": "new_server_thing_20990101", "name": "x"}]}, {})


def test_anthropic_client_tools_are_not_judged_here() -> None:
    body, judge = run_anthropic({"tools": [
        {"name": "get_weather", "input_schema": {}}, {"type": "bash_20250124", "name": "bash"},
        {"type": "custom", "name": "x", "input_schema": {}},
        {"type": "web_search_20250305", "name": "web_search"}]},
        {"anthropic:web_search": Action.ALLOW})
    assert body is None and [a[0] for a in judge.asked] == ["anthropic:web_search"]


# --- Gemini ------------------------------------------------------------------------------


def test_gemini_built_in_tools_judged() -> None:
    judge = Judge({"gemini:google_search": Action.ALLOW})
    body = json.dumps({"tools": [{"functionDeclarations": [{"name": "f"}]},
                                 {"googleSearch": {}}]}).encode()
    assert provider_run.gemini(body, ProviderTools(), judge).body is None
    assert [a[0] for a in judge.asked] == ["gemini:google_search"]
    with pytest.raises(ProviderToolRefused):
        provider_run.gemini(json.dumps({"tools": [{"code_execution": {}}]}).encode(),
                            ProviderTools(), judge)


# --- the decision path: rules, scopes, undeclared_tools -----------------------------------


@pytest.fixture
def engine_judge(tmp_path: Path) -> Iterator[Callable[..., provider_run.Judge]]:
    """A judge on the real decision path (engine and governor) from a config text."""
    logs: list[AuditLog] = []

    def make(text: str, agent: str | None = None) -> provider_run.Judge:
        cfg = config_mod.load(write_config(tmp_path, text), env={})
        logs.append(AuditLog(str(tmp_path / "a.jsonl")))
        governor = Governor(PolicyEngine(cfg.policy), logs[-1], Metrics())
        return judge_for(governor, Exchange("openai", "m", agent=agent), "rid")

    yield make
    for log in logs:
        log.close()


def test_no_rule_mentions_it_follows_undeclared_tools(
        engine_judge: Callable[..., provider_run.Judge]) -> None:
    judge = engine_judge("defaults: {action: allow}\n")
    decision = judge("openai:web_search", Effect.READ, {"type": "web_search"})
    assert decision.action is Action.DENY and decision.rules == ("tether:provider-tool-unlisted",)
    judge = engine_judge("defaults: {action: allow, undeclared_tools: allow}\n")
    assert judge("openai:web_search", Effect.READ, {}).action is Action.ALLOW


def test_rules_match_canonical_names_and_effects(
        engine_judge: Callable[..., provider_run.Judge]) -> None:
    judge = engine_judge("""
rules:
  - {id: gh-reads, match: {tool: "openai:mcp:github:*", effect: read}, action: allow}
  - {id: gh-writes, match: {tool: "openai:mcp:github:*", effect: write}, action: hold}
""")
    assert judge(GH + "get_issue", Effect.READ, {}).rules == ("gh-reads",)
    assert judge(GH + "create_issue", Effect.WRITE, {}).action is Action.HOLD


def test_agent_scope_covers_provider_tools(
        engine_judge: Callable[..., provider_run.Judge]) -> None:
    text = """
agents:
  researcher: {tools: ["openai:web_search", "openai:mcp:github:get_*"]}
rules:
  - {id: all, match: {tool: "*"}, action: allow}
"""
    judge = engine_judge(text, agent="researcher")
    assert judge("openai:web_search", Effect.READ, {}).action is Action.ALLOW
    assert judge(GH + "get_issue", Effect.READ, {}).action is Action.ALLOW
    denied = judge(GH + "create_issue", Effect.WRITE, {})
    assert denied.action is Action.DENY and "tether:agent-scope" in denied.rules
    assert judge("openai:code_interpreter", Effect.WRITE, {}).action is Action.DENY


# --- the fakes refuse what the real APIs refuse -------------------------------------------


def test_fakes_refuse_malformed_mcp_declarations() -> None:
    from proxy.demo.fake_provider_tools import anthropic_problem, responses_problem

    assert responses_problem({"tools": [mcp_tool()]}) is None
    assert responses_problem({"tools": [{"type": "mcp", "server_url": GITHUB_URL}]})
    assert responses_problem({"tools": [{"type": "mcp", "server_label": "github"}]})
    assert responses_problem({"tools": [mcp_tool(require_approval={"never": ["x"]})]})
    assert anthropic_problem({"mcp_servers": [server()]}) is None
    assert anthropic_problem({"mcp_servers": [server(), server()]})
    assert anthropic_problem({"mcp_servers": [{"name": "github", "url": GITHUB_URL}]})
    assert anthropic_problem({"tools": [{"type": "mcp_toolset", "mcp_server_name": "x"}]})


def test_tool_choice_forcing_a_narrowed_away_mcp_tool_is_refused() -> None:
    judge = Judge(READS_ALLOWED_CREATE_HELD)
    body = {"model": "m", "tools": [mcp_tool()],
            "tool_choice": {"type": "mcp", "server_label": "github", "name": "delete_repo"}}
    with pytest.raises(BadRequest, match="delete_repo"):
        provider_run.openai(json.dumps(body).encode(), allow_list(), judge)
    body["tool_choice"] = {"type": "mcp", "server_label": "github", "name": "get_issue"}
    assert provider_run.openai(json.dumps(body).encode(), allow_list(), judge).body is not None


def test_sizes_10000_declarations_one_decision_and_a_huge_allow_list() -> None:
    body, judge = run_openai([{"type": "web_search"}] * 10_000, {"openai:web_search": Action.ALLOW})
    assert body is None and len(judge.asked) == 1
    names = [f"tool_{i}" for i in range(200_000)] + ["get_issue"]
    body, judge = run_openai([mcp_tool(allowed_tools=names)], READS_ALLOWED_CREATE_HELD)
    assert body is not None and body["tools"][0]["allowed_tools"] == ["get_issue"]
    assert len(judge.asked) == 1


@pytest.mark.parametrize("kind", ["mcp:github:get_issue", "web search", "x" * 65, "*"])
def test_type_that_could_borrow_a_canonical_name_is_refused(kind: str) -> None:
    with pytest.raises(BadRequest, match="plain name"):
        run_openai([{"type": kind}], {"openai:mcp:github:get_issue": Action.ALLOW})


def test_engine_alone_agrees_with_the_gate(tmp_path: Path) -> None:
    """`tether explain` and `tether test` use the engine alone: same verdict, same effect."""
    cfg = config_mod.load(write_config(tmp_path, """
defaults: {action: allow}
provider_tools:
  mcp_servers:
    github: {url: "https://api.githubcopilot.com/mcp/", tools: {get_issue: read, merge_pr: write}}
rules:
  - {id: reads, match: {tool: "*:mcp:github:*", effect: read}, action: allow}
"""), env={})
    engine = PolicyEngine(cfg.policy)

    def decide(name: str) -> Decision:
        return engine.decide(ToolCall("c", name, "{}", {}), Exchange("openai", "m",
                                                                     declared_tools=(name,)))

    search = decide("openai:web_search")
    assert search.action is Action.DENY and search.rules == ("tether:provider-tool-unlisted",)
    assert search.effect is Effect.READ
    assert decide("anthropic:mcp:github:get_issue").rules == ("reads",)
    merge = decide("openai:mcp:github:merge_pr")
    assert merge.effect is Effect.WRITE and merge.rules == ("tether:provider-tool-unlisted",)
    assert decide("get_weather").action is Action.ALLOW  # function tools: defaults.action
