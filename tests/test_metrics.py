"""Prometheus on the admin port, and the Grafana dashboard's queries against it.

The end-to-end test drives a mixed run with the official openai SDK (allowed,
denied, refused with 403, streamed, budget-tripped) and reads /metrics back with
prometheus-client's own parser. The dashboard test checks that every PromQL
expression in deploy/grafana/tether.json names a series tether exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.approvals.queue import ApprovalQueue
from proxy.approvals.settings import SlackSettings
from proxy.approvals.slack.notifier import SlackNotifier
from proxy.telemetry import Metrics
from tests.conftest import POLICY, MakeStack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.test_e2e_openai import MESSAGES, PROD_DELETE, TOOLS, collect

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tether.json"
SESSION = "s-secret-4711"
EXTRA = """
agents:
  janitor:
    budgets: {llm_calls: 100}
budgets:
  session: {llm_calls: 2}
  prices: {models: [{match: "gpt-4o*", input: 2.5, output: 10}]}
"""


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in found
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_after_a_mixed_run(make_stack: MakeStack) -> None:
    def script(body: dict[str, object]) -> Reply:
        text = str(body["messages"][0]["content"])  # type: ignore[index]
        if text == "drop":
            return Reply(calls=(Call("drop_database", '{"name": "prod"}'),))
        if text == "stream":
            return Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),))
        return Reply(calls=(Call("get_weather", '{"city": "Oslo"}'), PROD_DELETE,
                            Call("list_volumes", "{}")))

    stack = await make_stack(fake=FakeOpenAI(script=script), extra=EXTRA, policy=POLICY)
    janitor = stack.client(default_headers={"X-Tether-Agent": "janitor",
                                            "X-Tether-Session": SESSION})
    rogue = stack.client(default_headers={"X-Tether-Agent": "rogue-agent-77",
                                          "X-Tether-Session": "s-other-9"})
    # 1: allowed get_weather, denied delete_volume (a glob rule), allowed list_volumes.
    first = await janitor.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                  tools=TOOLS)
    names = [tc.function.name for tc in first.choices[0].message.tool_calls or []
             if tc.type == "function"]
    assert names == ["get_weather", "list_volumes"]
    # 2: a stream from an agent the config does not name, on a model no price glob names.
    text, calls, _ = await collect(await rogue.chat.completions.create(
        model="mystery-model", messages=[{"role": "user", "content": "stream"}], tools=TOOLS,
        stream=True))
    assert [c[1] for c in calls.values()] == ["get_weather"]
    # 3: drop_database is refused whole (on_deny: error).
    with pytest.raises(openai.PermissionDeniedError):
        await janitor.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "drop"}], tools=TOOLS)
    # 4: the session's two LLM calls are spent.
    with pytest.raises(openai.RateLimitError):
        await janitor.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                              tools=TOOLS)

    async with aiohttp.ClientSession() as http:
        async with http.get(stack.admin_url + "/metrics") as resp:
            assert resp.status == 200
            body = await resp.text()
    found = samples(body)
    decisions = "tether_tool_decisions_total"
    assert total(found, decisions, tool="get_weather", action="allow") == 2
    assert total(found, decisions, tool="other", action="deny", rule="no-prod-deletes") == 1
    assert total(found, decisions, tool="other", action="allow") == 1   # list_volumes
    assert total(found, decisions, tool="drop_database", action="deny", rule="no-drop") == 1
    assert total(found, decisions, provider="openai") == 5
    assert {s.labels["tool"] for s in found if s.name == decisions} == {
        "get_weather", "other", "drop_database"}

    assert total(found, "tether_requests_total", provider="openai", status="200") == 2
    assert total(found, "tether_requests_total", provider="openai", status="403") == 1
    assert total(found, "tether_requests_total", provider="openai", status="429") == 1
    assert total(found, "tether_budget_trips_total", scope="session", budget="llm_calls",
                 mode="enforce") == 1

    # The fake reports 24 input and 12 output tokens per answer.
    tokens = "tether_llm_tokens_total"
    assert total(found, tokens, agent="janitor", model="gpt-4o*", kind="input") == 48
    assert total(found, tokens, agent="janitor", model="gpt-4o*", kind="output") == 24
    assert total(found, tokens, agent="other", model="other", kind="input") == 24
    cost = total(found, "tether_llm_cost_usd_total", agent="janitor", model="gpt-4o*")
    assert cost == pytest.approx(2 * (24 * 2.5 + 12 * 10) / 1e6)
    assert total(found, "tether_llm_cost_usd_total", agent="other", model="other") > 0

    # Three requests went upstream; the budget-tripped one never did.
    assert total(found, "tether_upstream_seconds_count", provider="openai") == 3
    assert total(found, "tether_overhead_seconds_count", provider="openai", mode="whole") == 2
    assert total(found, "tether_overhead_seconds_count", provider="openai", mode="stream") == 1
    overhead = total(found, "tether_overhead_seconds_sum", provider="openai")
    assert 0 < overhead < total(found, "tether_upstream_seconds_sum") + 5
    assert total(found, "tether_fail_closed_total") == 0
    assert total(found, "tether_audit_write_errors_total") == 0

    # Never a session id, nor an unconfigured agent's name, nor a label called session.
    assert SESSION not in body and "s-other-9" not in body and "rogue-agent-77" not in body
    assert all("session" not in s.labels for s in found)


# -- the dashboard ------------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """The series names an expression reads: identifiers that are not functions
    (not followed by `(`) or keywords, after taking out strings, label matchers,
    ranges and `by (...)` lists; `label_values(m, label)` reads m."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\blabel_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"(\1)", text)
    names = set()
    for m in IDENT.finditer(text):
        before = text[m.start() - 1] if m.start() else ""
        if before == "$" or before.isdigit() or before == ".":
            continue  # a Grafana variable, or part of a number like 1e3
        rest = text[m.end():].lstrip()
        if m.group() not in KEYWORDS and not rest.startswith("("):
            names.add(m.group())  # followed by `{`, `[`, `)`, `,`, an operator or the end
    return names


def exported_series() -> set[str]:
    """Every series name a fresh tether can export, Slack's included (those live on the
    notifier, registered on the same registry when Slack is configured)."""
    metrics = Metrics()
    SlackNotifier(SlackSettings("C0", ("U0",)), ApprovalQueue(10, 10), metrics=metrics)
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    return {f.name + s for f in metrics.registry.collect() for s in suffixes[f.type]}


def dashboard_expressions(doc: object) -> Iterator[str]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and "(" in value:
                yield value
            else:
                yield from dashboard_expressions(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from dashboard_expressions(item)


def unknown_metrics(expressions: list[str], exported: set[str]) -> dict[str, set[str]]:
    out = {}
    for expr in expressions:
        names = promql_metrics(expr)
        if not names:
            out[expr] = {"<no metric found>"}
        elif names - exported:
            out[expr] = names - exported
    return out


def test_every_dashboard_query_names_an_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource"
               for v in doc["templating"]["list"])
    exprs = list(dashboard_expressions(doc))
    assert len(exprs) >= 10
    assert unknown_metrics(exprs, exported_series()) == {}
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for wanted in ("by action", "top denied tools", "tokens", "cost", "approvals waiting",
                   "budget trips", "overhead p99", "fail-closed", "audit write errors"):
        assert wanted in titles


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (action) (rate(tether_tool_decisions_total{provider=~"$provider"}[5m]))',
     {"tether_tool_decisions_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(tether_overhead_seconds_bucket[$__rate_interval])))",
     {"tether_overhead_seconds_bucket"}),
    ("sum(tether_approvals_pending)", {"tether_approvals_pending"}),
    ("topk(10, sum by (tool) (increase(tether_tool_decisions_total{action=\"deny\"}[1h])))",
     {"tether_tool_decisions_total"}),
    ("label_values(tether_requests_total, provider)", {"tether_requests_total"}),
    ("tether_a_total / ignoring(x) tether_b_total", {"tether_a_total", "tether_b_total"}),
])
def test_the_extractor_finds_the_metric(expr: str, expected: set[str]) -> None:
    assert promql_metrics(expr) == expected


@pytest.mark.parametrize("bad", [
    "sum(rate(tether_tool_decision_total[5m]))",            # a misspelt name
    "sum(rate(tether_tool_decisions[5m]))",                 # a counter without _total
    "histogram_quantile(0.99, rate(tether_overhead_seconds[5m]))",   # no _bucket
    'sum(tether_approvals_pending_total{x="y"})',           # a gauge with a counter suffix
    "rate(tether_requests_total[5m]) / nothing_here",       # one good, one bad
])
def test_the_checker_catches_a_wrong_name(bad: str) -> None:
    good = 'sum by (action) (rate(tether_tool_decisions_total{provider="openai"}[5m]))'
    exported = exported_series()
    assert unknown_metrics([good], exported) == {}
    assert bad in unknown_metrics([good, bad], exported)
