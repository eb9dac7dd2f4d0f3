"""Shipping through a running tether: governed calls fail closed while the spool is full (deny,
/readyz 503, a metric) and recover by themselves; a slow receiver adds no latency to governed
calls; and a real `tether serve` killed with -9 ships what it left in the spool when it starts
again, and drains the spool when it is stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.server.app import Tether, bound_port, build, start
from tests.audit_shipping_helpers import assert_at_least_once_in_order, until
from tests.conftest import POLICY
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.audit_receivers import BatchReceiver
from tests.fakes.threaded import ThreadedServer
from tests.installed import TOOLS, janitor_upstream, read_banner

ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "go"}]


class Running:
    def __init__(self, tether: Tether, base_url: str, admin_url: str, audit: Path,
                 fake: FakeOpenAI) -> None:
        self.tether, self.base_url, self.admin_url, self.audit, self.fake = (
            tether, base_url, admin_url, audit, fake)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-agent", max_retries=0)

    async def call(self) -> list[str]:
        """One governed call to get_weather; the tool calls the agent got."""
        self.fake.push(Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),)))
        r = await self.client.chat.completions.create(
            model="gpt-x", messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "get_weather",
                                                     "parameters": {"type": "object"}}}])
        self.last_text = r.choices[0].message.content or ""
        return [c.function.name for c in r.choices[0].message.tool_calls or []
                if c.type == "function"]

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.admin_url}/readyz") as r:
            return r.status, await r.json()

    def sample(self, name: str, **labels: str) -> float:
        registry = self.tether.governor.metrics.registry
        return registry.get_sample_value(name, labels) or 0.0

    def lines(self) -> list[bytes]:
        return self.audit.read_bytes().split(b"\n")[:-1]


Run = Callable[[str], Awaitable[Running]]


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    runners: list[web.AppRunner] = []
    running: list[Running] = []

    async def make(audit_yaml: str) -> Running:
        fake = FakeOpenAI()
        upstream = web.AppRunner(fake.app(), access_log=None)
        await upstream.setup()
        await web.TCPSite(upstream, "127.0.0.1", 0).start()
        runners.append(upstream)
        audit = tmp_path / f"audit-{len(running)}.jsonl"
        cfg_path = tmp_path / "tether.yaml"
        cfg_path.write_text(f"audit:\n  path: {audit}\n{audit_yaml}\n{POLICY}")
        cfg = config_mod.load(cfg_path, env={
            "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{bound_port(upstream)}"})
        tether = build(cfg)
        proxy, admin = await start(tether, host="127.0.0.1", port=0, admin_port=0)
        runners.extend([proxy, admin])
        made = Running(tether, f"http://127.0.0.1:{bound_port(proxy)}/openai/v1",
                       f"http://127.0.0.1:{bound_port(admin)}", audit, fake)
        running.append(made)
        return made

    yield make
    for r in running:
        await r.client.close()
    for runner in reversed(runners):
        await runner.cleanup()
    for r in running:
        await r.tether.close()


@pytest.fixture
async def batch() -> AsyncIterator[BatchReceiver]:
    receiver = BatchReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


def http_sink(receiver: BatchReceiver, spool: str = "", extra: str = "") -> str:
    return (f"  spool: {{poll_interval: 20ms, drain_timeout: 2s{spool}}}\n  sinks:\n"
            f"    - {{name: siem, type: http, url: 'http://127.0.0.1:{receiver.port}/in', "
            f"backoff: {{min: 20ms, max: 100ms}}{extra}}}\n")


async def test_a_full_spool_denies_governed_calls_until_shipping_catches_up(
        run: Run, batch: BatchReceiver) -> None:
    batch.faults.always_fail = True
    t = await run(http_sink(batch, spool=", max_bytes: 3000"))
    assert (await t.ready())[0] == 200
    allowed = 0
    while await t.call() == ["get_weather"]:
        allowed += 1
        assert allowed < 50, "the spool never filled"
    assert allowed >= 3  # records were spooled while the receiver was down
    assert "audit log cannot be written" in t.last_text  # denied, as with a full disk
    status, body = await t.ready()
    assert status == 503 and any("audit spool is full" in p for p in body["problems"])
    assert t.sample("tether_audit_refused_total", cause="spool_full") >= 1
    assert t.sample("tether_audit_spool_bytes", sink="siem") > 0
    assert t.tether.governor.audit.healthy  # the disk is fine: only the spool is full
    batch.faults.always_fail = False  # the receiver is back
    deadline = time.monotonic() + 15
    while (await t.ready())[0] != 200:  # by itself: no call needed to clear it
        assert time.monotonic() < deadline, "readyz never recovered"
        await asyncio.sleep(0.05)
    assert await t.call() == ["get_weather"]
    await until(lambda: set(batch.lines) == set(t.lines()))
    assert_at_least_once_in_order(t.lines(), batch.lines)


async def test_a_required_sink_down_past_max_outage_turns_readyz_red(
        run: Run, batch: BatchReceiver) -> None:
    batch.faults.always_fail = True
    t = await run(http_sink(batch, extra=", required: true, max_outage: 300ms"))
    assert await t.call() == ["get_weather"]  # within the outage allowance
    await until(lambda: t.tether.shipper is not None and t.tether.shipper.refusal() is not None)
    status, body = await t.ready()
    assert status == 503 and any("required audit sink siem" in p for p in body["problems"])
    assert await t.call() == []
    assert t.sample("tether_audit_refused_total", cause="sink_down") >= 1
    batch.faults.always_fail = False
    await until(lambda: t.tether.shipper is not None and t.tether.shipper.refusal() is None)
    assert (await t.ready())[0] == 200
    assert await t.call() == ["get_weather"]


async def test_a_slow_receiver_adds_no_latency_to_governed_calls(
        run: Run, batch: BatchReceiver) -> None:
    batch.faults.delay = 3.0  # every batch takes 3 s to be answered
    t = await run(http_sink(batch, extra=", timeout: 10s"))
    started = time.monotonic()
    for _ in range(10):
        assert await t.call() == ["get_weather"]
    assert time.monotonic() - started < 2.5  # ten calls, less than one batch's answer
    await until(lambda: len(batch.lines) == len(t.lines()), timeout=20)


def _serve(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
         "--admin-port", "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _governed_calls(port: int, n: int) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="sk-x",
                           max_retries=0)
    for _ in range(n):
        client.chat.completions.create(model="gpt-x", messages=MESSAGES, tools=TOOLS)
    client.close()


def _lines(audit: Path) -> list[bytes]:
    return audit.read_bytes().split(b"\n")[:-1]


def _wait(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str], sig: int) -> int:
    proc.send_signal(sig)
    code = proc.wait(30)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
    return code


def test_kill_9_with_records_in_the_spool_then_restart_ships_them(tmp_path: Path) -> None:
    receiver = BatchReceiver()
    receiver.faults.always_fail = True
    audit = tmp_path / "audit.jsonl"
    with ThreadedServer(janitor_upstream().app()) as upstream, \
            ThreadedServer(receiver.app()) as receiver_port:
        config = tmp_path / "tether.yaml"
        config.write_text(
            f"include: [{ROOT / 'rules/janitor.yaml'}]\naudit:\n  path: {audit}\n"
            f"  spool: {{poll_interval: 20ms}}\n  sinks:\n    - {{name: siem, type: http, "
            f"url: 'http://127.0.0.1:{receiver_port}/in', backoff: {{min: 20ms, max: 100ms}}}}\n")
        env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}"}
        proc = _serve(config, env)
        ports = read_banner(proc)
        _governed_calls(ports.proxy, 5)  # 10 decisions, none shipped: the receiver fails
        _wait(lambda: receiver.requests > 0)
        assert _stop(proc, signal.SIGKILL) == -signal.SIGKILL
        spooled = _lines(audit)
        assert len(spooled) == 10 and receiver.lines == []
        receiver.faults.always_fail = False
        proc = _serve(config, env)  # the same config: the same spool and cursor
        ports = read_banner(proc)
        _wait(lambda: len(set(receiver.lines)) == 10)
        _governed_calls(ports.proxy, 1)
        _wait(lambda: len(set(receiver.lines)) == 12)
        assert _stop(proc, signal.SIGTERM) == 0
    assert_at_least_once_in_order(_lines(audit), receiver.lines)
    assert [json.loads(line)["seq"] for line in _lines(audit)] == list(range(1, 13))


def test_sigterm_drains_the_spool_within_the_grace_period(tmp_path: Path) -> None:
    receiver = BatchReceiver()
    audit = tmp_path / "audit.jsonl"
    with ThreadedServer(janitor_upstream().app()) as upstream, \
            ThreadedServer(receiver.app()) as receiver_port:
        config = tmp_path / "tether.yaml"
        # The sink looks for new records once a minute: only the drain ships them in time.
        config.write_text(
            f"include: [{ROOT / 'rules/janitor.yaml'}]\naudit:\n  path: {audit}\n"
            f"  spool: {{poll_interval: 60s, drain_timeout: 10s}}\n  sinks:\n"
            f"    - {{name: siem, type: http, url: 'http://127.0.0.1:{receiver_port}/in'}}\n")
        env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}"}
        proc = _serve(config, env)
        ports = read_banner(proc)
        time.sleep(0.3)  # the sink's first look (an empty log) is behind it
        _governed_calls(ports.proxy, 3)
        assert receiver.lines == []
        started = time.monotonic()
        assert _stop(proc, signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
    assert len(_lines(audit)) == 6
    assert receiver.lines == _lines(audit)


async def test_three_instances_shipped_through_faults_verify_complete(
        tmp_path: Path, batch: BatchReceiver) -> None:
    """The two halves together: what the sinks deliver, duplicates and interleaving
    included, is what `tether audit verify --merged` proves complete per instance."""
    from tests.audit_shipping_helpers import make_shipping

    key = tmp_path / "hmac.key"
    key.write_bytes(os.urandom(32))
    shippings = []
    for name in ("alpha", "beta", "gamma"):
        directory = tmp_path / name
        directory.mkdir()
        shippings.append(make_shipping(directory, (
            f"  instance: {name}\n  sign: {{alg: hmac-sha256, key_file: '{key}'}}\n"
            f"  max_bytes: 4000\n" + http_sink(batch, extra=", timeout: 300ms, batch: {records: 7}"))))
    for round_ in range(3):
        for s in shippings:
            s.write(9, round=round_)
            s.audit.write_head()
        batch.faults.fail, batch.faults.drop = 2, 2  # a few failures, some after storing
        batch.faults.delay = 0.4 if round_ == 1 else 0.0
    batch.faults.delay = 0.0
    for s in shippings:
        await s.close()  # the last signed head, then the drain
    central = tmp_path / "central.jsonl"
    await until(lambda: all(set(s.lines()) <= set(batch.lines) for s in shippings))
    central.write_bytes(b"".join(line + b"\n" for line in batch.lines))
    for s in shippings:
        assert_at_least_once_in_order(s.lines(), [ln for ln in batch.lines
                                                  if ln in set(s.lines())])
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "proxy", "audit", "verify", "--merged", str(central),
        "--hmac-key-file", str(key), "--require-signed-tail"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("alpha", "beta", "gamma"):
        assert name in done.stdout
