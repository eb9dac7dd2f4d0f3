"""What an approver is shown beside a held call (approvals/context.py, approvals/shown.py).

Pure tables for the readers of every wire format; the bounds and masking on hostile
text (100 KB, 1 MB, secrets, bidi and zero-width characters); the record in real Redis,
read back by another replica and from a record written before holds had a context;
and `tether approvals list` against a running tether.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from proxy.approvals.context import (
    MODEL_CHARS,
    RECENT,
    USER_CHARS,
    HoldContext,
    build,
    last_user_text,
    model_text_before,
    read_answer,
)
from proxy.approvals.listing import context_lines
from proxy.approvals.queue import Approval, Mode, State
from proxy.approvals.redis_layout import ITEM
from proxy.approvals.redis_queue import RedisApprovals
from proxy.approvals.shown import UNKNOWN, listed, shown, visible_text
from proxy.cli import cmd_approvals
from proxy.model import Action, Effect, Exchange, PastCall, ToolCall
from tests import test_e2e_flows as flows
from tests.conftest import MakeStack
from tests.fakes import Call, Reply
from tests.redis_server import RedisServer
from tests.test_e2e_approvals import admin, pending
from tests.test_e2e_linked_calls import (  # noqa: F401 - fixtures
    KEY,
    StartLinked,
    admin_token,
    aws,
    denied,
    start_linked,
)
from tests.test_e2e_openai import MESSAGES
from tests.test_e2e_openai import TOOLS as LINKED_TOOLS

HOSTILE = ("delete <script>alert(1)</script> `x` <!channel> "
           "report\u202egnp.exe a\u200bb \u2066iso\u2069 tag\U000E0041 \x1b[31mred")


def j(value: object) -> bytes:
    return json.dumps(value).encode()


# -- the user's request, per wire format -------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(j({"messages": [{"role": "system", "content": "be careful"},
                                 {"role": "user", "content": "first"},
                                 {"role": "assistant", "content": "ok"},
                                 {"role": "user", "content": "clean up the volumes"}]}),
                 "clean up the volumes", id="chat"),
    pytest.param(j({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "part two"}]}]}), "part one\npart two", id="chat-parts"),
    pytest.param(j({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "resize vol-7"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": "done"}]}]}),
                 "resize vol-7", id="anthropic-after-a-tool-result"),
    pytest.param(j({"input": "what is the weather"}), "what is the weather",
                 id="responses-string"),
    pytest.param(j({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "list my volumes"}]},
        {"type": "function_call_output", "call_id": "c", "output": "[]"}]}),
                 "list my volumes", id="responses-items"),
    pytest.param(j({"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]},
                                 {"role": "model", "parts": [{"text": "hi"}]}]}),
                 "hello gemini", id="gemini"),
    pytest.param(j({"messages": [{"role": "user", "content": [{"text": "bedrock asks"}]}]}),
                 "bedrock asks", id="bedrock"),
    pytest.param(b"not json", None, id="not-json"),
    pytest.param(j([1, 2]), None, id="not-an-object"),
    pytest.param(j({"messages": "x"}), None, id="messages-not-a-list"),
    pytest.param(j({"messages": [{"role": "assistant", "content": "only me"}]}), None,
                 id="no-user-message"),
    pytest.param(b'{"messages": [' * 100_000, None, id="deep-nesting"),
])
def test_last_user_text(body: bytes, expected: str | None) -> None:
    assert last_user_text(body) == expected


# -- the model's text before the call ----------------------------------------------------------

def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


@pytest.mark.parametrize(("answer", "call_id", "expected"), [
    pytest.param(j({"choices": [{"message": {"role": "assistant", "content": "I will resize it.",
                                             "tool_calls": [{"id": "call_1", "function": {
                                                 "name": "x", "arguments": '{"text": "no"}'}}]}}]}),
                 "call_1", "I will resize it.", id="chat"),
    pytest.param(j({"content": [{"type": "thinking", "thinking": "secret plan"},
                                {"type": "text", "text": "Deleting now."},
                                {"type": "tool_use", "id": "tu_1", "name": "d",
                                 "input": {"text": "not said"}},
                                {"type": "text", "text": "after the call"}]}),
                 "tu_1", "Deleting now.", id="anthropic"),
    pytest.param(j({"output": [{"type": "reasoning", "summary": [{"text": "hidden"}]},
                               {"type": "message", "content": [{"type": "output_text",
                                                                "text": "Calling it."}]},
                               {"type": "function_call", "call_id": "fc_1", "name": "d",
                                "arguments": "{}"}]}),
                 "fc_1", "Calling it.", id="responses"),
    pytest.param(j({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "Gemini says"}, {"functionCall": {"name": "d", "args": {"text": "x"}}}]}}]}),
                 "", "Gemini says", id="gemini"),
    pytest.param(j({"output": {"message": {"role": "assistant", "content": [
        {"text": "Bedrock says"}, {"toolUse": {"toolUseId": "tu_9", "name": "d",
                                               "input": {"text": "x"}}},
        {"text": "later"}]}}}), "tu_9", "Bedrock says", id="bedrock"),
    pytest.param(sse({"choices": [{"delta": {"content": "Stream"}}]},
                     {"choices": [{"delta": {"content": "ed text."}}]},
                     {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c9"}]}}]}),
                 "c9", "Streamed text.", id="chat-stream"),
    pytest.param(sse({"type": "content_block_start", "content_block": {"type": "text",
                                                                       "text": ""}},
                     {"type": "content_block_delta", "delta": {"type": "text_delta",
                                                               "text": "Anthropic "}},
                     {"type": "content_block_delta", "delta": {"type": "text_delta",
                                                               "text": "streams."}}),
                 "", "Anthropic streams.", id="anthropic-stream"),
    pytest.param(sse({"type": "response.output_text.delta", "delta": "Once "},
                     {"type": "response.output_text.delta", "delta": "only."},
                     {"type": "response.output_text.done", "text": "Once only."},
                     {"type": "response.output_item.done", "item": {
                         "type": "message", "content": [{"type": "output_text",
                                                         "text": "Once only."}]}}),
                 "", "Once only.", id="responses-stream-no-repeats"),
    pytest.param(b"partial line\ndata: {broken\n" + sse({"choices": [{"delta": {
        "content": "kept"}}]}), "", "kept", id="stream-tail-cut-mid-line"),
    pytest.param(j({"choices": [{"message": {"content": None, "tool_calls": []}}]}), "", None,
                 id="no-text"),
    pytest.param(b"\xff\xfe garbage", "", None, id="garbage"),
])
def test_model_text_before(answer: bytes, call_id: str, expected: str | None) -> None:
    assert model_text_before(answer, call_id) == expected


# -- bounded, masked, shown -------------------------------------------------------------------

def read(request: bytes, answer: bytes, **kw: Any) -> HoldContext:
    """As the front end builds it: the request's user text and the answer's model text."""
    return build(user=last_user_text(request), said=read_answer(answer).before(""), **kw)


def test_an_answer_is_read_once_for_all_its_calls() -> None:
    answer = read_answer(j({"content": [
        {"type": "text", "text": "First. "}, {"type": "tool_use", "id": "a", "input": {}},
        {"type": "text", "text": "Second."}, {"type": "tool_use", "id": "b", "input": {}}]}))
    assert (answer.before("a"), answer.before("b"), answer.before("zz")) == (
        "First. ", "First. Second.", "First. Second.")
    deep = read_answer(b"[" * 50_000 + b"]" * 50_000)   # parsed or not: no crash, no text
    assert deep.before() is None


def test_a_huge_request_is_bounded_and_secrets_are_masked() -> None:
    request = j({"messages": [{"role": "user", "content": "use sk-" + "a" * 40 + " then "
                               + "x" * 100_000}]})
    answer = j({"choices": [{"message": {"content": "y" * 50_000 + " Bearer abc.def.ghi"}}]})
    context = read(request, answer, effect="write")
    assert context.user_request is not None and context.model_text is not None
    assert len(context.user_request) < USER_CHARS + 80
    assert context.user_request.endswith("more characters not shown)")
    assert "sk-aaaa" not in context.user_request and "[REDACTED]" in context.user_request
    assert len(context.model_text) < MODEL_CHARS + 80
    assert context.model_text.startswith("(") and "abc.def.ghi" not in context.model_text
    stored = json.dumps(context.as_json())
    assert len(stored) < 8000


def test_a_megabyte_of_the_worst_case_costs_linear_time() -> None:
    worst = "\u202e\u200b<`&" * 250_000   # every character escaped, masked, counted
    request = j({"messages": [{"role": "user", "content": worst}]})
    started = time.perf_counter()
    context = read(request, j({"content": [{"type": "text", "text": worst}]}))
    view = shown(approval(context=context))
    assert time.perf_counter() - started < 2.0
    assert len(view.user_request) < 7 * USER_CHARS and "\u202e" not in view.user_request


def approval(**kw: object) -> Approval:
    base: dict[str, object] = dict(
        id="apv_0123456789abcdef", binding="b" * 64, mode=Mode.WAIT, tool="resize_volume",
        arguments='{"size":10}', session="s-1", agent="janitor", provider="openai",
        rules=("writes-held",), message="Resizing needs a human", policy_revision="rev1",
        approvers=(), created=1_000.0, expires=1_300.0)
    return Approval(**{**base, **kw})  # type: ignore[arg-type]


def test_the_view_escapes_every_hidden_character_and_says_unknown() -> None:
    context = HoldContext(effect="write", api=None, user_request=HOSTILE + "\nline two",
                          model_text=None, recent=("10:00:00 allow list_volumes\u202e",))
    view = shown(approval(context=context, agent="a\u200bgent"), now=1_100.0)
    assert view.user_request == (
        "delete <script>alert(1)</script> `x` <!channel> report\\u202egnp.exe a\\u200bb "
        "\\u2066iso\\u2069 tag\\U000e0041 \\u001b[31mred\nline two")
    assert view.agent == "a\\u200bgent"
    assert view.model_text == UNKNOWN
    assert view.api == "none (no API operation is linked to this tool)"
    assert view.recent == ("10:00:00 allow list_volumes\\u202e",)
    assert view.time_left == "3 min 20 s"
    old = shown(approval(), now=2_000.0)  # a record from before holds had a context
    assert (old.effect, old.api, old.user_request, old.model_text, old.recent) == (
        UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, (UNKNOWN,))
    assert old.time_left == "expired"
    assert shown(approval(state=State.APPROVED)).time_left == "approved"


def test_recent_decisions_come_from_the_session_history() -> None:
    history = [PastCall(f"d{i}", "list_volumes", Effect.READ, Action.ALLOW, at=3600.0 * i,
                        summary=f"list_volumes(page={i})", api="aws.ec2.DescribeVolumes")
               for i in range(9)]
    context = build(history=history)
    assert context.recent is not None and len(context.recent) == RECENT
    assert context.recent[-1] == "08:00:00 allow list_volumes(page=8) (aws.ec2.DescribeVolumes)"
    assert build(history=[]).recent == ()
    assert build().recent is None


def test_the_cli_lines_are_the_shared_view() -> None:
    context = HoldContext(effect="write", api="aws.ec2.DeleteVolume",
                          user_request="\n".join(f"line {i}" for i in range(20)),
                          model_text=HOSTILE, recent=())
    lines = context_lines(listed(approval(context=context), now=1_000.0))
    assert lines[0] == ("effect: write   API operation: aws.ec2.DeleteVolume   "
                        "time left: 5 min 0 s")
    assert lines[1] == "rule: writes-held: Resizing needs a human"
    assert "  | … (12 more lines)" in lines
    assert "\x1b" not in "".join(lines) and "\u202e" not in "".join(lines)
    assert lines[-1] == "  (nothing earlier)"
    assert context_lines({"id": "x"})[0].startswith("effect: unknown")


# -- the record in Redis ---------------------------------------------------------------------

@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisApprovals,
                                                                        RedisApprovals]]:
    a = RedisApprovals(redis_server.url, poll_s=30)
    b = RedisApprovals(redis_server.url, poll_s=30)
    yield a, b
    await a.close()
    await b.close()


async def test_redis_keeps_the_context_and_reads_old_records_as_unknown(
        replicas: tuple[RedisApprovals, RedisApprovals], redis_server: RedisServer) -> None:
    a, b = replicas
    session = f"ctx-{time.time_ns()}"
    context = read(j({"input": "x" * 100_000 + HOSTILE}),
                   j({"content": [{"type": "text", "text": HOSTILE + "\ud800"}]}),
                   effect="write", api="aws.ec2.DeleteVolume", history=[])
    call = ToolCall("c1", "delete_volume", '{"id":"vol-1"}', {"id": "vol-1"})
    made = await a.create(call, Exchange("openai", "m", session=session, agent="bot"),
                          mode=Mode.TICKET, rules=("r",), message="m", revision="rev",
                          approvers=(), timeout_s=60, context=context)
    seen = await b.get(made.id)   # another replica
    assert seen is not None and seen.context == context
    assert seen.context.model_text is not None and seen.context.model_text.endswith("\ud800")
    raw = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await raw.hstrlen(ITEM + made.id, "context") < 12_000   # bounded
        await raw.hset(ITEM + made.id, "context", "{not json")
        assert (await b.get(made.id)).context is None  # type: ignore[union-attr]
        await raw.hdel(ITEM + made.id, "context")      # as written before this field
        old = await b.get(made.id)
    finally:
        await raw.aclose()
    assert old is not None and old.context is None
    view = shown(old)
    assert (view.user_request, view.recent) == (UNKNOWN, (UNKNOWN,))
    decided, changed = await b.decide(made.id, approve=False, by="t")
    assert changed and decided is not None and decided.state is State.DENIED


# -- `tether approvals list` against a running tether -----------------------------------------

POLICY = """
rules:
  - id: resizes-held
    match: {tool: resize_volume}
    action: hold
    timeout: 60s
    message: Resizing a volume needs a human
"""
TOOLS = [{"type": "function", "function": {"name": "resize_volume",
                                            "parameters": {"type": "object"}}}]


async def test_approvals_list_prints_the_context(make_stack: MakeStack,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", "cli-token")
    stack = await make_stack(policy=POLICY)
    stack.fake.push(Reply(content="Resizing vol-7 as asked.",
                          calls=(Call("resize_volume", '{"volume_id": "vol-7"}'),)))
    task = asyncio.create_task(stack.client().chat.completions.create(
        model="m", tools=TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "make vol-7 bigger \u202eplease"}]))
    for _ in range(500):
        if await stack.tether.holds.queue.pending():
            break
        await asyncio.sleep(0.02)
    args = argparse.Namespace(action="list", id=None, admin_url=stack.admin_url,
                              token_env="TETHER_ADMIN_TOKEN", format="text")
    assert await asyncio.to_thread(cmd_approvals, args) == 0
    out = capsys.readouterr().out
    assert "effect: write   API operation: none (no API operation is linked to this tool)" in out
    assert "rule: resizes-held: Resizing a volume needs a human" in out
    assert "  | make vol-7 bigger \\u202eplease" in out and "\u202e" not in out
    assert "  | Resizing vol-7 as asked." in out
    assert "time left: " in out
    assert "recently in this session:\n        (nothing earlier)" in out
    args.format = "json"
    assert await asyncio.to_thread(cmd_approvals, args) == 0
    [listed_one] = json.loads(capsys.readouterr().out)["pending"]
    assert listed_one["shown"]["user_request"] == "make vol-7 bigger \\u202eplease"
    assert listed_one["context"]["effect"] == "write"
    [pending] = await stack.tether.holds.queue.pending()
    await stack.tether.holds.queue.decide(pending.id, approve=False, by="t")
    await asyncio.wait_for(task, 10)


def test_visible_text_keeps_only_what_renders() -> None:
    assert visible_text("a\tb\u00a0c d", lines=True) == "a\\u0009b\\u00a0c d"
    assert visible_text(None) == UNKNOWN


# -- both planes: the linked operation on the LLM side, the cloud operation on egress -------

async def test_both_planes_show_the_operation_the_call_maps_to(
        start_linked: StartLinked, aws: None) -> None:  # noqa: F811 - the fixtures
    egr = await start_linked()
    egr.stack.fake.push(Reply(content="Deleting the temporary volume.",
                              calls=(Call("delete_volume", '{"volume_id": "vol-tmp"}'),)))
    client = AsyncOpenAI(base_url=egr.stack.base_url, api_key=KEY, max_retries=0)
    egr.stack.clients.append(client)
    asked = asyncio.create_task(client.chat.completions.create(model="m", messages=MESSAGES,
                                                               tools=LINKED_TOOLS))
    [llm] = await pending(egr.stack)
    view = llm["shown"]
    assert (view["agent"], view["effect"], view["api"]) == ("janitor", "write",
                                                             "aws.ec2.DeleteVolume")
    assert view["user_request"] == "clean up"
    assert view["model_text"] == "Deleting the temporary volume."
    assert view["rules"] == "writes-need-approval"
    assert view["message"].startswith("Writes are reviewed; approving it also lets one")
    await admin(egr.stack, "POST", f"/v1/approvals/{llm['id']}/approve", {"by": "alice"})
    await asyncio.wait_for(asked, 20)

    # A request no tool call asked for is held on the egress plane: its operation with
    # the cloud's prefix, as decisions name it; it has no conversation.
    attempt = asyncio.create_task(denied(egr, "vol-prod"))
    [api] = await pending(egr.stack)
    view = api["shown"]
    assert (api["tool"], view["api"], view["effect"]) == ("DeleteVolume", "aws.ec2.DeleteVolume",
                                                         "write")
    assert (view["user_request"], view["model_text"]) == (UNKNOWN, UNKNOWN)
    assert len(view["recent"]) == 1
    assert view["recent"][0].endswith("held delete_volume: approved by alice")
    assert 0 < int(view["time_left"].split()[0]) <= 30
    await admin(egr.stack, "POST", f"/v1/approvals/{api['id']}/deny", {"by": "bob"})
    await asyncio.wait_for(attempt, 20)


# -- with flow rules: the session's history, whole answers and streams ------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_recent_decisions_come_from_the_session_history_end_to_end(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", flows.TOKEN)
    stack = await make_stack(policy=flows.POLICY)
    await flows.read_page(stack, "s-ctx", stream)
    approval, _, _ = await flows.held_write(stack, "s-ctx", flows.after_read(), stream,
                                            approve=False)
    view = approval["shown"]
    [read] = view["recent"]
    assert read.endswith(f"allow web_fetch(url={flows.URL!r})")
    assert view["user_request"] == "triage issue 1"   # the tool result is not the user
    assert view["model_text"] == "Closing it."
    assert (view["effect"], view["rules"]) == ("write", "write-after-untrusted")
