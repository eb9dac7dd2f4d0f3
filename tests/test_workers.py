"""`tether serve --workers N` (proxy/workers.py): real worker processes on one port, real
Redis. A session budget is exact across workers, a hold is approved through whichever
worker's admin port takes the approval, each worker writes its own audit chain, SIGTERM
stops them all; a memory store (or a sink every worker would write into) is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.audit.settings import AuditSettings
from proxy.errors import ConfigError
from proxy.workers import CRASH_LOOP_S, Worker, this_worker
from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.threaded import ThreadedServer
from tests.installed import Ports, read_banner, wait_ready
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "workers-test-token"
TOOLS: Any = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
              for n in ("get_weather", "resize_volume")]
POLICY = """
tools:
  get_weather: {effect: read}
rules:
  - id: resize-needs-approval
    match: {tool: resize_volume}
    action: hold
    timeout: 60s
budgets:
  session: {llm_calls: 10}
"""


def run_serve(config: Path, *extra: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
         "--admin-port", "0", *extra], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TETHER_ADMIN_TOKEN": TOKEN, "POD_NAME": "wk", **(env or {})})


def test_worker_names_its_own_chain() -> None:
    worker = Worker(1, 4)
    assert worker.audit_path("/var/log/audit.jsonl") == "/var/log/audit.w1.jsonl"
    assert worker.audit_path(None) is None
    assert worker.audit_settings(AuditSettings(instance="pod-a")).instance == "pod-a-w1"


@pytest.mark.parametrize("value", ["x", "2/2", "-1/2", "1"])
def test_a_bad_worker_variable_is_a_config_error(value: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_WORKER", value)
    with pytest.raises(ConfigError):
        this_worker()


@pytest.mark.parametrize("store, sinks, said", [
    ("memory", "", "needs a shared session store"),
    ("redis://127.0.0.1:1/0", ", sinks: [{name: out, type: stdout}]",
     "would be written by every worker at once"),
])
def test_what_workers_cannot_share_is_refused(tmp_path: Path, store: str, sinks: str,
                                              said: str) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(f"audit: {{path: {tmp_path / 'a.jsonl'}{sinks}}}\nstore: {store}\n{POLICY}")
    proc = run_serve(config, "--workers", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert said in err and out == ""
    assert not list(tmp_path.glob("a*.jsonl"))   # no worker started


class Workers:
    def __init__(self, proc: subprocess.Popen[str], ports: Ports, audit: Path) -> None:
        self.proc, self.ports, self.audit = proc, ports, audit
        self.started = time.monotonic()   # after the parent started its workers
        self.base = f"http://127.0.0.1:{ports.proxy}/openai/v1"

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> tuple[int, Any]:
        """One request on a new connection: the kernel picks the worker."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.admin}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                     "Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def records(self, index: int) -> list[dict[str, Any]]:
        path = self.audit.with_name(f"{self.audit.stem}.w{index}{self.audit.suffix}")
        return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def workers(tmp_path: Path, own_redis: RedisServer) -> Iterator[Workers]:
    def script(body: Any) -> Reply:
        ask = str(body["messages"][-1]["content"])
        if ask == "resize":
            return Reply(content="Resizing.", calls=(Call("resize_volume", '{"size_gb": 50}'),))
        return Reply(calls=(Call("get_weather", '{"city": "Oslo"}'),))

    with ThreadedServer(FakeOpenAI(script=script).app()) as upstream:
        audit = tmp_path / "audit.jsonl"
        config = tmp_path / "tether.yaml"
        config.write_text(f"audit: {{path: {audit}}}\nstore: {own_redis.url}\n{POLICY}")
        proc = run_serve(config, "--workers", "2",
                         env={"TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{upstream}"})
        try:
            ports = read_banner(proc, deadline=90)
            wait_ready(f"http://127.0.0.1:{ports.admin}")
            yield Workers(proc, ports, audit)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            print("tether stderr:", err[-3000:])   # shown when a test fails


def ask(base: str, session: str, content: str) -> Any:
    """One chat completion on a client (and connection) of its own."""
    with openai.OpenAI(base_url=base, api_key="k", max_retries=0) as client:
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], tools=TOOLS,
            extra_headers={"X-Tether-Session": session})


async def test_a_session_budget_is_exact_across_workers(workers: Workers) -> None:
    async def one() -> str:
        try:
            await asyncio.to_thread(ask, workers.base, "budget-1", "weather?")
            return "ok"
        except openai.RateLimitError:
            return "429"

    outcomes = await asyncio.gather(*(one() for _ in range(24)))
    assert sorted(outcomes).count("ok") == 10 and outcomes.count("429") == 14
    # Both workers served the session (new connections spread by the kernel), and each
    # wrote its own chain under its own instance.
    served = [[r for r in workers.records(i) if r.get("session") == "budget-1"]
              for i in (0, 1)]
    assert all(served), [len(s) for s in served]
    instances = [{r["instance"] for r in s} for s in served]
    assert all(len(i) == 1 for i in instances) and instances[0] != instances[1]
    assert all(next(iter(i)).startswith(f"wk-w{n}-") for n, i in enumerate(instances))
    # /metrics, whichever worker answers it, counts every worker's requests.
    with urllib.request.urlopen(f"http://127.0.0.1:{workers.ports.admin}/metrics") as r:
        text = r.read().decode()
    counted = {status: float(line.split()[-1]) for line in text.splitlines()
               for status in ("200", "429")
               if line.startswith(f'tether_requests_total{{provider="openai",status="{status}"}}')}
    assert counted == {"200": 10.0, "429": 14.0}, counted
    verify = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", "--merged",
         str(workers.audit.with_name("audit.w0.jsonl")),
         str(workers.audit.with_name("audit.w1.jsonl"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 instance(s)" in verify.stdout and " 0 failed" in verify.stdout, verify.stdout


async def test_a_hold_is_approved_through_any_worker(workers: Workers) -> None:
    """Holds until one approval lands on the other worker than the one whose request
    waits (the kernel's choice per connection: 1 in 2 each time)."""
    crossed = 0
    for n in range(20):
        session = f"hold-{n}"
        waiting = asyncio.ensure_future(asyncio.to_thread(ask, workers.base, session, "resize"))
        deadline = time.monotonic() + 15
        while True:
            _, listed = await asyncio.to_thread(workers.admin, "GET", "/v1/approvals")
            mine = [a for a in listed["pending"] if a["session"] == session]
            if mine:
                break
            assert time.monotonic() < deadline, "the hold did not appear"
            await asyncio.sleep(0.05)
        status, _ = await asyncio.to_thread(workers.admin, "POST",
                                            f"/v1/approvals/{mine[0]['id']}/approve",
                                            {"by": "alice"})
        assert status == 200
        answer = await asyncio.wait_for(waiting, 15)
        assert [c.function.name for c in answer.choices[0].message.tool_calls or []
                if c.type == "function"] == ["resize_volume"]
        approved = [i for i in (0, 1) if any(
            r.get("kind") == "approval" and r.get("id") == mine[0]["id"]
            and r.get("event") == "approved" for r in workers.records(i))]
        waited = [i for i in (0, 1) if any(
            r.get("session") == session and r.get("kind") == "decision"
            for r in workers.records(i))]
        assert len(approved) == 1 and len(waited) == 1, (approved, waited)
        crossed += approved != waited
        if crossed:
            break
    assert crossed, "20 approvals all landed on the worker that waited"


def test_sigterm_stops_every_worker(workers: Workers) -> None:
    children = subprocess.run(["ps", "--ppid", str(workers.proc.pid), "-o", "pid="],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_a_worker_that_dies_is_restarted_and_its_chain_goes_on(workers: Workers) -> None:
    def children() -> set[int]:
        out = subprocess.run(["ps", "--ppid", str(workers.proc.pid), "-o", "pid="],
                             capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def until_both_grow(tag: str) -> None:
        """Asks on new connections until each worker's chain has a record more."""
        before = [len(workers.records(i)) for i in (0, 1)]
        deadline = time.monotonic() + 60
        n = 0
        while not all(len(workers.records(i)) > before[i] for i in (0, 1)):
            assert time.monotonic() < deadline, f"{tag}: a worker answered nothing"
            ask(workers.base, f"{tag}-{n}", "weather?")
            n += 1

    until_both_grow("before")
    first = children()
    time.sleep(max(0.0, CRASH_LOOP_S + 0.5 - (time.monotonic() - workers.started)))
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(children() - {victim}) < 2:
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.1)
    until_both_grow("after")   # the new worker listens and writes on in its chain
    assert workers.proc.poll() is None
    for i in (0, 1):   # one chain each, under one instance id, before and after
        assert len({r["instance"] for r in workers.records(i)}) == 1
    verify = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "verify", "--merged",
         str(workers.audit.with_name("audit.w0.jsonl")),
         str(workers.audit.with_name("audit.w1.jsonl"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 instance(s)" in verify.stdout and " 0 failed" in verify.stdout, verify.stdout
