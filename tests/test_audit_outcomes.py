"""Every call's final outcome is in the audit log, and `tether audit calls` prints it.

Through a running tether with the official SDKs: calls allowed and denied at once,
holds approved, denied, expired, refused by the pending limit, answered as tickets,
abandoned by their caller or by a stopping tether, each joined to its decision
record by `decision_id`; the hash chain still verifies over the result.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy.audit import AuditWriteError
from proxy.audit.calls import join, render_text
from proxy.demo.fake_anthropic import FakeAnthropic
from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_approvals import TOKEN, admin, pending
from tests.test_e2e_openai import MESSAGES

ROOT = Path(__file__).resolve().parent.parent
POLICY = """
tools:
  get_weather: {effect: read}
rules:
  - id: no-prod-deletes
    match: {tool: delete_volume, args: {tags.env: {equals: production}}}
    action: deny
    message: Deleting production resources is not allowed
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 30s
  - id: scale-quickly
    match: {tool: scale_cluster}
    action: hold
    timeout: 200ms
  - id: snapshot-tickets
    match: {tool: snapshot_volume}
    action: hold
    mode: ticket
    timeout: 30s
approvals: {keepalive: 100ms, max_pending_per_session: 2}
"""
TOOLS: list[openai.types.chat.ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume", "resize_volume", "scale_cluster",
              "snapshot_volume")]
PROD_DELETE = Call("delete_volume", '{"volume_id": "vol-9", "tags": {"env": "production"}}')


def resize(volume: str) -> Call:
    return Call("resize_volume", json.dumps({"volume_id": volume, "size_gb": 50}))


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)


async def decide(stack: Stack, approval: dict[str, Any], verb: str, by: str,
                 reason: str | None = None) -> None:
    status, _ = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/{verb}",
                            {"by": by, **({"reason": reason} if reason else {})})
    assert status == 200


def ended(stack: Stack) -> dict[str, dict[str, Any]]:
    """The `hold` records by decision id (each decision has at most one)."""
    holds = [r for r in stack.audit() if r["kind"] == "hold"]
    by_id = {r["decision_id"]: r for r in holds}
    assert len(by_id) == len(holds), "a held call ended twice"
    return by_id


async def wait_ended(stack: Stack, count: int) -> dict[str, dict[str, Any]]:
    for _ in range(250):
        found = ended(stack)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} hold records never appeared")


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
        cwd=ROOT, timeout=60)


def columns(text: str) -> list[list[str]]:
    """The table's rows split into its eight columns (no cell holds a space here)."""
    lines = text.splitlines()
    assert lines[0].split() == ["TIME", "SESSION", "AGENT", "TOOL", "ACTION", "OUTCOME",
                                "RULES", "BY"]
    return [line.split() for line in lines[1:]]


async def test_every_call_ends_in_the_log_and_the_cli_joins_it(make_stack: MakeStack) -> None:
    fake_anthropic = FakeAnthropic()
    stack = await make_stack(policy=POLICY, upstreams={"anthropic": fake_anthropic})
    client = stack.client(default_headers={"X-Tether-Session": "ops", "X-Tether-Agent": "janitor"})

    async def ask(*calls: Call) -> str:
        stack.fake.push(Reply(calls=calls))
        r = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        released = [c.function.name for c in r.choices[0].message.tool_calls or []
                    if c.type == "function"]
        return f"{r.choices[0].message.content or ''} released={released}"

    # Allowed and denied at once, in one answer.
    await ask(Call("get_weather", '{"city": "Oslo"}'), PROD_DELETE)
    # Held, then approved / denied over the admin API.
    for volume, verb, by, reason in (("vol-1", "approve", "alice", "planned"),
                                     ("vol-2", "deny", "carol", "not during the freeze")):
        task = asyncio.create_task(ask(resize(volume)))
        [approval] = await pending(stack)
        await decide(stack, approval, verb, by, reason)
        answer = await asyncio.wait_for(task, 10)
        assert ("released=['resize_volume']" in answer) is (verb == "approve")
    # Held until its timeout.
    assert "no one approved it" in await ask(Call("scale_cluster", '{"nodes": 9}'))
    # Two held calls fill the session's pending limit; the third is refused at once.
    waiting = [asyncio.create_task(ask(resize(v))) for v in ("vol-3", "vol-4")]
    two = await pending(stack, 2)
    refused = await ask(resize("vol-5"))
    assert "already has 2 pending approvals" in refused and "released=[]" in refused
    for approval in two:
        await decide(stack, approval, "deny", "dave")
    await asyncio.gather(*waiting)
    # A ticket: answered "not yet" at once, then redeemed once approved.
    snapshot = Call("snapshot_volume", '{"volume_id": "vol-1"}')
    first = await ask(snapshot)
    [ticket] = await pending(stack)
    assert ticket["id"] in first and "released=[]" in first
    await decide(stack, ticket, "approve", "frank")
    assert "released=['snapshot_volume']" in await ask(snapshot)
    # The Anthropic SDK, streamed: held and approved.
    fake_anthropic.push(Reply(calls=(resize("vol-6"),)))
    claude = anthropic.AsyncAnthropic(base_url=stack.proxy_url + "/anthropic", api_key="k",
                                      max_retries=0,
                                      default_headers={"X-Tether-Session": "ops"})
    try:
        async def stream() -> anthropic.types.Message:
            async with claude.messages.stream(
                    model="claude-test", max_tokens=100, messages=[{"role": "user",
                                                                   "content": "go"}],
                    tools=[{"name": "resize_volume", "input_schema": {"type": "object"}}]) as s:
                return await s.get_final_message()

        streamed = asyncio.create_task(stream())
        [approval] = await pending(stack)
        await decide(stack, approval, "approve", "gina")
        message = await asyncio.wait_for(streamed, 10)
    finally:
        await claude.close()
    assert [b.type for b in message.content] == ["tool_use"]

    # The raw records: every decision has an id; allow and deny say their outcome at once,
    # a hold does not, and exactly one later `hold` record ends each held call.
    records = stack.audit()
    assert {r["v"] for r in records} == {4}  # 4: `instance` (verify_merged.py)
    decisions = [r for r in records if r["kind"] == "decision"]
    holds = ended(stack)
    held = [d for d in decisions if d["action"] == "hold"]
    for d in decisions:
        assert d["decision_id"]
        assert ("outcome" in d) is (d["action"] != "hold")
    assert [d["outcome"] for d in decisions if d["action"] != "hold"] == ["allowed", "denied"]
    assert set(holds) == {d["decision_id"] for d in held}
    seq = {r["decision_id"]: r["seq"] for r in decisions}
    assert all(h["seq"] > seq[i] for i, h in holds.items())
    got = [(d["tool"], holds[d["decision_id"]]["outcome"], holds[d["decision_id"]]["by"],
            holds[d["decision_id"]]["mode"]) for d in held]
    assert got == [
        ("resize_volume", "approved", "alice", "wait"),
        ("resize_volume", "denied", "carol", "wait"),
        ("scale_cluster", "expired", "timeout", "wait"),
        ("resize_volume", "denied", "dave", "wait"),
        ("resize_volume", "denied", "dave", "wait"),
        ("resize_volume", "denied", "tether", "wait"),        # the pending limit
        ("snapshot_volume", "denied", "tether", "ticket"),    # "not yet": a ticket
        ("snapshot_volume", "approved", "frank", "ticket"),   # redeemed
        ("resize_volume", "approved", "gina", "wait"),        # the Anthropic SDK
    ]
    by_tool = [(d, holds[d["decision_id"]]) for d in held]
    _, denied = by_tool[1]
    assert denied["reason"] == "not during the freeze"
    assert denied["rules"] == ["resize-needs-approval"]
    _, limited = by_tool[5]
    assert limited["rules"] == ["resize-needs-approval", "tether:approval-limit"]
    assert limited["approval_id"] is None and "2 pending approvals" in limited["reason"]
    assert by_tool[5][0]["arguments"]["volume_id"] == "vol-5"
    # The refused call never became an approval anyone could click.
    created = [r for r in records if r["kind"] == "approval" and r["event"] == "created"]
    assert not any("vol-5" in r["arguments"] for r in created)
    _, not_yet = by_tool[6]
    _, redeemed = by_tool[7]
    assert not_yet["approval_id"] == redeemed["approval_id"] == ticket["id"]
    assert by_tool[8][1]["provider"] == "anthropic" and by_tool[8][1]["session"] == "ops"

    # The CLI: one line per call, in order, with its outcome, rules and who ended it.
    shown = await cli("audit", "calls", str(stack.audit_path))
    assert shown.returncode == 0, shown.stderr
    rows = columns(shown.stdout)
    assert [r[1:] for r in rows] == [
        ["ops", "janitor", "get_weather", "allow", "allowed", "-", "-"],
        ["ops", "janitor", "delete_volume", "deny", "denied", "no-prod-deletes", "-"],
        ["ops", "janitor", "resize_volume", "hold", "approved", "resize-needs-approval", "alice"],
        ["ops", "janitor", "resize_volume", "hold", "denied", "resize-needs-approval", "carol"],
        ["ops", "janitor", "scale_cluster", "hold", "expired", "scale-quickly", "timeout"],
        ["ops", "janitor", "resize_volume", "hold", "denied", "resize-needs-approval", "dave"],
        ["ops", "janitor", "resize_volume", "hold", "denied", "resize-needs-approval", "dave"],
        ["ops", "janitor", "resize_volume", "hold", "denied",
         "resize-needs-approval,tether:approval-limit", "tether"],
        ["ops", "janitor", "snapshot_volume", "hold", "denied", "snapshot-tickets", "tether"],
        ["ops", "janitor", "snapshot_volume", "hold", "approved", "snapshot-tickets", "frank"],
        ["ops", "-", "resize_volume", "hold", "approved", "resize-needs-approval", "gina"],
    ]
    assert [r[0] for r in rows] == [d["time"] for d in decisions]
    as_json = await cli("audit", "calls", "--json", str(stack.audit_path))
    assert as_json.returncode == 0, as_json.stderr
    calls = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [c["decision_id"] for c in calls] == [d["decision_id"] for d in decisions]
    assert calls[3]["reason"] == "not during the freeze"
    assert calls[9]["approval_id"] == ticket["id"] and calls[9]["mode"] == "ticket"
    assert all(c["ended"] for c in calls if c["action"] == "hold")
    verified = await cli("audit", "verify", str(stack.audit_path))
    assert verified.returncode == 0 and "the chain is intact" in verified.stdout


async def test_a_call_that_is_still_held_is_unresolved_not_allowed(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=POLICY)
    stack.fake.push(Reply(calls=(resize("vol-1"),)))
    task = asyncio.create_task(stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    [approval] = await pending(stack)
    [decision] = stack.decisions()
    assert decision["action"] == "hold" and "outcome" not in decision and not ended(stack)
    shown = await cli("audit", "calls", "--json", str(stack.audit_path))
    [line] = [json.loads(x) for x in shown.stdout.splitlines()]
    assert (line["action"], line["outcome"], line["by"]) == ("hold", "unresolved", None)
    await decide(stack, approval, "deny", "zed")
    await asyncio.wait_for(task, 10)
    shown = await cli("audit", "calls", "--json", str(stack.audit_path))
    [line] = [json.loads(x) for x in shown.stdout.splitlines()]
    assert (line["outcome"], line["by"]) == ("denied", "zed")


async def test_abandoned_when_the_agent_leaves_or_tether_stops(make_stack: MakeStack) -> None:
    stack = await make_stack(policy=POLICY)
    # The agent closes its stream while the call waits: nobody may approve it any more.
    stack.fake.push(Reply(content="Resizing.", calls=(resize("vol-1"),)))
    stream = await stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, stream=True)
    await stream.__anext__()
    [approval] = await pending(stack)
    await stream.close()
    [gone] = (await wait_ended(stack, 1)).values()
    assert (gone["outcome"], gone["by"], gone["approval_id"]) == ("abandoned", "tether",
                                                                   approval["id"])
    status, late = await admin(stack, "POST", f"/v1/approvals/{approval['id']}/approve",
                               {"by": "late"})
    assert status == 409 and late["approval"]["state"] == "abandoned"
    assert "the caller is gone" in late["error"]["message"]
    # tether stops while a call waits: it ends denied, and the log says it was abandoned.
    stack.fake.push(Reply(calls=(resize("vol-2"),)))
    task = asyncio.create_task(stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    await pending(stack)
    await stack.tether.close()
    r = await asyncio.wait_for(task, 10)
    assert r.choices[0].message.tool_calls is None
    found = await wait_ended(stack, 2)
    assert sorted((h["outcome"], h["by"]) for h in found.values()) == [
        ("abandoned", "tether"), ("abandoned", "tether")]
    shown = await cli("audit", "calls", str(stack.audit_path))
    assert [r[5] for r in columns(shown.stdout)] == ["abandoned", "abandoned"]


async def test_an_approval_that_cannot_be_recorded_is_not_released(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = await make_stack(policy=POLICY)
    audit = stack.tether.holds.audit
    write = audit.write

    def no_hold_records(record: dict[str, object]) -> None:
        if record.get("kind") == "hold":
            raise AuditWriteError("disk full")
        write(record)

    monkeypatch.setattr(audit, "write", no_hold_records)
    stack.fake.push(Reply(calls=(resize("vol-1"),)))
    task = asyncio.create_task(stack.client().chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS))
    [approval] = await pending(stack)
    await decide(stack, approval, "approve", "alice")
    r = await asyncio.wait_for(task, 10)
    assert r.choices[0].message.tool_calls is None
    assert "tether:audit-unavailable" in (r.choices[0].message.content or "")


async def test_hostile_names_cannot_drive_the_terminal(make_stack: MakeStack) -> None:
    """Session (the OpenAI `user` field) and tool names are the agent's and the model's
    text: the table escapes them and cuts them short; --json keeps them whole."""
    stack = await make_stack(policy=POLICY)
    session = "s\x1b[2J\x1b]0;pwned\x07\u202egnp.exe\nFORGED LINE" + "x" * 10_000
    tool = "rm\x1b[31m\u200b\r\x85tool"
    stack.fake.push(Reply(calls=(Call(tool, "{}"),)))
    await stack.client().chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                 user=session)
    # Read as bytes split at \n: str.splitlines would also split at the raw U+0085 in a line.
    [decision] = [r for r in map(json.loads, stack.audit_path.read_bytes().splitlines())
                  if r["kind"] == "decision"]
    assert decision["session"] == session and decision["tool"] == tool
    assert decision["outcome"] == "denied"  # an undeclared tool
    shown = await cli("audit", "calls", str(stack.audit_path))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2  # the newline in the session did not start a line of its own
    for bad in ("\x1b", "\x07", "\u202e", "\u200b", "\r", "\x85"):
        assert bad not in shown.stdout
    assert "s\\x1b[2J\\x1b]0;pwned…" in lines[1]  # escaped, cut, never mid-escape
    assert "rm\\x1b[31m\\u200b\\x0d\\x85tool" in lines[1]
    assert len(lines[1]) < 400
    as_json = await cli("audit", "calls", "--json", str(stack.audit_path))
    assert as_json.stdout.isascii()
    [line] = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert line["session"] == session and line["tool"] == tool


def test_logs_before_v3_and_holds_without_their_decision() -> None:
    """v2 records had no outcome: an allow or deny was final, a hold is unresolved. A hold
    record whose decision is in a file not given still shows."""
    records: list[tuple[str, dict[str, object]]] = [
        ("a:1", {"kind": "decision", "v": 2, "decision_id": "d1", "action": "allow",
                 "tool": "t", "rules": []}),
        ("a:2", {"kind": "decision", "v": 2, "decision_id": "d2", "action": "hold",
                 "tool": "t", "rules": ["r"]}),
        ("a:3", {"kind": "approval", "event": "approved", "id": "apv_1"}),
        ("a:4", {"kind": "hold", "v": 3, "decision_id": "d0", "outcome": "expired",
                 "by": "timeout", "tool": "u", "rules": ["r"]}),
    ]
    lines = join(records)
    assert [(x.decision_id, x.action, x.outcome) for x in lines] == [
        ("d1", "allow", "allowed"), ("d2", "hold", "unresolved"), ("d0", None, "expired")]
    assert "?" in render_text(lines).splitlines()[3].split()


async def test_bad_input_files_are_refused_clearly(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text('{"kind": "decision", "action": "allow"}\nnot json\n')
    shown = await cli("audit", "calls", str(log))
    assert shown.returncode == 1 and f"{log}:2: not a JSON record" in shown.stderr
    missing = await cli("audit", "calls", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    log.write_text('{"kind": "decision", "action": "deny", "decision_id": "d"}\n{"kind": "dec')
    shown = await cli("audit", "calls", str(log))  # a last line still being written: skipped
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 2
