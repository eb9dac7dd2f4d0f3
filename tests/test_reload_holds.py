"""A held call whose approval lands in the same instant as a reload that denies it: the
approval is checked again when it releases the call (Holds.rejudge), so the call is
denied with the reason, not run under the policy that no longer allows it. (The e2e tests
in test_reload_e2e.py cover the reload-time pass through a running tether.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
from aiohttp import web

from proxy import config as config_mod
from proxy.reload import plan
from proxy.server.app import bound_port, build, start
from tests.fakes import Call, FakeOpenAI, Reply

HOLD = """rules:
  - id: resizes-held
    match: {tool: resize_volume}
    action: hold
    on_deny: rewrite
    timeout: 30s
"""
FROZEN = HOLD + """  - id: resizes-frozen
    match: {tool: resize_volume}
    action: deny
    on_deny: rewrite
    message: resizes are frozen
"""


async def test_an_approval_racing_a_reload_that_denies_the_call_is_denied(
        tmp_path: Path) -> None:
    fake = FakeOpenAI(script=lambda body: Reply(calls=(
        Call("resize_volume", '{"volume_id": "vol-9"}'),)))
    upstream = web.AppRunner(fake.app(), access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", 0).start()
    audit = tmp_path / "audit.jsonl"
    path = tmp_path / "tether.yaml"
    head = f"audit: {{path: {audit}}}\ndefaults: {{action: allow}}\n"
    path.write_text(head + HOLD)
    env = {"TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{bound_port(upstream)}"}
    tether = build(config_mod.load(path, env=env))
    runners = await start(tether, host="127.0.0.1", port=0, admin_port=0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{bound_port(runners[0])}/openai/v1",
                                api_key="sk-agent", max_retries=0)
    try:
        asking = asyncio.create_task(client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "go"}],
            tools=[{"type": "function", "function": {"name": "resize_volume",
                                                     "parameters": {"type": "object"}}}]))
        queue = tether.holds.queue
        while not await queue.pending():
            await asyncio.sleep(0.01)
        [approval] = await queue.pending()
        path.write_text(head + FROZEN)
        assert tether.reloader is not None
        frozen = plan(tether.reloader.running, config_mod.load(path, env=env))
        # The click, then the swap, before the waiting request runs again.
        await queue.decide(approval.id, approve=True, by="alice")
        tether.reloader._apply(frozen.config)
        message = (await asyncio.wait_for(asyncio.shield(asking), 10)).choices[0].message
        assert not message.tool_calls
        assert message.content is not None
        assert f"approved by alice (approval {approval.id}), but policy revision " \
               f"{frozen.config.policy.revision} denies it: resizes are frozen" in message.content
        holds = [json.loads(x) for x in audit.read_text().splitlines()
                 if json.loads(x)["kind"] == "hold"]
        assert [h["outcome"] for h in holds] == ["denied"]
    finally:
        await client.close()
        for runner in reversed(runners):
            await runner.cleanup()
        await tether.close()
        await upstream.cleanup()
