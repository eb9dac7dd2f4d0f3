"""Linked calls without a socket to an LLM: the `tools.X.api` / `args` config, the
canonical comparison, and the ledger (memory and a real Redis), including two replicas
racing to redeem one approved call (docs/linked-calls.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.errors import ConfigError, StoreUnavailable
from proxy.linked_calls import LinkedCalls
from proxy.model import Action, Decision, Effect, Exchange, ToolCall
from proxy.policy.tool_apis import (
    NO_DECIDED_CALL,
    ToolApiLink,
    Uncomparable,
    canonical_text,
    expected,
    fingerprint,
    observed,
)
from proxy.sessions.ledger import Entry, Ledger, MemoryLedger, RedisLedger
from proxy.sessions.redis_store import RedisStore
from proxy.telemetry import Metrics
from tests.redis_server import RedisServer

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"


def load(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "tether.yaml"
    path.write_text(text)
    return config_mod.load(path, env={})


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return e.value


# -- config -----------------------------------------------------------------------------------

def test_a_tool_linked_to_an_aws_operation_compiles_with_its_effect(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
tools:
  delete_volume: {api: aws.ec2.DeleteVolume, args: {VolumeId: volume_id}}
  list_volumes: {api: aws.ec2.DescribeVolumes, args: {VolumeId: ids}}
  tag_volume: {api: aws.ec2.CreateTags, effect: read, args: {Resource: target.id}}
egress: {require_decided_call: true, decided_call_ttl: 2m}
""")
    links = cfg.tool_apis.links
    assert links["delete_volume"].operation == "aws.ec2.DeleteVolume"
    assert links["delete_volume"].args == (("VolumeId", ("volume_id",)),)
    assert links["tag_volume"].args == (("Resource", ("target", "id")),)
    assert cfg.policy.effects["delete_volume"] is Effect.WRITE
    assert cfg.policy.effects["list_volumes"] is Effect.READ
    assert cfg.policy.effects["tag_volume"] is Effect.READ  # the declared effect wins
    assert cfg.tool_apis.settings.require_decided_call
    assert cfg.tool_apis.settings.decided_call_ttl_s == 120
    assert cfg.tool_apis.operations == {"aws.ec2.DeleteVolume", "aws.ec2.DescribeVolumes",
                                        "aws.ec2.CreateTags"}


def test_defaults_link_nothing_and_require_nothing(tmp_path: Path) -> None:
    cfg = load(tmp_path, "rules: []\n")
    assert not cfg.tool_apis.links and not cfg.tool_apis.settings.require_decided_call


def test_an_apis_operation_links_with_the_identity_mapping(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"""
apis:
  jira: {{url: 'https://jira.example.com', spec: {SPECS / 'jira.yaml'}}}
tools:
  create_issue: {{api: jira.createIssue}}
""")
    link = cfg.tool_apis.links["create_issue"]
    assert link.operation == "jira.createIssue" and link.args is None
    assert cfg.apis.for_tool("create_issue") is not None  # still checked against the spec


@pytest.mark.parametrize(("tools", "line", "needle"), [
    ("  d: {api: aws.ec2.DeleteVolumes}", 3, "has no operation 'DeleteVolumes'"),
    ("  d: {api: aws.ec2.deletevolume}", 3, "neither an operation of a configured API"),
    ("  d: {api: aws.ec3.DeleteVolume}", 3, "knows no AWS service 'ec3'"),
    # Only AWS operations can be checked at load, so only they link (apis_config's message).
    ("  d: {api: azure.Microsoft.Compute/disks/delete}", 3, "no operation"),
    ("  d: {api: gcp.compute.disks.delete}", 3, "no operation"),
    ("  d:\n    effect: write\n    api: aws.ec2.DeleteVolume\n    args: [VolumeId]", 6,
     "maps API parameters"),
    ("  d: {api: aws.ec2.DeleteVolume, args: {VolumeId: 3}}", 3, "names a tool argument"),
    ("  d: {api: aws.ec2.DeleteVolume, args: {VolumeId: 'a..b'}}", 3, "names a tool argument"),
    ("  d: {api: aws.ec2.DeleteVolume, args: {'Volume Id': v}}", 3, "not an API parameter"),
    ("  d: {args: {VolumeId: v}}", 3, "name the api too"),
])
def test_bad_links_are_refused_at_load_with_file_and_line(tmp_path: Path, tools: str, line: int,
                                                          needle: str) -> None:
    e = refused(tmp_path, f"# linked\ntools:\n{tools}\n")
    assert needle in e.message, e.message
    assert e.file is not None and e.file.endswith("tether.yaml") and e.line == line
    assert "tools.d" in (e.key or "")


def test_a_link_to_an_operation_the_openapi_spec_lacks_is_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, f"""apis:
  jira: {{url: 'https://jira.example.com', spec: {SPECS / 'jira.yaml'}}}
tools:
  nope: {{api: jira.noSuchOperation, args: {{x: y}}}}
""")
    assert "noSuchOperation" in e.message and e.line == 4


@pytest.mark.parametrize(("egress", "needle"), [
    ("egress: {require_decided_call: yes please}", "true or false"),
    ("egress: {require_decided_call: 1}", "true or false"),
    ("egress: {decided_call_ttl: forever}", "not a duration"),
    ("egress: {require: true}", "unknown key"),
    ("egress: [require_decided_call]", "must be a mapping"),
])
def test_bad_egress_settings_are_refused(tmp_path: Path, egress: str, needle: str) -> None:
    e = refused(tmp_path, f"rules: []\n{egress}\n")
    assert needle in e.message and e.line == 2


# -- canonical comparison ---------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "same"), [
    ({"n": 50}, {"n": 50.0}, True),             # one JSON number
    ({"n": 50}, {"n": "50"}, False),            # a number is not its text
    ({"b": True}, {"b": 1}, False),             # a boolean is not a number
    ({"b": True}, {"b": "true"}, False),
    ({"x": None}, {}, False),                   # null is not absent
    ({"s": "caf\u00e9"}, {"s": "cafe\u0301"}, False),  # NFC is not NFD: no normalisation
    ({"s": "vol-A"}, {"s": "vol-a"}, False),    # no case folding
    ({"s": "vol-1"}, {"s": "vol-1 "}, False),   # no trimming
    ({"l": [1, 2]}, {"l": [2, 1]}, False),      # lists keep their order
    ({"l": ["a"]}, {"l": "a"}, False),          # a list of one is not its element
    ({"o": {"a": 1, "b": 2}}, {"o": {"b": 2, "a": 1}}, True),  # object keys have no order
    ({"s": "\ud800x"}, {"s": "\ud800x"}, True),  # a lone surrogate compares, and encodes
    ({"n": 2 ** 60}, {"n": float(2 ** 60)}, False),  # past 2**53 a float is not exact
    ({"n": 0.1 + 0.2}, {"n": 0.3}, False),
])
def test_canonical_comparison_is_exact(a: dict[str, object], b: dict[str, object],
                                       same: bool) -> None:
    assert (canonical_text(a) == canonical_text(b)) is same
    assert canonical_text(a).isascii()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, b"bytes", {"s": {1, 2}}])
def test_values_without_a_canonical_form_never_compare(bad: object) -> None:
    with pytest.raises(Uncomparable):
        canonical_text({"v": bad})


def test_mapping_takes_only_the_named_arguments_and_leaves_absent_ones_out() -> None:
    link = ToolApiLink("d", "aws.ec2.DeleteVolume", (("VolumeId", ("volume_id",)),
                                                     ("DryRun", ("options", "dry"))))
    assert expected(link, {"volume_id": "v-1", "reason": "cleanup"}) == {"VolumeId": "v-1"}
    assert expected(link, {"volume_id": "v-1", "options": {"dry": False}}) == {
        "VolumeId": "v-1", "DryRun": False}
    assert expected(link, {"options": "not an object"}) == {}
    identity = ToolApiLink("c", "jira.createIssue")
    assert expected(identity, {"a": 1}) == {"a": 1}


def test_the_query_protocol_version_is_the_sdks_not_the_calls() -> None:
    assert observed("aws.ec2.DeleteVolume", {"VolumeId": "v", "Version": "2016-11-15"}) == {
        "VolumeId": "v"}
    # Not a date: a real parameter, compared like any other.
    assert observed("aws.x.Y", {"Version": "7"}) == {"Version": "7"}
    assert observed("jira.createIssue", {"Version": "2016-11-15"}) == {"Version": "2016-11-15"}


def test_the_key_separates_agents_and_operations() -> None:
    args = canonical_text({"VolumeId": "v"})
    keys = {fingerprint(a, op, args) for a in ("janitor", "other", None)
            for op in ("aws.ec2.DeleteVolume", "aws.ec2.DetachVolume")}
    assert len(keys) == 6


# -- the ledger -------------------------------------------------------------------------------

def entry(key: str = "k", session: str | None = "s1", ttl: float = 60, did: str = "d1") -> Entry:
    return Entry(key, did, "janitor", session, "delete_volume", "aws.ec2.DeleteVolume",
                 '{"VolumeId":"v"}', "approved by alice", time.time() + ttl)


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, redis_server: RedisServer
                 ) -> AsyncIterator[Ledger]:
    """Each test's keys are its own (the Redis server is shared by the whole run)."""
    if request.param == "memory":
        yield Keyed(MemoryLedger())
        return
    store = RedisStore(redis_server.url)
    yield Keyed(RedisLedger(store.client))
    await store.close()


class Keyed:
    """A ledger whose keys are prefixed with a fresh id."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.prefix = uuid.uuid4().hex

    async def put(self, entry: Entry, ttl_s: float) -> None:
        await self.inner.put(replace(entry, key=self.prefix + entry.key), ttl_s)

    async def take(self, key: str, session: str | None) -> Entry | None:
        return await self.inner.take(self.prefix + key, session)

    async def close(self) -> None:
        await self.inner.close()


async def test_an_entry_is_taken_once(ledger: Ledger) -> None:
    await ledger.put(entry(), 60)
    assert await ledger.take("other-key", None) is None
    got = await ledger.take("k", "s1")
    assert got is not None and got.decision_id == "d1" and got.approved_by == "approved by alice"
    assert await ledger.take("k", "s1") is None
    assert await ledger.take("k", None) is None


async def test_two_identical_calls_are_two_entries_each_taken_once(ledger: Ledger) -> None:
    await ledger.put(entry(did="d1"), 60)
    await ledger.put(entry(did="d2"), 60)
    taken = [await ledger.take("k", None) for _ in range(3)]
    assert sorted(e.decision_id for e in taken if e) == ["d1", "d2"] and taken[2] is None


async def test_a_named_session_must_match(ledger: Ledger) -> None:
    await ledger.put(entry(session="s1"), 60)
    assert await ledger.take("k", "s2") is None
    assert await ledger.take("k", "s1") is not None
    await ledger.put(entry(session=None), 60)
    assert await ledger.take("k", "s1") is None      # an entry of no session is no session's
    assert await ledger.take("k", None) is not None  # but the agent's


async def test_an_expired_entry_is_not_taken(ledger: Ledger) -> None:
    await ledger.put(entry(ttl=0.2), 0.2)
    await asyncio.sleep(0.35)
    assert await ledger.take("k", None) is None


async def test_sessions_and_tools_of_any_text_round_trip(ledger: Ledger) -> None:
    odd = "s\ud800\u202e|漢字|"
    await ledger.put(entry(session=odd), 60)
    got = await ledger.take("k", odd)
    assert got is not None and got.session == odd


async def test_two_replicas_racing_for_one_entry_redeem_it_exactly_once(
        redis_server: RedisServer) -> None:
    stores = [RedisStore(redis_server.url) for _ in range(2)]
    try:
        replicas = [RedisLedger(s.client) for s in stores]
        for round_ in range(5):
            key = f"race-{uuid.uuid4().hex}-{round_}"
            await replicas[0].put(entry(key=key), 60)
            taken = await asyncio.gather(*(replicas[i % 2].take(key, None) for i in range(40)))
            assert sum(1 for t in taken if t is not None) == 1
    finally:
        for s in stores:
            await s.close()


async def test_a_ledger_whose_redis_is_gone_raises_store_unavailable(
        own_redis: RedisServer) -> None:
    store = RedisStore(own_redis.url)
    ledger = RedisLedger(store.client)
    await ledger.put(entry(), 60)
    own_redis.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await ledger.take("k", None)
        with pytest.raises(StoreUnavailable):
            await ledger.put(entry(), 60)
    finally:
        await store.close()


# -- LinkedCalls: record and redeem -----------------------------------------------------------

class DownLedger:
    async def put(self, entry: Entry, ttl_s: float) -> None:
        raise StoreUnavailable("the ledger is down")

    async def take(self, key: str, session: str | None) -> Entry | None:
        raise StoreUnavailable("the ledger is down")

    async def close(self) -> None:
        return None


def linked_calls(tmp_path: Path, ledger: Ledger, require: bool = True) -> LinkedCalls:
    cfg = load(tmp_path, f"""
tools:
  delete_volume: {{api: aws.ec2.DeleteVolume, args: {{VolumeId: volume_id}}}}
egress: {{require_decided_call: {str(require).lower()}}}
""")
    return LinkedCalls(cfg.tool_apis, ledger, Metrics())


CALL = ToolCall("c1", "delete_volume", '{"volume_id": "vol-1"}', {"volume_id": "vol-1"})
EXCHANGE = Exchange("openai", "m", ("delete_volume",), session="s1", agent="janitor")


async def test_an_approved_call_is_redeemed_once_with_exactly_its_arguments(
        tmp_path: Path) -> None:
    linked = linked_calls(tmp_path, MemoryLedger())
    held = Decision(Action.HOLD, ("r",), decision_id="llm-1")
    final = Decision(Action.ALLOW, ("r",), "approved by alice (approval a1)", decision_id="llm-1")
    await linked.record([CALL], [held], [final], EXCHANGE)

    async def redeem(args: dict[str, object], agent: str | None = "janitor",
                     session: str | None = None) -> str | None:
        got = await linked.redeem(agent=agent, session=session, operation="aws.ec2.DeleteVolume",
                                  arguments=args, effect=Effect.WRITE)
        assert (got.entry is None) == (got.trace is not None)
        return got.entry.decision_id if got.entry else None

    assert await redeem({"VolumeId": "vol-2", "Version": "2016-11-15"}) is None
    assert await redeem({"VolumeId": "vol-1", "Force": "true"}) is None
    assert await redeem({"VolumeId": "vol-1"}, agent="intruder") is None
    assert await redeem({"VolumeId": "vol-1"}, session="s2") is None
    assert await redeem({"VolumeId": "vol-1"}, agent=None, session=None) is None
    assert await redeem({"VolumeId": "vol-1", "Version": "2016-11-15"}, session="s1") == "llm-1"
    assert await redeem({"VolumeId": "vol-1"}) is None  # once


async def test_denied_calls_and_unparsed_arguments_are_never_filed(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    linked = linked_calls(tmp_path, ledger)
    bad = ToolCall("c2", "delete_volume", "{oops", None, problem="not JSON")
    nan = ToolCall("c3", "delete_volume", '{"volume_id": NaN}', {"volume_id": float("nan")})
    deny = Decision(Action.DENY, decision_id="x")
    allow = Decision(Action.ALLOW, decision_id="y")
    await linked.record([CALL, bad, nan], [deny, allow, allow], [deny, allow, allow], EXCHANGE)
    assert len(ledger) == 0


async def test_a_ledger_that_is_down_redeems_nothing_and_writes_are_denied(
        tmp_path: Path) -> None:
    linked = linked_calls(tmp_path, DownLedger())
    final = Decision(Action.ALLOW, decision_id="llm-1")
    await linked.record([CALL], [final], [final], EXCHANGE)  # logged and counted, no raise
    got = await linked.redeem(agent="janitor", session=None, operation="aws.ec2.DeleteVolume",
                              arguments={"VolumeId": "vol-1"}, effect=Effect.WRITE)
    assert got.entry is None and got.trace is not None
    assert got.trace.rule_id == NO_DECIDED_CALL and got.trace.action is Action.DENY
    assert "unavailable" in got.trace.reason or "down" in got.trace.reason
    assert 'tether_fail_closed_total{reason="ledger"} 2.0' in linked.metrics.render().decode()


async def test_reads_and_unrequired_writes_get_no_deny(tmp_path: Path) -> None:
    linked = linked_calls(tmp_path, MemoryLedger())
    read = await linked.redeem(agent="janitor", session=None, operation="aws.ec2.DescribeVolumes",
                               arguments={}, effect=Effect.READ)
    assert read.entry is None and read.trace is None
    write = await linked.redeem(agent="janitor", session=None, operation=None,
                                arguments={}, effect=Effect.WRITE)
    assert write.trace is not None and "cannot name the operation" in write.trace.reason
    relaxed = linked_calls(tmp_path, MemoryLedger(), require=False)
    got = await relaxed.redeem(agent="janitor", session=None, operation="aws.ec2.DeleteVolume",
                               arguments={"VolumeId": "v"}, effect=Effect.WRITE)
    assert got.entry is None and got.trace is None


async def test_arguments_too_deep_to_compare_are_not_filed_and_do_not_break(
        tmp_path: Path) -> None:
    ledger = MemoryLedger()
    linked = linked_calls(tmp_path, ledger)
    deep: dict[str, object] = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]  # type: ignore[assignment]
    call = ToolCall("c", "delete_volume", "{}", {"volume_id": deep})
    allow = Decision(Action.ALLOW, decision_id="y")
    await linked.record([call], [allow], [allow], EXCHANGE)
    assert len(ledger) == 0
    got = await linked.redeem(agent="janitor", session=None, operation="aws.ec2.DeleteVolume",
                              arguments={"VolumeId": deep}, effect=Effect.WRITE)
    assert got.entry is None and got.trace is not None


async def test_a_megabyte_argument_is_compared_in_linear_time(tmp_path: Path) -> None:
    linked = linked_calls(tmp_path, MemoryLedger())
    big = "\ud800" + "x" * (1 << 20)
    call = ToolCall("c", "delete_volume", "{}", {"volume_id": big})
    allow = Decision(Action.ALLOW, decision_id="big")
    started = time.perf_counter()
    await linked.record([call], [allow], [allow], EXCHANGE)
    got = await linked.redeem(agent="janitor", session="s1", operation="aws.ec2.DeleteVolume",
                              arguments={"VolumeId": big}, effect=Effect.WRITE)
    assert got.entry is not None and got.entry.decision_id == "big"
    assert len(got.entry.arguments) <= 300
    assert time.perf_counter() - started < 2
