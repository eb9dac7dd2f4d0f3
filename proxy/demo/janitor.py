"""`tether demo`: the autonomous cloud janitor, replayed offline through a real tether.

A fake LLM plays the janitor: it lists volumes, decides that everything tagged
`temporary` *or* `production-candidate` is disposable (the mistake of the real
incident), deletes them in one answer with two parallel calls, then checks one
volume again and again. Every request goes through a real tether on loopback
with the janitor policy and a session budget that allows no repeated call; the
agent runs only the calls tether lets through, against a fake cloud API. A
scripted operator confirms held deletes through the admin API, as a person
would in Slack or on the approvals page. The table printed at the end is read
back from the audit log.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from .. import config as config_mod
from ..providers.sse import SSEDecoder
from ..server.app import bound_port, build, start
from .fake_cloud import FakeCloud
from .fake_openai import Call, FakeOpenAI, Reply, Turn

TOKEN_ENV = "TETHER_DEMO_ADMIN_TOKEN"
SYSTEM = "You are a cloud janitor. Delete volumes that are temporary. Use the tools."
TOOLS = [
    {"type": "function", "function": {
        "name": "list_volumes", "description": "List all volumes",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "describe_volume", "description": "Describe one volume",
        "parameters": {"type": "object", "properties": {"volume_id": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "delete_volume", "description": "Delete a volume",
        "parameters": {"type": "object", "properties": {
            "volume_id": {"type": "string"}, "tags": {"type": "object"}}}}},
]


def janitor_script(body: dict[str, Any]) -> Turn:
    """The fake LLM's side of the story, as a function of the conversation so far."""
    messages = body.get("messages", [])
    turns = sum(1 for m in messages if m.get("role") == "assistant")
    results = [m for m in messages if m.get("role") == "tool"]
    if turns == 0:
        return Reply(content="I'll start by listing the volumes.", calls=(Call("list_volumes", "{}"),))
    if turns == 1:
        listing = json.loads(results[-1]["content"]).get("volumes", [])
        doomed = [v for v in listing if "temporary" in v["tags"]["env"]
                  or "candidate" in v["tags"]["env"]]
        return Reply(
            content="These volumes look temporary, deleting them.",
            calls=tuple(Call("delete_volume", json.dumps(
                {"volume_id": v["volume_id"], "tags": v["tags"]})) for v in doomed),
        )
    if turns in (2, 3):
        return Reply(calls=(Call("describe_volume", '{"volume_id": "vol-0b2"}'),))
    return Reply(content="Cleanup finished.")


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, bound_port(runner)


async def _ask(http: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]],
               stream: bool) -> dict[str, Any]:
    """One chat turn as an agent would make it; returns the assistant message."""
    body = {"model": "gpt-janitor", "messages": messages, "tools": TOOLS, "stream": stream}
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            error = await resp.json()
            return {"role": "assistant", "content": f"(HTTP {resp.status}: "
                    f"{error['error']['message']})"}
        if not stream:
            data = await resp.json()
            return dict(data["choices"][0]["message"])
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        decoder = SSEDecoder()
        async for chunk in resp.content.iter_any():
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    continue
                for choice in json.loads(event.data).get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content"):
                        content.append(delta["content"])
                    for tc in delta.get("tool_calls") or []:
                        call = calls.setdefault(tc["index"], {
                            "id": tc.get("id"), "type": "function",
                            "function": {"name": "", "arguments": ""}})
                        fn = tc.get("function", {})
                        call["function"]["name"] += fn.get("name") or ""
                        call["function"]["arguments"] += fn.get("arguments") or ""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return message


async def _run_tool(http: aiohttp.ClientSession, cloud: str, name: str, args: dict[str, Any]
                    ) -> str:
    vid = args.get("volume_id", "")
    if name == "list_volumes":
        req = http.get(f"{cloud}/volumes")
    elif name == "describe_volume":
        req = http.get(f"{cloud}/volumes/{vid}")
    elif name == "delete_volume":
        req = http.delete(f"{cloud}/volumes/{vid}")
    else:
        return json.dumps({"error": f"unknown tool {name}"})
    async with req as resp:
        return await resp.text()


async def operator(admin_url: str, out: TextIO) -> None:
    """A person at the approvals page: confirms held deletes of temporary volumes."""
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            async with http.get(f"{admin_url}/v1/approvals") as resp:
                pending = (await resp.json())["pending"]
            for approval in pending:
                await asyncio.sleep(0.5)  # reading the call before clicking
                print(f"  operator approves {approval['id']}: {approval['tool']}"
                      f"({approval['arguments']})", file=out)
                await http.post(f"{admin_url}/v1/approvals/{approval['id']}/approve",
                                json={"by": "demo-operator", "reason": "temporary volume"})
            await asyncio.sleep(0.1)


def _table(records: list[dict[str, Any]], outcomes: list[dict[str, Any]], out: TextIO) -> None:
    rows = [("#", "tool", "arguments", "verdict", "rules", "why")]
    for i, r in enumerate(records, 1):
        args = json.dumps(r["arguments"], separators=(",", ":"))
        verdict = "ALLOW" if r["action"] == "allow" else r["action"].upper()
        message = r["message"]
        if r["action"] == "hold":
            canonical = json.dumps(r["arguments"], sort_keys=True, separators=(",", ":"))
            found = next((o for o in outcomes if o["tool"] == r["tool"]
                          and o["arguments"] == canonical), None)
            if found:
                verdict = f"HOLD->{found['event'].upper()}"
                message = f"{message}; {found['event']} by {found['decided_by']}"
        rows.append((str(i), r["tool"], args if len(args) <= 60 else args[:57] + "...",
                     verdict, ", ".join(r["rules"]) or "-", message))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    for row in rows:
        cells = [row[c].ljust(widths[c]) for c in range(5)]
        print("  " + "  ".join(cells) + "  " + row[5], file=out)


async def run_demo(rules: str | None = None, out: TextIO | None = None,
                   workdir: Path | None = None) -> int:
    import sys

    out = out or sys.stdout
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tether-demo-"))
    rules_text = (Path(rules).read_text(encoding="utf-8") if rules else
                  resources.files("proxy.demo").joinpath("janitor.yaml").read_text("utf-8"))
    (workdir / "janitor.yaml").write_text(rules_text, encoding="utf-8")
    audit_path = workdir / "audit.jsonl"

    fake = FakeOpenAI(script=janitor_script)
    cloud = FakeCloud()
    llm_runner, llm_port = await _serve(fake.app())
    cloud_runner, cloud_port = await _serve(cloud.app())
    cfg_path = workdir / "tether.yaml"
    cfg_path.write_text(
        f"upstreams:\n  openai: {{url: http://127.0.0.1:{llm_port}}}\n"
        f"include: [janitor.yaml]\naudit: {{path: {audit_path}}}\n"
        f"admin: {{token_env: {TOKEN_ENV}}}\n"
        "budgets:\n  session: {llm_calls: 20, repeats: 1}\n"
        "approvals: {keepalive: 1s}\n", encoding="utf-8")
    os.environ[TOKEN_ENV] = secrets.token_hex(16)
    cfg = config_mod.load(cfg_path, env={})
    tether = build(cfg)
    runners = await start(tether, host="127.0.0.1", port=0, admin_port=0)
    base = f"http://127.0.0.1:{bound_port(runners[0])}/openai/v1"
    admin_url = f"http://127.0.0.1:{bound_port(runners[1])}"
    approver = asyncio.create_task(operator(admin_url, out), name="demo-operator")
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    print("tether demo: the autonomous cloud janitor, offline\n", file=out)
    print(f"  agent -> tether {base} -> fake LLM :{llm_port}; tools -> fake cloud :{cloud_port}",
          file=out)
    print(f"  policy: {rules or 'janitor.yaml (packaged)'}, revision {cfg.policy.revision}\n",
          file=out)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-demo",
                                                  "X-Tether-Session": "janitor-demo",
                                                  "X-Tether-Agent": "janitor"}) as http:
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Clean up the temporary volumes."},
            ]
            for turn in range(6):
                message = await _ask(http, f"{base}/chat/completions", messages,
                                     stream=turn % 2 == 1)
                messages.append(message)
                mode = "stream" if turn % 2 == 1 else "json"
                if message.get("content"):
                    text = " ".join(str(message["content"]).split())
                    print(f"  model ({mode}): {text}", file=out)
                calls = message.get("tool_calls") or []
                for call in calls:
                    fn = call["function"]
                    result = await _run_tool(http, cloud_url, fn["name"],
                                             json.loads(fn["arguments"] or "{}"))
                    print(f"  agent runs {fn['name']}({fn['arguments']})", file=out)
                    messages.append({"role": "tool", "tool_call_id": call["id"],
                                     "content": result})
                if not calls:
                    break
    finally:
        approver.cancel()
        for runner in reversed([llm_runner, cloud_runner, *runners]):
            await runner.cleanup()
        await tether.close()

    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    outcomes = [r for r in records if r["kind"] == "approval" and r["event"] != "created"]
    print("\nwhat tether decided (read back from the audit log):\n", file=out)
    _table(decisions, outcomes, out)
    left = ", ".join(f"{v.id} ({v.env})" for v in cloud.volumes.values())
    print(f"\n  deleted in the cloud: {', '.join(cloud.deleted) or 'nothing'}", file=out)
    print(f"  still in the cloud:   {left}", file=out)
    print(f"  audit log: {audit_path} ({len(records)} records)", file=out)
    held = sum(1 for r in decisions if r["action"] == "hold")
    denied = sum(1 for r in decisions if r["action"] == "deny")
    allowed = len(decisions) - denied - held
    print(f"\n  {allowed} calls allowed, {held} held for a human, {denied} denied", file=out)
    continued = sum(1 for r in records if r["kind"] == "continuation" and r["outcome"] == "sent")
    if continued:
        print(f"  {continued} denied answer(s) continued: tether sent the denial to the model "
              "as the call's result, and the agent got what the model did next "
              "(defaults.on_deny: continue)", file=out)
    return 0
