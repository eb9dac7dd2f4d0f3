"""What tether keeps of the Responses answers it rewrote (sessions/rewrites.py) and the next
request made to fit it (providers/responses_history.py): units, both stores, and two
replicas sharing one Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from proxy.errors import BadRequest, NotGoverned
from proxy.model import Action, Decision, ToolCall
from proxy.providers import responses_history as history
from proxy.providers.base import RouteKind
from proxy.providers.openai_stored import stored_route
from proxy.sessions.redis_store import RedisStore
from proxy.sessions.rewrites import MemoryRewrites, RedisRewrites, Rewrites
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, FakeOpenAI, Reply
from tests.redis_server import RedisServer
from tests.test_e2e_responses import PROD_DELETE, create

SURROGATE = "\ud800"


def record(rid: str = "resp_1", agent: str | None = "a", conversation: str | None = None,
           text: str = "denied") -> history.Rewrite:
    item: dict[str, object] = {"id": f"msg_tether_fc_{rid}", "type": "message",
                               "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": text}]}
    return history.Rewrite(rid, agent, (history.Denied(f"call_{rid}", text, item),),
                           (f"call_{rid}", "call_ok"), conversation)


def test_records_read_back_as_written_lone_surrogates_included() -> None:
    r = record(text=f"tool {SURROGATE} denied")
    text = history.dumps(r)
    assert text.isascii()
    assert history.loads(text) == r


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"r": 1}', '{"r": "x", "a": null, "n": [], '
                                  '"d": [{"id": "c"}]}'])
def test_records_that_do_not_read_back_are_errors(text: str) -> None:
    with pytest.raises(ValueError):
        history.loads(text)


def test_a_whole_answer_is_recorded_with_its_replacement() -> None:
    out = json.dumps({"id": "resp_9", "output": [
        {"type": "function_call", "call_id": "c1", "name": "list", "arguments": "{}"},
        {"id": "msg_tether_fc_2", "type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "no"}]}]}).encode()
    calls = [ToolCall("c1", "list", "{}", {}, 0), ToolCall("c2", "delete_volume", "{}", {}, 1)]
    decisions = [Decision(Action.ALLOW), Decision(Action.DENY, ("r1",), "never")]
    r = history.from_whole(out, calls, decisions, "a", "conv_1")
    assert r is not None and r.calls == ("c1", "c2") and r.conversation == "conv_1"
    [d] = r.denied
    assert d.call_id == "c2" and d.item["id"] == "msg_tether_fc_2" and "r1" in d.text
    assert history.from_whole(out, [], [], "a") is None


def test_the_next_request_answers_owed_calls_and_expands_references() -> None:
    r = record()
    body: dict[str, Any] = {"previous_response_id": "resp_1", "input": [
        {"type": "item_reference", "id": "msg_tether_fc_resp_1"},
        {"type": "message", "id": "msg_tether_x", "role": "assistant", "content": "t"},
        {"type": "function_call_output", "call_id": "call_ok", "output": "1"}]}
    out = history.apply(body, "a", r, [], {"msg_tether_fc_resp_1": r})
    assert out is not None
    sent = json.loads(out)["input"]
    assert sent[0] == {"type": "function_call_output", "call_id": "call_resp_1",
                       "output": "denied"}
    assert sent[1]["type"] == "message" and "id" not in sent[1]
    assert sent[2] == {"type": "message", "role": "assistant", "content": "t"}
    assert history.apply({"input": "hi"}, "a", None, [], {}) is None


@pytest.mark.parametrize(("previous", "items", "agent", "why"), [
    (None, {"msg_tether_fc_resp_1": None}, "a", "tether no longer holds it"),
    (None, {"msg_tether_fc_resp_1": record(agent="b")}, "a", "another agent"),
    (record(agent="b"), {}, "a", "another agent"),
    (None, {"msg_tether_fc_resp_1": record(rid="resp_2")}, "a", "is not a message"),
])
def test_what_tether_cannot_resolve_is_refused(previous: history.Rewrite | None,
                                               items: dict[str, history.Rewrite | None],
                                               agent: str, why: str) -> None:
    body: dict[str, Any] = {"input": [{"type": "item_reference", "id": "msg_tether_fc_resp_1"}]}
    if previous is not None:
        body = {"previous_response_id": previous.response_id, "input": "go"}
    with pytest.raises(BadRequest) as e:
        history.apply(body, agent, previous, [], items)
    assert why in e.value.message


def test_hostile_input_lists_cost_linear_time() -> None:
    """10,000 references and a megabyte of text: one pass, no quadratic work."""
    r = record()
    refs = [{"type": "item_reference", "id": "msg_tether_fc_resp_1"}] * 10_000
    body: dict[str, Any] = {"previous_response_id": "resp_1",
                            "input": [*refs, {"role": "user", "content": "x" * 1_000_000}]}
    started = time.perf_counter()
    out = history.apply(body, "a", r, [], {"msg_tether_fc_resp_1": r})
    assert out is not None and time.perf_counter() - started < 2
    assert history.wanted(body).refs.count("msg_tether_fc_resp_1") == 10_000
    odd: object
    for odd in (None, 1, "x", [1, None, [], {}], {"type": "item_reference", "id": 5}):
        assert history.apply({"input": odd}, "a", None, [], {}) is None


def test_stored_views() -> None:
    r = record()
    stored: dict[str, object] = {"id": "resp_1", "output": [
        {"type": "function_call", "call_id": "call_resp_1", "name": "delete", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_ok", "name": "list", "arguments": "{}"}]}
    shown = history.response_view(stored, r, "a")
    output = shown["output"]
    assert isinstance(output, list)
    assert [i["type"] for i in output] == ["message", "function_call"]
    with pytest.raises(NotGoverned):
        history.response_view(stored, None, "a")
    with pytest.raises(BadRequest):
        history.response_view(stored, r, "b")
    plain: dict[str, object] = {"id": "resp_2", "output": [{"type": "message", "content": []}]}
    assert history.response_view(plain, None, "a") == plain
    page: dict[str, object] = {"data": [
        {"type": "function_call_output", "call_id": "call_resp_1", "output": "x"}]}
    assert history.items_view(page, [], "a", "it") == page


@pytest.mark.parametrize(("method", "path", "kind"), [
    ("GET", "v1/responses/resp_1", RouteKind.RETRIEVE),
    ("GET", "v1/responses/resp_1/input_items", RouteKind.RETRIEVE),
    ("GET", "v1/conversations/conv_1/items", RouteKind.RETRIEVE),
    ("POST", "v1/conversations", RouteKind.PASS),
    ("GET", "v1/responses/resp_1/items", None),
    ("GET", "v1/conversations/conv_1", None),
    ("GET", "v1/conversations/conv_1/input_items", None),
    ("POST", "v1/responses/resp_1", None),
    ("GET", "v1/responses/resp.1", None),
    ("GET", "v1/responses/" + "x" * 201, None),
    ("GET", "v2/responses/resp_1", None),
])
def test_stored_routes(method: str, path: str, kind: RouteKind | None) -> None:
    route = stored_route(method, path)
    assert (route.kind if route else None) == kind


# --- the stores ---------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Any:
    if request.param == "memory":
        yield MemoryRewrites()
        return
    redis = RedisStore(redis_server.url)
    yield RedisRewrites(redis.client)
    await redis.close()


async def test_a_store_keeps_records_items_conversations_and_aliases(store: Rewrites) -> None:
    tag = f"{time.time_ns()}"
    r = record(rid=f"resp_{tag}", conversation=f"conv_{tag}", text=f"no {SURROGATE}")
    await store.put(r)
    assert await store.response(r.response_id) == r
    assert await store.response("resp_none") is None
    item = str(r.denied[0].item["id"])
    assert await store.items([item, "msg_tether_none"]) == {item: r, "msg_tether_none": None}
    assert await store.owed(f"conv_{tag}") == [r]
    assert await store.conversation(f"conv_{tag}") == [r]
    await store.settle(f"conv_{tag}", [r.response_id])
    assert await store.owed(f"conv_{tag}") == []
    assert await store.conversation(f"conv_{tag}") == [r]  # still shown as rewritten
    await store.put_alias("a:b", f"first_{tag}", "last")
    assert await store.alias("a:b", f"first_{tag}") == "last"
    assert await store.alias("a", f"b:first_{tag}") is None  # no pair spells another's
    assert await store.alias(None, f"first_{tag}") is None


async def test_expired_records_are_gone() -> None:
    store = MemoryRewrites(ttl_s=-1)
    await store.put(record())
    assert await store.response("resp_1") is None
    assert await store.items(["msg_tether_fc_resp_1"]) == {"msg_tether_fc_resp_1": None}


# --- replicas -----------------------------------------------------------------------------


async def replicas(make_stack: MakeStack, redis: RedisServer) -> tuple[Stack, Stack]:
    fake = FakeOpenAI()  # one upstream behind both
    a = await make_stack(fake=fake, extra=f"store: {redis.url}")
    b = await make_stack(fake=fake, extra=f"store: {redis.url}")
    return a, b


@pytest.mark.parametrize("stream", [False, True])
async def test_the_next_turn_may_reach_another_replica(make_stack: MakeStack,
                                                       redis_server: RedisServer,
                                                       stream: bool) -> None:
    a, b = await replicas(make_stack, redis_server)
    a.fake.push(Reply(calls=(Call(PROD_DELETE.name, PROD_DELETE.arguments),)))
    first, _ = await create(a, stream)
    a.fake.push(Reply(content="chained"), Reply(content="referenced"))
    second, _ = await create(b, stream, previous_response_id=first.id, input="why?")
    assert second.output_text == "chained"
    assert a.fake.requests[1]["input"][0]["type"] == "function_call_output"
    third, _ = await create(b, stream, input=[
        {"role": "user", "content": "clean up"},
        *({"type": "item_reference", "id": i.id} for i in first.output)])
    assert third.output_text == "referenced"
    again = await b.client().responses.retrieve(first.id)
    assert again.output[0].type == "message"


async def test_a_store_that_is_down_fails_closed(make_stack: MakeStack,
                                                 own_redis: RedisServer) -> None:
    stack = await make_stack(extra=f"store: {own_redis.url}")
    stack.fake.push(Reply(calls=(Call(PROD_DELETE.name, PROD_DELETE.arguments),)))
    first, _ = await create(stack, False)
    own_redis.stop()
    with pytest.raises(openai.APIStatusError) as e:
        await create(stack, False, previous_response_id=first.id, input="go")
    assert e.value.status_code == 503
    # The first turn and tether's continuation of it (on_deny: continue); nothing of the
    # refused turn went upstream.
    assert len(stack.fake.requests) == 2
