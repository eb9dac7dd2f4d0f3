"""Flow rules as pure units: the `flows:` syntax, its load errors, the engine reading a
session history, the history entries and the tool results an agent sends back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError, StoreUnavailable
from proxy.model import Action, Decision, Effect, Exchange, PastCall, ToolCall
from proxy.policy.engine import PolicyEngine
from proxy.providers.arguments import parse_arguments
from proxy.sessions import history as hist
from proxy.sessions.results import result_ids
from tests.redis_server import RedisServer

FLOWS = """
flows:
  labels:
    untrusted: [web_fetch, read_email, aws.s3.GetObject]
    sensitive: [query_customers, "get_secret*"]
    external: [send_email, "http_*"]
tools:
  web_fetch: {effect: read}
  query_customers: {effect: read}
rules:
  - id: write-after-untrusted
    match: {effect: write, session: {after: {label: untrusted}}}
    action: hold
    message: a write after untrusted content needs a person
  - id: lethal-trifecta
    match:
      label: external
      session: {after: [{label: sensitive}, {label: untrusted}]}
    action: deny
    message: private data and untrusted content may not leave
"""


def load(tmp_path: Path, text: str) -> PolicyEngine:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return PolicyEngine(config_mod.load(path, env={}).policy)


def call(name: str, args: object = None, cid: str = "c1") -> ToolCall:
    raw = json.dumps(args or {})
    parsed, problem = parse_arguments(raw)
    return ToolCall(id=cid, name=name, raw_arguments=raw, arguments=parsed, problem=problem)


def past(tool: str, labels: set[str], action: Action = Action.ALLOW, effect: Effect = Effect.READ,
         did: str = "d1", summary: str = "") -> PastCall:
    return PastCall(did, tool, effect, action, frozenset(labels), at=1_765_000_000.0,
                    summary=summary or f"{tool}()")


def ex(*history: PastCall) -> Exchange:
    tools = ("web_fetch", "query_customers", "send_email", "update_record", "http_post")
    return Exchange(provider="openai", model="m", declared_tools=tools, history=history)


def test_a_write_after_an_untrusted_read_is_held_and_the_message_names_the_read(
        tmp_path: Path) -> None:
    engine = load(tmp_path, FLOWS)
    read = past("web_fetch", {"untrusted"}, did="dec-77",
                summary="web_fetch(url='https://evil.example/page')")
    d = engine.decide(call("update_record", {"id": 1}), ex(read))
    assert d.action is Action.HOLD
    assert d.rules == ("write-after-untrusted",)
    assert "a write after untrusted content needs a person" in d.message
    assert "web_fetch(url='https://evil.example/page')" in d.message
    assert "decision dec-77" in d.message and "2025-12-06T" in d.message


def test_the_same_write_without_the_read_is_allowed(tmp_path: Path) -> None:
    engine = load(tmp_path, FLOWS)
    assert engine.decide(call("update_record"), ex()).action is Action.ALLOW
    other = past("query_customers", {"sensitive"})
    assert engine.decide(call("update_record"), ex(other)).action is Action.ALLOW


@pytest.mark.parametrize("action", [Action.DENY, Action.HOLD])
def test_a_read_that_never_ran_brings_nothing_in(tmp_path: Path, action: Action) -> None:
    engine = load(tmp_path, FLOWS)
    d = engine.decide(call("update_record"), ex(past("web_fetch", {"untrusted"}, action)))
    assert d.action is Action.ALLOW


def test_the_lethal_trifecta_is_denied_and_strictest_wins(tmp_path: Path) -> None:
    engine = load(tmp_path, FLOWS)
    history = (past("query_customers", {"sensitive"}, did="d1"),
               past("web_fetch", {"untrusted"}, did="d2"))
    d = engine.decide(call("send_email", {"to": "x@evil.example"}), ex(*history))
    assert d.action is Action.DENY  # deny (trifecta) over hold (write after untrusted)
    assert set(d.rules) == {"lethal-trifecta", "write-after-untrusted"}
    assert "decision d1" in d.message and "decision d2" in d.message
    # Only one leg of it: the hold still applies, the deny does not.
    d = engine.decide(call("send_email"), ex(history[1]))
    assert d.action is Action.HOLD and d.rules == ("write-after-untrusted",)
    d = engine.decide(call("send_email"), ex(history[0]))
    assert d.action is Action.ALLOW


def test_labels_match_globs_and_api_operations(tmp_path: Path) -> None:
    engine = load(tmp_path, FLOWS)
    labels = engine.policy.flows.labels
    assert labels.of("get_secret_value") == {"sensitive"}
    assert labels.of("http_post") == {"external"}
    assert labels.of("read_object", "aws.s3.GetObject") == {"untrusted"}
    assert labels.of("Web_Fetch".casefold()) == {"untrusted"}
    assert labels.of("web_fetcher") == frozenset()


def test_explain_shows_why_a_flow_rule_did_not_match(tmp_path: Path) -> None:
    engine = load(tmp_path, FLOWS)
    d = engine.decide(call("update_record"), ex(past("query_customers", {"sensitive"})),
                      explain=True)
    trace = {t.rule_id: t for t in d.trace}
    assert not trace["write-after-untrusted"].matched
    assert "no earlier allowed call with label=untrusted (1 in the history)" in \
        trace["write-after-untrusted"].reason


def test_after_matches_tool_and_effect_too(tmp_path: Path) -> None:
    engine = load(tmp_path, """
flows: {labels: {external: [send_email]}}
rules:
  - id: no-mail-after-delete
    match: {label: external, session: {after: {tool: "delete_*", effect: write}}}
    action: deny
""")
    deleted = past("delete_volume", set(), effect=Effect.WRITE)
    tools = ("send_email",)
    d = engine.decide(call("send_email"), Exchange("openai", "m", tools, history=(deleted,)))
    assert d.action is Action.DENY
    read = past("delete_volume", set(), effect=Effect.READ)
    d = engine.decide(call("send_email"), Exchange("openai", "m", tools, history=(read,)))
    assert d.action is Action.ALLOW


BAD = [
    ("flows: {labels: {Untrusted: [x]}}\n", 1, "a label is a lower-case name"),
    ("flows: {labels: {untrusted: []}}\n", 1, "a label must be a name/glob"),
    ("flows: {labels: [untrusted]}\n", 1, "must map a label"),
    ("flows: {history: {keep: 0}}\n", 1, "from 1 to"),
    ("flows: {history: {ttl: soon}}\n", 1, "not a duration"),
    ("flows: {colour: red}\n", 1, "unknown key"),
    ("rules:\n  - id: r\n    match: {session: {after: {label: sensitive}}}\n    action: deny\n",
     2, "no tool carries"),
    ("rules:\n  - id: r\n    match: {session: {before: {label: untrusted}}}\n    action: deny\n",
     3, "unknown key session.before"),
    ("rules:\n  - id: r\n    match: {session: {after: []}}\n    action: deny\n",
     3, "must not be empty"),
    ("rules:\n  - id: r\n    match: {session: {after: {colour: red}}}\n    action: deny\n",
     3, "unknown key session.after.colour"),
    ("rules:\n  - id: r\n    match: {session: {after: {effect: maybe}}}\n    action: deny\n",
     3, "read or write"),
    ("rules:\n  - id: r\n    match: {label: 7}\n    action: deny\n", 3, "label must be"),
    ("rules:\n  - id: r\n    match: {session: untrusted}\n    action: deny\n", 3,
     "session must be a mapping"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_bad_flow_syntax_names_file_and_line(tmp_path: Path, text: str, line: int,
                                             message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    assert message in str(info.value)
    assert f"p.yaml:{line}" in str(info.value)


def test_only_a_policy_with_session_rules_reads_history(tmp_path: Path) -> None:
    assert load(tmp_path, FLOWS).policy.reads_history
    assert not load(tmp_path, "flows: {labels: {untrusted: [x]}}\n").policy.reads_history


# History entries ------------------------------------------------------------------------

def test_entries_hash_canonical_arguments_and_summarise_safely() -> None:
    a = call("web_fetch", {"url": "https://x", "depth": 2})
    b = ToolCall("c2", "web_fetch", '{ "depth":2, "url":"https://x" }',
                 {"depth": 2, "url": "https://x"})
    assert hist.args_sha256(a) == hist.args_sha256(b)
    evil = call("web_fetch", {"url": "https://x/\u202egnp.exe\u200b\n" + "a" * 5000})
    text = hist.summary(evil)
    assert "\u202e" not in text and "\u200b" not in text and "\n" not in text
    assert len(text) <= hist.SUMMARY_CHARS
    d = Decision(Action.ALLOW, decision_id="d9")
    e = hist.entry(evil, d, frozenset({"untrusted"}), now=5.0)
    assert hist.loads(hist.dumps(e)) == e
    lone = call("web_fetch", {"url": "\ud800"})
    e = hist.entry(lone, d, frozenset(), now=5.0)
    assert hist.loads(hist.dumps(e)) == e


@pytest.mark.parametrize("text", ["", "nope", "[]", '{"d": 1}', '{"d":"x","t":"y","e":"z"}'])
def test_an_entry_that_does_not_read_back_is_a_store_failure(text: str) -> None:
    with pytest.raises(StoreUnavailable):
        hist.loads(text)


async def test_memory_history_is_bounded_and_keyed_by_bucket() -> None:
    store = hist.MemoryHistory(keep=3, ttl_s=60)
    entries = [past("t", set(), did=f"d{i}") for i in range(5)]
    await store.record("a", entries)
    assert [e.decision_id for e in await store.load("a")] == ["d2", "d3", "d4"]
    assert await store.load("b") == ()


# Tool results ---------------------------------------------------------------------------

RESULTS = [
    ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, ("call_1",)),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]}, ("toolu_1",)),
    ({"input": [{"type": "function_call_output", "call_id": "fc_1", "output": "x"}]}, ("fc_1",)),
    ({"messages": [{"role": "user", "content": [
        {"toolResult": {"toolUseId": "b_1", "content": []}}]}]}, ("b_1",)),
    ({"contents": [{"role": "user", "parts": [
        {"functionResponse": {"id": "g_1", "name": "f", "response": {}}}]}]}, ("g_1",)),
    ({"messages": "not a list"}, ()),
    ({"messages": [{"role": "tool", "tool_call_id": 5}]}, ()),
    ([1, 2], ()),
]


@pytest.mark.parametrize(("body", "ids"), RESULTS)
def test_result_ids_per_format(body: object, ids: tuple[str, ...]) -> None:
    assert result_ids(json.dumps(body).encode()) == ids


def test_result_ids_are_bounded_and_linear() -> None:
    body = {"messages": [{"role": "tool", "tool_call_id": f"c{i}"} for i in range(5000)]}
    assert len(result_ids(json.dumps(body).encode())) == 1000
    assert result_ids(b"{not json") == ()
    deep: object = {"type": "tool_result", "tool_use_id": "deep"}
    for _ in range(50):
        deep = {"content": [deep]}
    assert result_ids(json.dumps({"messages": [deep]}).encode()) == ()


async def test_redis_history_is_one_history_for_every_replica(redis_server: RedisServer) -> None:
    """Two replicas, each with its own cache of what it read: every load is the list as
    Redis holds it, across appends by either, trimming, a reset and a session that began
    again with fewer entries than were cached."""
    from proxy.sessions.redis_store import RedisStore

    stores = [RedisStore(redis_server.url), RedisStore(redis_server.url)]
    a, b = (hist.RedisHistory(s.client, keep=5, ttl_s=60) for s in stores)
    bucket = "s:flows-replicas"
    await a.delete(bucket)
    made = iter(range(1000))

    def some(n: int) -> list[PastCall]:
        return [past("t", set(), did=f"d{next(made)}") for _ in range(n)]

    async def ids(h: hist.RedisHistory) -> list[str]:
        return [e.decision_id for e in await h.load(bucket)]

    try:
        assert await ids(a) == [] and await ids(b) == []
        await a.record(bucket, some(2))
        assert await ids(b) == ["d0", "d1"] and await ids(a) == ["d0", "d1"]
        await b.record(bucket, some(1))
        assert await ids(a) == ["d0", "d1", "d2"]
        await a.record(bucket, some(4))  # over keep: trimmed to the newest 5
        assert await ids(b) == ["d2", "d3", "d4", "d5", "d6"] == await ids(a)
        await b.record(bucket, some(9))  # more than keep since a last looked
        assert await ids(a) == ["d11", "d12", "d13", "d14", "d15"]
        # Reset by b and begun again: a's cached count is higher, then equal, than Redis's.
        await b.delete(bucket)
        await b.record(bucket, some(5))
        assert await ids(a) == ["d16", "d17", "d18", "d19", "d20"]
        await b.delete(bucket)
        await b.record(bucket, some(1))
        assert await ids(a) == ["d21"]
        # An entry that does not read back is a store failure, not an empty history.
        await stores[0].client.rpush(hist.RedisHistory.key(bucket), "not json")
        await stores[0].client.incrby(hist.RedisHistory.key(bucket) + ":n", 1)
        with pytest.raises(StoreUnavailable):
            await b.load(bucket)
    finally:
        await a.delete(bucket)
        for s in stores:
            await s.close()


def test_a_megabyte_argument_costs_a_slice() -> None:
    """Model text of any size: the summary is clipped before it is escaped, the hash is
    one pass; both well under a millisecond per KB."""
    import time

    big = call("web_fetch", {"url": "\u202e" * (1 << 20), "more": "x" * (1 << 20)})
    started = time.perf_counter()
    text = hist.summary(big)
    digest = hist.args_sha256(big)
    assert time.perf_counter() - started < 0.5
    assert len(text) <= hist.SUMMARY_CHARS and "\u202e" not in text and len(digest) == 64
