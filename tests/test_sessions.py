"""Sessions, budgets, loops and stores, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError
from proxy.model import ToolCall, Usage
from proxy.providers.base import ParsedRequest
from proxy.sessions import loops, prices
from proxy.sessions.budgets import Budgets, Counter, Limit, Loops, Scope, counters, worst_case
from proxy.sessions.identity import agent_of, session_of
from proxy.sessions.prices import Price, PriceTable
from proxy.sessions.redis_store import RedisStore
from proxy.sessions.store import MemoryStore, Store
from tests.redis_server import RedisServer


def call(name: str, args: dict[str, object]) -> ToolCall:
    raw = json.dumps(args)
    return ToolCall("id", name, raw, args)


@pytest.mark.parametrize("cfg, history, expected", [
    (Loops(repeats=3), (3, []), None),
    (Loops(repeats=3), (4, []), loops.REPEAT_RULE),
    (Loops(pingpong=2), (1, ["a", "b", "a", "b"]), loops.PINGPONG_RULE),
    (Loops(pingpong=2), (1, ["a", "b", "a"]), None),
    (Loops(pingpong=2), (1, ["a", "a", "a", "a"]), None),
    (Loops(pingpong=2), (1, ["a", "b", "c", "b"]), None),
    (Loops(pingpong=3), (1, ["a", "b", "a", "b"]), None),
    (Loops(), (99, ["a", "b", "a", "b"]), None),
])
def test_loop_verdicts(cfg: Loops, history: tuple[int, list[str]], expected: str | None) -> None:
    got = loops.verdict(cfg, call("x", {}), *history)
    assert (got[0] if got else None) == expected


def test_signature_ignores_key_order_and_spacing_and_name_case() -> None:
    a = ToolCall("1", "describe_volume", '{"a": 1, "b": [1, 2]}', {"a": 1, "b": [1, 2]})
    b = ToolCall("2", "Describe_Volume", '{"b":[1,2],"a":1}', {"b": [1, 2], "a": 1})
    c = ToolCall("3", "describe_volume", '{"a": 2}', {"a": 2})
    assert loops.signature(a) == loops.signature(b) != loops.signature(c)


def test_worst_case_and_prices() -> None:
    table = PriceTable.build([("gpt-4o-mini*", Price(0.15, 0.60)), ("gpt-4o*", Price(2.5, 10))],
                             Price(15, 75))
    budgets = Budgets(max_output_tokens=1000, prices=table)
    assert worst_case(budgets, "gpt-4o-2024", 100, None) == {
        "tokens": 1100, "input_tokens": 100, "output_tokens": 1000, "cost_usd": 10250,
        "llm_calls": 1}
    assert table.cost_micro_usd("GPT-4o-mini", Usage(1_000_000, 0)) == 150_000
    assert table.price("unknown-model") == Price(15, 75)


def test_prices_are_remembered_per_model_within_bounds() -> None:
    """A model's price is matched once and remembered; model names come from agents, so
    only so many, so long, are (the others are matched each time, with the same result)."""
    table = PriceTable.build([("gpt-4o*", Price(2.5, 10))], Price(15, 75))
    for _ in range(2):
        assert table.price("GPT-4o-x") == table.price("gpt-4o-x") == Price(2.5, 10)
    long = "gpt-4o" + "x" * prices.CACHED_LENGTH
    assert table.price(long) == Price(2.5, 10) and long not in table._found
    for i in range(prices.PRICES_CACHED + 10):
        table.price(f"m{i}")
    assert len(table._found) == prices.PRICES_CACHED
    assert table.price("gpt-4o-late") == Price(2.5, 10) and "gpt-4o-late" not in table._found


def test_counters_name_agent_and_session_separately() -> None:
    budgets = Budgets(session=Limit(Scope.SESSION, {"llm_calls": 2}),
                      agent=Limit(Scope.AGENT, {"llm_calls": 10}, window_s=3600))
    a = counters(budgets, "janitor", "s1", 7200.5, {"llm_calls": 1})
    b = counters(budgets, "janitor", "s2", 7200.5, {"llm_calls": 1})
    c = counters(budgets, "other", "s1", 7200.5, {"llm_calls": 1})
    bucket = {x.bucket for x in a if x.label.startswith("agent")}
    assert bucket == {x.bucket for x in b if x.label.startswith("agent")}
    assert {x.bucket for x in a if x.label.startswith("session")} != \
        {x.bucket for x in c if x.label.startswith("session")}
    windowed = [x for x in a if x.label.startswith("agent")]
    assert all(x.reset_at == 10800 for x in windowed)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Store:
    if request.param == "memory":
        return MemoryStore()
    made = RedisStore(redis_server.url)
    await made.delete([f"t-{request.node.name}"])
    return made


async def test_reserve_is_all_or_nothing(store: Store, request: pytest.FixtureRequest) -> None:
    bucket = f"t-{request.node.name}"
    first = Counter(bucket, "a", 5, 10, False, 60)
    second = Counter(bucket, "b", 5, 6, False, 60)
    assert (await store.reserve([first, second])).ok
    result = await store.reserve([first, second])
    assert not result.ok and result.blocked == (second,)
    assert await store.read(bucket) == {"a": 5, "b": 5}  # the blocked reservation left no trace
    await store.adjust([Counter(bucket, "a", -3, None, False, 60)])
    assert (await store.read(bucket))["a"] == 2
    await store.close()


async def test_shadow_counters_are_applied_and_reported(store: Store,
                                                        request: pytest.FixtureRequest) -> None:
    bucket = f"t-{request.node.name}"
    shadow = Counter(bucket, "a", 5, 4, True, 60)
    result = await store.reserve([shadow])
    assert result.ok and result.shadow == (shadow,)
    assert (await store.read(bucket))["a"] == 5
    await store.close()


async def test_observe_keeps_counts_and_recent_history(store: Store,
                                                       request: pytest.FixtureRequest) -> None:
    bucket = f"t-{request.node.name}"
    for sig in ("a", "b", "a"):
        count, recent = await store.observe(bucket, sig, 2, 60)
    assert (count, recent) == (2, ["a", "b"])
    await store.trip(bucket, "why", 60)
    assert await store.tripped(bucket) == "why"
    await store.delete([bucket])
    assert await store.tripped(bucket) is None and await store.read(bucket) == {}
    await store.close()


async def test_admit_reads_trip_and_age_and_reserves_in_one_step(
        store: Store, request: pytest.FixtureRequest) -> None:
    bucket = f"t-{request.node.name}"
    calls = [Counter(bucket, "llm_calls", 1, 2, False, 60)]
    first = await store.admit(bucket, calls, now=1000.0, ttl_s=60, max_age_s=30,
                              enforce_age=True)
    assert (first.tripped, first.first_seen) == (None, 1000.0)
    assert first.reserved is not None and first.reserved.ok
    later = await store.admit(bucket, calls, now=1020.0, ttl_s=60, max_age_s=30,
                              enforce_age=True)
    assert later.first_seen == 1000.0 and later.reserved is not None and later.reserved.ok
    full = await store.admit(bucket, calls, now=1021.0, ttl_s=60, max_age_s=None,
                             enforce_age=True)
    assert full.first_seen is None and full.reserved is not None
    assert full.reserved.blocked == (calls[0],)
    # Too old: with the age enforced nothing is reserved; in shadow it is, and the age shows.
    other = [Counter(bucket, "tokens", 5, None, False, 60)]
    old = await store.admit(bucket, other, now=1031.0, ttl_s=60, max_age_s=30, enforce_age=True)
    assert (old.first_seen, old.reserved) == (1000.0, None)
    assert "tokens" not in await store.read(bucket)
    shadow = await store.admit(bucket, other, now=1031.0, ttl_s=60, max_age_s=30,
                               enforce_age=False)
    assert shadow.first_seen == 1000.0 and shadow.reserved is not None
    assert (await store.read(bucket))["tokens"] == 5
    # Tripped: the note, and nothing else read or reserved.
    await store.trip(bucket, "a loop", 60)
    stopped = await store.admit(bucket, other, now=1032.0, ttl_s=60, max_age_s=30,
                                enforce_age=True)
    assert (stopped.tripped, stopped.first_seen, stopped.reserved) == ("a loop", None, None)
    assert (await store.read(bucket))["tokens"] == 5
    await store.delete([bucket])
    await store.close()


def test_memory_store_is_bounded() -> None:
    import asyncio

    store = MemoryStore(maxsize=100)
    for i in range(1000):
        asyncio.run(store.reserve([Counter(f"s{i}", "a", 1, 10, False, 60)]))
    assert len(store) == 100


def test_identity() -> None:
    import hashlib

    keys = {hashlib.sha256(b"sk-janitor").hexdigest(): "janitor"}
    assert agent_of({"authorization": "Bearer sk-janitor"}, keys, False) == "janitor"
    assert agent_of({"authorization": "Bearer sk-x", "x-tether-agent": "a"}, keys, True) == "a"
    assert agent_of({"x-tether-agent": "a"}, keys, False) is None
    req = ParsedRequest("m", False, (), user=None, fingerprint='["sys", "hi"]')
    one = session_of({}, req, "janitor", True)
    assert one == session_of({}, req, "janitor", True) != session_of({}, req, "other", True)
    assert session_of({"x-tether-session": "s"}, req, None, True) == "s"
    # an untrusted header is ignored: the fingerprint decides
    assert session_of({"x-tether-session": "s"}, req, None, False) == session_of({}, req, None, True)
    assert session_of({}, ParsedRequest("m", False, ()), None, True) == "default"


@pytest.mark.parametrize("text, message", [
    ("budgets:\n  session: {tokens: -1}\n", "budgets.session.tokens: must be a positive"),
    ("budgets:\n  session: {tokns: 1}\n", "budgets.session.tokns: unknown key"),
    ("budgets:\n  agent: {per: week}\n", "budgets.agent.per: must be hour or day"),
    ("budgets:\n  session: {trip: forever, repeats: 2}\n", "must be call or session"),
    ("budgets:\n  global: {repeats: 2}\n", "budgets.global.repeats: unknown key"),
    ("store: postgres://x\n", "store: must be memory or a redis:// URL"),
])
def test_bad_budget_config(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_mod.load(path, env={})
