"""Slack approvals: the message, the signed clicks, and the whole loop through a real tether.

End-to-end tests run the official openai SDK through tether against the fake
OpenAI, with tether posting to the fake Slack Web API, and send clicks built
and signed exactly as Slack does (form-encoded `payload=<json>`, v0 HMAC).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy.approvals.context import HoldContext
from proxy.approvals.queue import Approval, Mode, State
from proxy.approvals.slack.interactions import BadPayload, parse_click, verify_signature
from proxy.approvals.slack.messages import APPROVE, DENY, clip, decided_message, escape, pending_message
from proxy.demo.fake_slack import Failure, FakeSlack, SlackCall
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_openai import MESSAGES, ODD_ARGS, TOOLS, collect

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-fake-token"
ADMIN = "admin-token-for-tests"
CHANNEL = "C0APPROVALS"
ALICE, OWNER, MALLORY = "U0ALICE", "U0OWNER", "U0MALLORY"

POLICY = """
rules:
  - id: writes-held
    match: {tool: resize_volume}
    action: hold
    timeout: 20s
    message: Resizing needs a human
  - id: owners-only
    match: {tool: delete_volume}
    action: hold
    timeout: 20s
    approvers: [slack:U0OWNER]
  - id: quick-hold
    match: {tool: list_volumes}
    action: hold
    timeout: 300ms
"""


def sign(body: bytes, ts: str, secret: str = SECRET) -> str:
    return "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body,
                            hashlib.sha256).hexdigest()


def approval(**kw: Any) -> Approval:
    base: dict[str, Any] = dict(
        id="apv_0123456789abcdef", binding="b" * 64, mode=Mode.WAIT, tool="resize_volume",
        arguments='{"size":10}', session="s-1", agent="janitor", provider="openai",
        rules=("writes-held",), message="Resizing needs a human", policy_revision="rev1",
        approvers=(), created=1_700_000_000.0, expires=1_700_000_600.0)
    return Approval(**{**base, **kw})


def section_texts(message: dict[str, Any]) -> list[str]:
    return [b["text"]["text"] for b in message["blocks"]
            if b["type"] == "section" and "text" in b]


def code_block(text: str) -> str:
    return text.split("```\n", 1)[1].split("\n```", 1)[0]


def args_section(message: dict[str, Any]) -> str:
    [text] = [t for t in section_texts(message) if t.startswith("*Arguments*")]
    return text


# -- escaping ---------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "shown"), [
    ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
    ("a & b", "a &amp; b"),
    ("<!channel> <@U123> <https://evil|ok>", "&lt;!channel&gt; &lt;@U123&gt; &lt;https://evil|ok&gt;"),
    ("```", "\\u0060\\u0060\\u0060"),
    ("`x`", "\\u0060x\\u0060"),
    ("safe\u202eexe.txt", "safe\\u202eexe.txt"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),
    ("\u200e\u200f\u061c\ufeff", "\\u200e\\u200f\\u061c\\ufeff"),
    ("tab\tnew\nline\x00\x7f", "tab\\u0009new\\u000aline\\u0000\\u007f"),
    ("no\u00a0break\u3000ideo", "no\\u00a0break\\u3000ideo"),
    ("tag\U000e0041\U000e007f", "tag\\U000e0041\\U000e007f"),
    ("vs\ufe0f\U000e0100", "vs\\ufe0f\\U000e0100"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ("Zürich 漢字 é ✓ 🚀 *bold* _it_", "Zürich 漢字 é ✓ 🚀 *bold* _it_"),
    ("a b", "a b"),
])
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


@given(st.text())
def test_escaped_text_cannot_break_out_or_hide(text: str) -> None:
    out = escape(text)
    assert not set(out) & set("<>`")
    assert all(unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in out)
    assert out.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "").count("&") == 0
    message = pending_message(approval(arguments=text))
    assert args_section(message).count("```") == 2


def test_clip_counts_what_it_cut_and_never_splits_an_escape() -> None:
    assert clip("abc", 10) == ("abc", 0)
    assert clip("abcdef", 3) == ("abc", 3)
    assert clip("<" * 100, 10) == ("&lt;&lt;", 98)
    assert clip("a\u202eb", 5) == ("a", 2)
    assert clip("a\u202eb", 7) == ("a\\u202e", 1)


# -- the message ------------------------------------------------------------------------

def test_pending_message_has_the_buttons_and_the_facts() -> None:
    message = pending_message(approval(session="s<1>", agent="ja`nitor"))
    [actions] = [b for b in message["blocks"] if b["type"] == "actions"]
    approve, deny = actions["elements"]
    assert (approve["action_id"], approve["value"], approve["style"]) == (
        APPROVE, "apv_0123456789abcdef", "primary")
    assert approve["confirm"]["confirm"]["text"] == "Approve"
    assert (deny["action_id"], deny["value"], deny["style"]) == (
        DENY, "apv_0123456789abcdef", "danger")
    assert "confirm" not in deny
    assert message["blocks"][0]["text"]["text"] == "Approval needed: resize_volume"
    fields = " ".join(f["text"] for b in message["blocks"] for f in b.get("fields", []))
    assert "`resize_volume`" in fields and "`s&lt;1&gt;`" in fields
    assert "`ja\\u0060nitor`" in fields and "`writes-held`" in fields
    assert "Resizing needs a human" in " ".join(section_texts(message))
    assert args_section(message).endswith('```\n{"size":10}\n```')
    context = message["blocks"][-2]["elements"][0]["text"]
    assert "apv_0123456789abcdef" in context
    assert "<!date^1700000600^" in context and "2023-11-14 22:23:20 UTC" in context


HOSTILE = ("<script>alert(1)</script> <!channel> <@U0MALLORY> *bold* ```\n`tick` & "
           "report\u202egnp.exe a\u200bb \u2066iso\u2069 tag\U000e0041")


def context_section(message: dict[str, Any], title: str) -> str:
    [text] = [t for t in section_texts(message) if t.startswith(f"*{title}*")]
    return text


def test_the_context_is_shown_escaped_and_bounded() -> None:
    context = HoldContext(effect="write", api="aws.ec2.DeleteVolume",
                          user_request=HOSTILE + " " + "A" * 5000, model_text=HOSTILE,
                          recent=("13:00:00 allow list_volumes <!here>",))
    message = pending_message(approval(context=context, expires=time.time() + 125))
    fields = " ".join(f["text"] for b in message["blocks"] for f in b.get("fields", []))
    assert "*Effect*\n`write`" in fields and "*API operation*\n`aws.ec2.DeleteVolume`" in fields
    assert re.search(r"\*Time left\*\n2 min [0-5] s", fields)
    escaped = ("&lt;script&gt;alert(1)&lt;/script&gt; &lt;!channel&gt; &lt;@U0MALLORY&gt; "
               "*bold* \\u0060\\u0060\\u0060\n\\u0060tick\\u0060 &amp; report\\u202egnp.exe "
               "a\\u200bb \\u2066iso\\u2069 tag\\U000e0041")
    request = context_section(message, "The user's request")
    assert code_block(request).startswith(escaped + " AAA")
    assert request.count("```") == 2 and len(request) < 1400
    assert request.endswith("characters not shown)_")
    assert code_block(context_section(message, "The model's text before the call")) == escaped
    recent = context_section(message, "Recently in this session")
    assert recent == "*Recently in this session*\n• 13:00:00 allow list_volumes &lt;!here&gt;"
    raw = json.dumps(message, ensure_ascii=False)
    for hidden in ("\u202e", "\u200b", "\u2066", "\U000e0041"):
        assert hidden not in raw
    assert "<script>" not in raw and "<!channel>" not in raw and "<@U0MALLORY>" not in raw
    assert all(len(t) <= 3000 for t in section_texts(message))
    old = pending_message(approval())   # a record from before holds had a context
    assert code_block(context_section(old, "The user's request")) == "unknown"
    assert context_section(old, "Recently in this session").endswith("• unknown")


def test_long_arguments_are_cut_and_the_cut_is_counted() -> None:
    arguments = json.dumps({"blob": "x" * 10_000})
    text = args_section(pending_message(approval(arguments=arguments)))
    assert len(text) < 3000
    shown = code_block(text)
    assert len(shown) == 2500
    cut = len(arguments) - len(shown)
    assert f"_({cut} of {len(arguments)} characters not shown)_" in text


@pytest.mark.parametrize(("state", "by", "user", "reason", "expect"), [
    (State.APPROVED, "slack:U0ALICE (alice)", ALICE, "clicked Approve in Slack",
     ":white_check_mark: *Approved* by <@U0ALICE> at <!date^"),
    (State.APPROVED, "slack:U0ALICE", None, None,        # a REST caller using a Slack-like name
     ":white_check_mark: *Approved* by `slack:U0ALICE` at <!date^"),
    (State.DENIED, "oncall<x>", None, "not today & never",
     ":no_entry: *Denied* by `oncall&lt;x&gt;` at <!date^"),
    (State.EXPIRED, "timeout", None, None, ":hourglass: *Expired*: no one decided within 10 min"),
])
def test_decided_message_shows_the_outcome_without_buttons(
        state: State, by: str, user: str | None, reason: str | None, expect: str) -> None:
    message = decided_message(approval(state=state, decided_by=by, reason=reason,
                                       decided_at=1_700_000_100.0), user)
    assert all(b["type"] != "actions" for b in message["blocks"])
    assert message["blocks"][0]["text"]["text"] == f"{state.value.capitalize()}: resize_volume"
    outcome = section_texts(message)[-1]
    assert outcome.startswith(expect)
    if reason and state is State.DENIED:
        assert outcome.endswith(": not today &amp; never")


# -- the signature and the payload ------------------------------------------------------

NOW = 1_700_000_000
BODY = b"payload=%7B%22type%22%3A%22block_actions%22%7D"


@pytest.mark.parametrize(("secret", "ts", "signature", "body", "problem"), [
    (SECRET, str(NOW), sign(BODY, str(NOW)), BODY, None),
    (SECRET, str(NOW - 300), sign(BODY, str(NOW - 300)), BODY, None),
    ("other-secret", str(NOW), sign(BODY, str(NOW)), BODY, "does not match"),
    (SECRET, str(NOW), sign(BODY, str(NOW)), BODY + b"x", "does not match"),
    (SECRET, str(NOW), sign(BODY, str(NOW - 1)), BODY, "does not match"),
    (SECRET, str(NOW), sign(BODY, str(NOW)).upper(), BODY, "does not match"),
    (SECRET, str(NOW), sign(BODY, str(NOW))[3:], BODY, "does not match"),
    (SECRET, str(NOW), "v0=zz\u00e9", BODY, "does not match"),
    (SECRET, str(NOW - 301), sign(BODY, str(NOW - 301)), BODY, "5 minutes"),
    (SECRET, str(NOW + 301), sign(BODY, str(NOW + 301)), BODY, "5 minutes"),
    (SECRET, None, sign(BODY, str(NOW)), BODY, "required"),
    (SECRET, str(NOW), None, BODY, "required"),
    (SECRET, "", "", BODY, "required"),
    (SECRET, f" {NOW}", sign(BODY, f" {NOW}"), BODY, "not a Unix time"),
    (SECRET, "1.7e9", sign(BODY, "1.7e9"), BODY, "not a Unix time"),
    (SECRET, "-5", sign(BODY, "-5"), BODY, "not a Unix time"),
    (SECRET, "١٧٠٠٠٠٠٠٠٠", sign(BODY, "١٧٠٠٠٠٠٠٠٠"), BODY, "not a Unix time"),
])
def test_verify_signature(secret: str, ts: str | None, signature: str | None, body: bytes,
                          problem: str | None) -> None:
    result = verify_signature(secret, ts, signature, body, NOW)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def form(payload: object) -> bytes:
    return urlencode({"payload": json.dumps(payload)}).encode()


def click_payload(action_id: str = APPROVE, user: object = None, value: object = "apv_1") -> dict[
        str, Any]:
    return {"type": "block_actions", "user": user or {"id": ALICE, "username": "alice"},
            "channel": {"id": CHANNEL}, "actions": [{"action_id": action_id, "value": value}]}


def test_parse_click() -> None:
    click = parse_click(form(click_payload()))
    assert click is not None
    assert (click.user_id, click.approve, click.approval_id, click.channel) == (
        ALICE, True, "apv_1", CHANNEL)
    assert click.by == "slack:U0ALICE (alice)"
    deny = parse_click(form(click_payload(DENY, {"id": OWNER})))
    assert deny is not None and not deny.approve and deny.by == "slack:U0OWNER"
    odd = parse_click(form(click_payload(user={"id": ALICE, "username": "al\u202eice"})))
    assert odd is not None and odd.by == "slack:U0ALICE (al\\u202eice)"


@pytest.mark.parametrize("payload", [
    {"type": "view_submission", "actions": [{"action_id": APPROVE, "value": "apv_1"}]},
    {"type": "block_actions", "actions": []},
    {"type": "block_actions", "actions": [{"action_id": "other", "value": "apv_1"}]},
])
def test_other_interactions_are_ignored(payload: dict[str, Any]) -> None:
    assert parse_click(form(payload)) is None


@pytest.mark.parametrize("body", [
    b"", b"payload", b"payload=not-json", b"payload=%5B%5D", b"payload=%FF%FE",
    form(click_payload()) + b"&" + form(click_payload()),
    form(click_payload(user={"id": "u0alice"})), form(click_payload(user={"id": "U0 A"})),
    form(click_payload(user={"username": "alice"})), form(click_payload(value=7)),
    form(click_payload(value="")),
])
def test_malformed_payloads_are_refused(body: bytes) -> None:
    with pytest.raises(BadPayload):
        parse_click(body)


# -- end to end -------------------------------------------------------------------------

@pytest.fixture
async def slack() -> AsyncIterator[tuple[FakeSlack, str]]:
    fake = FakeSlack(token=BOT_TOKEN)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}/api"
    await runner.cleanup()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_TEST_SLACK_BOT", BOT_TOKEN)
    monkeypatch.setenv("TETHER_TEST_SLACK_SECRET", SECRET)
    monkeypatch.setenv("TETHER_TEST_ADMIN", ADMIN)


class Loop:
    """A tether with Slack approvals, its fake Slack, and helpers to act like people."""

    def __init__(self, stack: Stack, fake: FakeSlack) -> None:
        self.stack, self.fake = stack, fake

    def hold(self, tool: str = "resize_volume", args: str = ODD_ARGS, stream: bool = False
             ) -> asyncio.Task[tuple[str, dict[int, tuple[str, str, str]]]]:
        """The agent's request, running until the hold ends."""
        self.stack.fake.push(Reply(content="On it.", calls=(Call(tool, args),)))
        client = self.stack.client()

        async def run() -> tuple[str, dict[int, tuple[str, str, str]]]:
            if stream:
                s = await client.chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                         tools=TOOLS, stream=True)
                text, calls, _ = await collect(s)
                return text, calls
            r = await client.chat.completions.create(model="gpt-x", messages=MESSAGES,
                                                     tools=TOOLS)
            message = r.choices[0].message
            return message.content or "", {i: (c.id, c.function.name, c.function.arguments)
                                           for i, c in enumerate(message.tool_calls or [])
                                           if c.type == "function"}

        return asyncio.create_task(run())

    async def posted(self, n: int = 1) -> tuple[SlackCall, str, str]:
        """The n-th message posted, and its channel and ts."""
        call = (await self.fake.wait_for("chat.postMessage", n))[n - 1]
        channel, ts = list(self.fake.messages)[n - 1]
        return call, channel, ts

    async def send(self, body: bytes, ts: str | None = None, signature: str | None = None,
                   **headers: str) -> tuple[int, dict[str, Any]]:
        ts = str(int(time.time())) if ts is None else ts
        sent = {"Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": sign(body, ts) if signature is None else signature,
                **headers}
        async with aiohttp.ClientSession() as http, http.post(
                self.stack.admin_url + "/slack/interactions", data=body, headers=sent) as resp:
            return resp.status, await resp.json()

    async def click(self, action: str, user: str, n: int = 1, **headers: str
                    ) -> tuple[int, dict[str, Any]]:
        _, channel, ts = await self.posted(n)
        return await self.send(self.fake.click_body(channel, ts, action, user=user,
                                                    username=user[2:].lower()), **headers)

    async def pending(self) -> list[Approval]:
        return await self.stack.tether.holds.queue.pending()

    def approval_events(self) -> list[tuple[str, str | None]]:
        return [(r["event"], r.get("decided_by")) for r in self.stack.audit()
                if r["kind"] == "approval"]

    async def updated(self, n: int = 1) -> dict[str, Any]:
        call = (await self.fake.wait_for("chat.update", n))[n - 1]
        return call.body


@pytest.fixture
async def loop(env: None, slack: tuple[FakeSlack, str], make_stack: MakeStack) -> Loop:
    # In this order, tether stops first: its last message updates still find Slack and the token.
    fake, api_url = slack
    stack = await make_stack(policy=POLICY, extra=(
        f"admin: {{token_env: TETHER_TEST_ADMIN}}\n"
        f"slack:\n  channel: {CHANNEL}\n  approvers: [{ALICE}, {OWNER}]\n"
        f"  bot_token_env: TETHER_TEST_SLACK_BOT\n"
        f"  signing_secret_env: TETHER_TEST_SLACK_SECRET\n  api_url: {api_url}\n"))
    return Loop(stack, fake)


NASTY = json.dumps({
    "volume": "vol-1<script>alert(1)</script>",
    "note": "```\n*Approve me* <!channel> `inline`",
    "file": "report\u202etxt.exe",
    "who": "ad\u200bmin",
    "zz_blob": "A" * 5000,
}, ensure_ascii=False)


async def test_posted_message_shows_the_exact_call_escaped(loop: Loop) -> None:
    agent = loop.hold(args=NASTY)
    post, _, _ = await loop.posted()
    assert post.authorization == f"Bearer {BOT_TOKEN}"
    assert post.content_type == "application/json; charset=utf-8"
    assert post.body["channel"] == CHANNEL
    [pending] = await loop.pending()
    [actions] = [b for b in post.body["blocks"] if b["type"] == "actions"]
    assert [(e["action_id"], e["value"], e.get("style")) for e in actions["elements"]] == [
        (APPROVE, pending.id, "primary"), (DENY, pending.id, "danger")]
    text = args_section(post.body)
    assert "vol-1&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\\u0060\\u0060\\u0060\\n*Approve me* &lt;!channel&gt; \\u0060inline\\u0060" in text
    assert "report\\u202etxt.exe" in text and "ad\\u200bmin" in text
    assert "<script>" not in text and "<!channel>" not in text
    assert "\u202e" not in json.dumps(post.body, ensure_ascii=False)
    assert "\u200b" not in json.dumps(post.body, ensure_ascii=False)
    assert text.count("```") == 2
    canonical = pending.arguments
    shown = code_block(text)
    assert shown.startswith(escape(canonical)[:100])
    assert 2000 < len(shown) <= 2500
    cut = text.rsplit("_(", 1)[1]
    assert cut.endswith(f"of {len(canonical)} characters not shown)_")
    assert int(cut.split()[0]) > 2500
    status, reply = await loop.click(DENY, ALICE)
    assert status == 200 and reply["text"].startswith("Denied")
    content, calls = await agent
    assert calls == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_approve_click_releases_the_original_call(loop: Loop, stream: bool) -> None:
    agent = loop.hold(stream=stream)
    await loop.posted()
    assert not agent.done()
    status, reply = await loop.click(APPROVE, ALICE)
    assert status == 200
    assert reply["response_type"] == "ephemeral" and reply["text"].startswith("Approved")
    content, calls = await asyncio.wait_for(agent, 10)
    assert content == "On it."
    assert [(name, args) for _, name, args in calls.values()] == [("resize_volume", ODD_ARGS)]
    [record] = loop.stack.decisions()
    assert (record["action"], record["rules"]) == ("hold", ["writes-held"])
    assert loop.approval_events() == [("created", None), ("approved", "slack:U0ALICE (alice)")]
    update = await loop.updated()
    _, channel, ts = await loop.posted()
    assert (update["channel"], update["ts"]) == (channel, ts)
    assert all(b["type"] != "actions" for b in update["blocks"])
    assert section_texts(update)[-1].startswith(":white_check_mark: *Approved* by <@U0ALICE>")
    assert loop.fake.messages[(channel, ts)]["blocks"] == update["blocks"]


async def test_deny_click_explains_to_the_agent(loop: Loop) -> None:
    agent = loop.hold()
    status, reply = await loop.click(DENY, OWNER)
    assert status == 200 and reply["text"].startswith("Denied")
    content, calls = await asyncio.wait_for(agent, 10)
    assert calls == {}
    assert "'resize_volume' was denied by writes-held" in content
    assert "denied by slack:U0OWNER (owner)" in content and "clicked Deny in Slack" in content
    update = await loop.updated()
    assert section_texts(update)[-1].startswith(":no_entry: *Denied* by <@U0OWNER> at ")
    assert section_texts(update)[-1].endswith(": clicked Deny in Slack")


async def test_bad_signatures_and_stale_timestamps_change_nothing(loop: Loop) -> None:
    agent = loop.hold()
    _, channel, ts = await loop.posted()
    body = loop.fake.click_body(channel, ts, APPROVE, user=ALICE)
    now = int(time.time())
    other = loop.fake.click_body(channel, ts, DENY, user=ALICE)
    attempts = [
        {"signature": sign(body, str(now), "not-the-secret")},
        {"signature": sign(other, str(now))},                     # signature of another body
        {"ts": str(now - 301), "signature": sign(body, str(now - 301))},
        {"ts": str(now + 301), "signature": sign(body, str(now + 301))},
        {"ts": "yesterday", "signature": sign(body, "yesterday")},
        {"signature": ""},
    ]
    for attempt in attempts:
        status, reply = await loop.send(body, **attempt)
        assert status == 401, attempt
        assert "X-Slack" in reply["error"]["message"]
    async with aiohttp.ClientSession() as http, http.post(
            loop.stack.admin_url + "/slack/interactions", data=body) as resp:
        assert resp.status == 401
    assert len(await loop.pending()) == 1 and not agent.done()
    assert loop.approval_events() == [("created", None)]
    assert loop.fake.of("chat.update") == []
    # The same click, correctly signed, still works.
    status, _ = await loop.send(body)
    assert status == 200
    _, calls = await asyncio.wait_for(agent, 10)
    assert [c[1] for c in calls.values()] == ["resize_volume"]


async def test_replayed_and_double_clicks_have_no_second_effect(loop: Loop) -> None:
    agent = loop.hold()
    _, channel, ts = await loop.posted()
    body = loop.fake.click_body(channel, ts, APPROVE, user=ALICE, username="alice")
    stamp = str(int(time.time()))
    first, second = await asyncio.gather(loop.send(body, stamp), loop.send(body, stamp))
    assert sorted(r["text"].split()[0] for _, r in (first, second)) == ["Approval", "Approved:"]
    status, reply = await loop.send(body, stamp, **{"X-Slack-Retry-Num": "1",
                                                   "X-Slack-Retry-Reason": "http_timeout"})
    assert status == 200 and "already approved (by slack:U0ALICE (alice))" in reply["text"]
    status, reply = await loop.click(DENY, OWNER)
    assert status == 200 and "already approved" in reply["text"]
    _, calls = await asyncio.wait_for(agent, 10)
    assert len(calls) == 1
    await loop.updated()
    await asyncio.sleep(0.2)
    assert len(loop.fake.of("chat.update")) == 1
    assert loop.approval_events() == [("created", None), ("approved", "slack:U0ALICE (alice)")]


async def test_unlisted_user_cannot_approve(loop: Loop) -> None:
    agent = loop.hold()
    status, reply = await loop.click(APPROVE, MALLORY)
    assert status == 200 and reply["response_type"] == "ephemeral"
    assert reply["text"].startswith("You may not approve this call")
    assert "not in slack.approvers" in reply["text"]
    [note] = await loop.fake.wait_for("chat.postEphemeral")
    assert (note.body["channel"], note.body["user"]) == (CHANNEL, MALLORY)
    status, reply = await loop.click(DENY, MALLORY)
    assert reply["text"].startswith("You may not deny this call")
    assert len(await loop.pending()) == 1 and not agent.done()
    refused = [r for r in loop.stack.audit() if r.get("event") == "refused"]
    assert [(r["attempted_by"], r["attempted"], r["state"]) for r in refused] == [
        ("slack:U0MALLORY (mallory)", "approve", "pending"),
        ("slack:U0MALLORY (mallory)", "deny", "pending")]
    assert loop.fake.of("chat.update") == []
    await loop.click(DENY, ALICE)
    content, calls = await asyncio.wait_for(agent, 10)
    assert calls == {} and "denied by slack:U0ALICE" in content


async def test_rule_approvers_narrow_who_may_approve(loop: Loop) -> None:
    args = '{"volume_id": "vol-1"}'
    agent = loop.hold("delete_volume", args)
    status, reply = await loop.click(APPROVE, ALICE)
    assert status == 200 and "the rule that held it names other approvers" in reply["text"]
    assert len(await loop.pending()) == 1
    status, reply = await loop.click(APPROVE, OWNER)
    assert reply["text"].startswith("Approved")
    _, calls = await asyncio.wait_for(agent, 10)
    assert [(c[1], c[2]) for c in calls.values()] == [("delete_volume", args)]


async def test_decision_elsewhere_and_timeout_update_the_message(loop: Loop) -> None:
    agent = loop.hold()
    await loop.posted()
    [pending] = await loop.pending()
    async with aiohttp.ClientSession() as http, http.post(
            f"{loop.stack.admin_url}/v1/approvals/{pending.id}/approve",
            json={"by": "oncall", "reason": "ticket OPS-1"},
            headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 200
    await asyncio.wait_for(agent, 10)
    update = await loop.updated()
    assert section_texts(update)[-1].startswith(":white_check_mark: *Approved* by `oncall` at ")
    assert section_texts(update)[-1].endswith(": ticket OPS-1")
    # A click that arrives after the REST decision changes nothing.
    status, reply = await loop.click(DENY, ALICE)
    assert "already approved (by oncall)" in reply["text"]

    quick = loop.hold("list_volumes", "{}")
    content, calls = await asyncio.wait_for(quick, 10)
    assert calls == {} and "no one approved it within" in content
    update = await loop.updated(2)
    _, channel, ts = await loop.posted(2)
    assert (update["channel"], update["ts"]) == (channel, ts)
    assert section_texts(update)[-1].startswith(":hourglass: *Expired*")
    assert all(b["type"] != "actions" for b in update["blocks"])


async def test_a_failed_post_approves_nothing(loop: Loop) -> None:
    loop.fake.fail("chat.postMessage", Failure("channel_not_found"))
    content, calls = await asyncio.wait_for(loop.hold("list_volumes", "{}"), 10)
    assert calls == {} and "no one approved it within" in content
    assert [e for e, _ in loop.approval_events()] == ["created", "slack_post_failed", "expired"]
    assert loop.fake.of("chat.update") == []
    async with aiohttp.ClientSession() as http, http.get(loop.stack.admin_url + "/metrics") as r:
        metrics = await r.text()
    assert ('tether_slack_api_calls_total{method="chat.postMessage",outcome="error"} 1.0'
            in metrics)


async def test_missing_bot_token_approves_nothing(loop: Loop,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_TEST_SLACK_BOT")
    content, calls = await asyncio.wait_for(loop.hold("list_volumes", "{}"), 10)
    assert calls == {} and "no one approved it within" in content
    [failed] = [r for r in loop.stack.audit() if r.get("event") == "slack_post_failed"]
    assert "TETHER_TEST_SLACK_BOT is not set" in failed["error"]
    assert loop.fake.calls == []


async def test_rate_limited_post_is_retried(loop: Loop) -> None:
    loop.fake.fail("chat.postMessage", Failure("ratelimited", status=429, retry_after=0))
    agent = loop.hold()
    posts = await loop.fake.wait_for("chat.postMessage", 2)
    assert posts[0].body == posts[1].body
    status, _ = await loop.click(APPROVE, ALICE)
    assert status == 200
    _, calls = await asyncio.wait_for(agent, 10)
    assert len(calls) == 1


async def test_no_signing_secret_fails_closed(loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = loop.hold()
    await loop.posted()
    monkeypatch.delenv("TETHER_TEST_SLACK_SECRET")
    status, reply = await loop.click(APPROVE, ALICE)
    assert status == 503 and "TETHER_TEST_SLACK_SECRET" in reply["error"]["message"]
    assert len(await loop.pending()) == 1 and not agent.done()
    assert loop.approval_events() == [("created", None)]
    # The secret is read when a click arrives: setting it turns the endpoint on.
    monkeypatch.setenv("TETHER_TEST_SLACK_SECRET", SECRET)
    status, _ = await loop.click(APPROVE, ALICE)
    assert status == 200
    _, calls = await asyncio.wait_for(agent, 10)
    assert len(calls) == 1


async def test_only_the_slack_route_skips_the_admin_token(loop: Loop) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/slack/interactions"), ("POST", "/slack/interactions/"),
                             ("POST", "/slack/other"), ("GET", "/v1/approvals")):
            async with http.request(method, loop.stack.admin_url + path) as resp:
                assert resp.status == 401, path
                assert "admin bearer token" in (await resp.json())["error"]["message"]
        async with http.post(loop.stack.admin_url + "/slack/interactions", data=b"x") as resp:
            assert resp.status == 401
            assert "X-Slack" in (await resp.json())["error"]["message"]


async def test_other_interactions_are_acknowledged_and_ignored(loop: Loop) -> None:
    status, reply = await loop.send(form({"type": "view_closed", "view": {}}))
    assert (status, reply) == (200, {})
    status, reply = await loop.send(b"payload=nope")
    assert status == 400
    status, reply = await loop.send(form(click_payload(value="apv_unknown")))
    assert status == 200 and "not known to this tether" in reply["text"]
    # Someone not allowed to decide does not even learn whether an approval exists.
    status, reply = await loop.send(form(click_payload(user={"id": MALLORY},
                                                       value="apv_unknown")))
    assert status == 200 and "not in slack.approvers" in reply["text"]
    assert loop.fake.of("chat.postMessage") == [] and loop.fake.of("chat.update") == []


def test_secrets_in_arguments_never_reach_slack() -> None:
    from proxy.approvals.slack.messages import shown_arguments

    shown = shown_arguments('{"user":"ops","password":"hunter2",'
                            '"aws_secret_access_key":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}')
    assert "hunter2" not in shown and "wJalrXUtnFEMI" not in shown
    assert '"user":"ops"' in shown and "[REDACTED]" in shown


async def test_the_posted_message_carries_the_context_escaped(loop: Loop) -> None:
    """Through a running tether: the user's request and the model's text reach Slack
    masked, bounded and escaped, beside the effect, the rule and the time left."""
    loop.stack.fake.push(Reply(content="Resizing <!here> now \u202e.", calls=(
        Call("resize_volume", '{"volume_id": "vol-1"}'),)))
    request = HOSTILE + " token=hunter2secret " + "B" * 100_000
    agent = asyncio.create_task(loop.stack.client().chat.completions.create(
        model="gpt-x", tools=TOOLS, messages=[{"role": "user", "content": request}]))
    post, _, _ = await loop.posted()
    said = context_section(post.body, "The user's request")
    assert code_block(said).startswith("&lt;script&gt;alert(1)&lt;/script&gt; &lt;!channel&gt;")
    assert "report\\u202egnp.exe" in said and "hunter2secret" not in said
    assert said.count("```") == 2 and len(said) < 1400
    model = context_section(post.body, "The model's text before the call")
    assert code_block(model) == "Resizing &lt;!here&gt; now \\u202e."
    fields = " ".join(f["text"] for b in post.body["blocks"] for f in b.get("fields", []))
    assert "*Effect*\n`write`" in fields and "*Rules*\n`writes-held`" in fields
    assert re.search(r"\*Time left\*\n(19|20) s", fields)
    raw = json.dumps(post.body, ensure_ascii=False)
    assert "\u202e" not in raw and "<!channel>" not in raw and "<!here>" not in raw
    status, _ = await loop.click(DENY, ALICE)
    assert status == 200
    result = await asyncio.wait_for(agent, 10)
    assert result.choices[0].message.tool_calls is None
