"""Real `tether serve` processes stopping: SIGTERM with calls held and a stream in flight
(every caller gets a clean answer in its provider's shape saying tether is restarting,
audited as abandoned, and the process exits 0 within its drain), and kill -9 of the
replica a call waits on while a second replica is alive (the hold becomes abandoned
within the lease, the live replica's own hold does not)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy.demo.fake_anthropic import FakeAnthropic
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.threaded import ThreadedServer
from tests.installed import Ports, read_banner, wait_ready
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "shutdown-test-token"
HELD = Call("resize_volume", '{"volume_id": "vol-7", "size_gb": 50}')
TOOLS: Any = [{"type": "function", "function": {"name": "resize_volume",
                                                "parameters": {"type": "object"}}}]
POLICY = """
rules:
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 120s
    message: Resizing needs a human
approvals: {keepalive: 200ms, lease: 1s}
server: {drain_timeout: 2s}
"""


class Tether:
    def __init__(self, proc: subprocess.Popen[str], ports: Ports, audit: Path) -> None:
        self.proc, self.ports, self.audit = proc, ports, audit
        self.admin_url = f"http://127.0.0.1:{ports.admin}"
        self.base = f"http://127.0.0.1:{ports.proxy}"

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.admin_url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    async def pending(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = await asyncio.to_thread(self.admin, "GET", "/v1/approvals")
            if len(body["pending"]) >= count:
                return list(body["pending"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} approvals did not appear")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                       if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(extra: str, env: dict[str, str], name: str = "t") -> Tether:
        audit = tmp_path / f"audit-{name}.jsonl"
        config = tmp_path / f"tether-{name}.yaml"
        config.write_text(f"audit: {{path: {audit}}}\n{extra}\n{POLICY}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
             "--admin-port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "TETHER_ADMIN_TOKEN": TOKEN, "POD_NAME": name,
                            **env})
        procs.append(proc)
        ports = read_banner(proc)
        wait_ready(f"http://127.0.0.1:{ports.admin}")
        return Tether(proc, ports, audit)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
        print("tether stderr:", err[-3000:])   # shown when a test fails


def held_upstream() -> FakeOpenAI:
    return FakeOpenAI(script=lambda body: Reply(content="Resizing.", calls=(HELD,)))


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_sigterm_answers_every_held_caller_and_cuts_what_still_runs(
        serve: Any, redis_server: RedisServer, store: str) -> None:
    slow = FakeAnthropic(script=lambda body: Reply(content="word " * 200), fragment=5,
                         delay_s=0.3)
    with ThreadedServer(held_upstream().app()) as openai_port, \
            ThreadedServer(slow.app()) as anthropic_port:
        t = serve(f"store: {'memory' if store == 'memory' else redis_server.url}\n", {
            "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{openai_port}",
            "TETHER_UPSTREAM_ANTHROPIC": f"http://127.0.0.1:{anthropic_port}"})
        client = openai.AsyncOpenAI(base_url=t.base + "/openai/v1", api_key="k", max_retries=0)
        claude = anthropic.AsyncAnthropic(base_url=t.base + "/anthropic", api_key="k",
                                          max_retries=0)

        async def whole() -> Any:
            return await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "go"}], tools=TOOLS,
                extra_headers={"X-Tether-Session": f"whole-{store}"})

        async def streamed() -> list[Any]:
            out = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "go"}], tools=TOOLS,
                stream=True, extra_headers={"X-Tether-Session": f"stream-{store}"})
            return [c async for c in out]

        async def in_flight() -> tuple[str, str]:
            text, error = "", ""
            try:
                async with claude.messages.stream(
                        model="c", max_tokens=10, messages=[{"role": "user", "content": "go"}]
                ) as events:
                    async for event in events:
                        if event.type == "text":
                            text += event.text
            except anthropic.APIError as e:
                error = str(e)
            return text, error

        tasks = [asyncio.ensure_future(f()) for f in (whole, streamed)]
        listed = await t.pending(2)
        slow_task = asyncio.ensure_future(in_flight())
        await asyncio.sleep(0.8)   # its first words are out
        stopped = time.monotonic()
        t.proc.send_signal(signal.SIGTERM)
        answer, chunks = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        answered = time.monotonic() - stopped
        text, error = await asyncio.wait_for(slow_task, 15)
        code = await asyncio.to_thread(t.proc.wait, 30)
        exited = time.monotonic() - stopped
        await client.close()
        await claude.close()

    # The whole answer: the call taken out, the text says why, in OpenAI's shape.
    message = answer.choices[0].message
    assert message.tool_calls is None
    assert "tether is restarting" in (message.content or "") and "not executed" in message.content
    # The stream: its text, then the denial as text, and a clean end (no tool call).
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "tether is restarting" in streamed_text
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    # The stream that outlived the drain got words, then the provider's error event.
    assert text.startswith("word") and error, (text, error)
    print(f"\nSIGTERM ({store}): held callers answered after {answered:.2f} s, exit 0 after "
          f"{exited:.2f} s")
    assert code == 0
    assert answered < 2.0, answered    # the holds are answered first, not after the drain
    assert exited < 2 + 2 + 10, exited  # drain + cut grace + a generous audit drain
    records = t.records()
    # Every hold ended abandoned: the two that waited, and any the turn's continuation
    # upstream (after a denial, tether may ask the model again) met while stopping.
    ends = [r for r in records if r["kind"] == "hold"]
    assert {(h["outcome"], h["by"]) for h in ends} == {("abandoned", "tether")}
    assert {a["id"] for a in listed} <= {h["approval_id"] for h in ends}
    assert all("tether is restarting" in h["reason"] for h in ends)
    events = {r["id"]: r["event"] for r in records if r["kind"] == "approval"}
    assert {a["id"] for a in listed} <= set(events) and set(events.values()) == {"abandoned"}
    assert not any(r.get("kind") == "approval" and r.get("event") == "approved" for r in records)


async def test_kill_9_of_the_waiting_replica_abandons_its_hold_within_the_lease(
        serve: Any, own_redis: RedisServer) -> None:
    with ThreadedServer(held_upstream().app()) as upstream:
        env = {"TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}"}
        a = serve(f"store: {own_redis.url}\n", env, name="replica-a")
        b = serve(f"store: {own_redis.url}\n", env, name="replica-b")

        clients: list[openai.AsyncOpenAI] = []

        def ask(t: Tether, session: str) -> asyncio.Future[Any]:
            client = openai.AsyncOpenAI(base_url=t.base + "/openai/v1", api_key="k",
                                        max_retries=0)
            clients.append(client)
            return asyncio.ensure_future(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "go"}], tools=TOOLS,
                extra_headers={"X-Tether-Session": session}))

        on_a = ask(a, "on-a")
        [held_a] = await b.pending(1)
        on_b = ask(b, "on-b")
        listed = await b.pending(2)
        held_b = next(x for x in listed if x["session"] == "on-b")
        assert held_a["waiter"].startswith("replica-a") and held_b["waiter"].startswith("replica-b")
        a.proc.kill()   # SIGKILL: no shutdown, no answer, no audit record from A
        killed = time.monotonic()
        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(on_a, 10)
        while True:
            _, now = await asyncio.to_thread(b.admin, "GET", f"/v1/approvals/{held_a['id']}")
            if now["state"] != "pending":
                break
            assert time.monotonic() - killed < 10, "A's hold is still pending 10 s after kill -9"
            await asyncio.sleep(0.1)
        noticed = time.monotonic() - killed
        assert now["state"] == "abandoned" and now["decided_by"] == "tether"
        assert "replica-a" in now["reason"] and "lease" in now["reason"]
        # Not approvable any more, from any replica.
        status, late = await asyncio.to_thread(
            b.admin, "POST", f"/v1/approvals/{held_a['id']}/approve", {"by": "alice"})
        assert status == 409 and "the caller is gone" in late["error"]["message"]
        # B's own wait was swept over and over meanwhile: its lease holds, it stays.
        await asyncio.sleep(2.5)   # more than two leases
        _, mine = await asyncio.to_thread(b.admin, "GET", f"/v1/approvals/{held_b['id']}")
        assert mine["state"] == "pending"
        status, _ = await asyncio.to_thread(
            b.admin, "POST", f"/v1/approvals/{held_b['id']}/approve", {"by": "alice"})
        assert status == 200
        answer = await asyncio.wait_for(on_b, 10)
        assert [c.function.name for c in answer.choices[0].message.tool_calls or []
                if c.type == "function"] == ["resize_volume"]
        assert b.metric("tether_holds_abandoned_total", reason="replica_gone") == 1.0
        records = b.records()   # B, which swept it, audited it
        assert [r["event"] for r in records if r["kind"] == "approval"
                and r["id"] == held_a["id"]] == ["abandoned"]
        for client in clients:
            await client.close()
    print(f"\nkill -9: the hold was abandoned {noticed:.2f} s later (lease 1 s)")
    assert noticed < 1 + 1 / 3 + 2, noticed   # the lease, one sweep period, slack
