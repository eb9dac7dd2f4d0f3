"""Governed traffic at a fixed rate through a `tether serve` subprocess while its config is
reloaded again and again; what the agents saw and what the audit log says. Shared by
tests/test_reload_load.py (in the suite) and bench/reload.py (the numbers).

Each reload writes a new revision: a rule `gen-N` that matches nothing (so every revision
is new) and, on every other one, the rule that denies `delete_volume`. Every request asks
for one `delete_volume` call, so each decision's verdict says which policy made it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai

from tests.fakes import Call, FakeOpenAI, Reply
from tests.fakes.threaded import ThreadedServer
from tests.reload_helpers import TOKEN, ConfigDir, Served

TOOLS: list[openai.types.chat.ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": "delete_volume", "parameters": {"type": "object"}}}]


def rules(n: int) -> str:
    deny = ("  - {id: no-deletes, match: {tool: delete_*}, action: deny, on_deny: rewrite}\n"
            if n % 2 else "")
    return f"rules:\n  - {{id: gen-{n}, match: {{tool: never_{n}}}, action: deny}}\n{deny}"


@dataclass
class LoadReport:
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    reloads_ok: int = 0
    reload_ms: list[float] = field(default_factory=list)  # POST /v1/reload, as answered
    decisions: int = 0
    revisions_seen: int = 0
    revisions_deciding: int = 0  # revisions that made at least one decision
    problems: list[str] = field(default_factory=list)  # audit records that do not add up

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, values: list[float], q: int) -> float:
        return (statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1
                else 0.0)


def check_audit(audit: Path, denies: dict[str, bool], first: str, report: LoadReport) -> None:
    """Every decision names the revision in force where it sits in the log (the last
    reload before it), and its verdict is that revision's."""
    revision = first
    seen = {first}
    deciding: set[str] = set()
    for n, line in enumerate(audit.read_text().splitlines(), 1):
        record = json.loads(line)
        if record.get("kind") == "reload" and record.get("result") == "ok":
            report.reloads_ok += 1
            revision = str(record["revision"])
            seen.add(revision)
        elif record.get("kind") == "decision":
            report.decisions += 1
            named = record.get("policy_revision")
            deciding.add(str(named))
            expected = "deny" if denies.get(str(named)) else "allow"
            if named != revision:
                report.problems.append(f"line {n}: names {named}, in force: {revision}")
            elif record.get("action") != expected:
                report.problems.append(f"line {n}: {record.get('action')} under {named}")
    report.revisions_seen = len(seen)
    report.revisions_deciding = len(deciding)


async def run(tmp: Path, *, rate: float = 200.0, reloads: int = 50,
              interval_s: float = 0.1, how: str = "overwrite",
              max_in_flight: int = 64) -> LoadReport:
    """`rate` requests a second, but never more than `max_in_flight` at once: on a
    machine too busy to serve the rate, the rate drops (it is reported) rather than
    the connections piling up until tether sheds them."""
    fake = FakeOpenAI(script=lambda body: Reply(calls=(
        Call("delete_volume", '{"volume_id": "vol-1"}'),)))
    report = LoadReport()
    audit = tmp / "audit.jsonl"
    cfg = ConfigDir(tmp / "config", how)
    main = f"audit: {{path: {audit}}}\ndefaults: {{action: allow}}\ninclude: [rules.yaml]\n"
    cfg.write({"tether.yaml": main, "rules.yaml": rules(0)})
    with ThreadedServer(fake.app()) as upstream:
        served = Served(cfg.main, upstream, tmp / "tether.log")
        try:
            await _drive(served, cfg, audit, report, rate, reloads, interval_s,
                         max_in_flight)
        finally:
            served.stop()
    return report


async def _drive(served: Served, cfg: ConfigDir, audit: Path, report: LoadReport,
                 rate: float, reloads: int, interval_s: float, max_in_flight: int) -> None:
    denies: dict[str, bool] = {}
    # The agents' side is plain aiohttp: the SDK's own cost per request would make this
    # process, not tether, the bottleneck on two cores (the e2e tests use the SDK).
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "go"}], "tools": TOOLS}
    async with aiohttp.ClientSession(headers=headers) as admin, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as agents:
        async with admin.get(f"{served.admin_url}/readyz") as r:
            first = str((await r.json())["policy_revision"])
        denies[first] = False
        done = asyncio.Event()

        slots = asyncio.Semaphore(max_in_flight)

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with agents.post(f"{served.base_url}/chat/completions", json=body,
                                       headers={"Authorization": "Bearer sk-agent"}) as r:
                    answer = await r.json()
                    if r.status != 200 or not answer.get("choices"):
                        report.failed.append(f"HTTP {r.status}: {answer}")
            except Exception as e:  # noqa: BLE001 - counted: the test asserts there are none
                report.failed.append(f"{type(e).__name__}: {e}")
            finally:
                slots.release()
            report.latencies_ms.append((time.perf_counter() - started) * 1000)

        async def reloader() -> None:
            """Reload `n` starts at `n * interval_s` (at once if the one before ran late)."""
            begun = time.perf_counter()
            for n in range(1, reloads + 1):
                await asyncio.sleep(max(0.0, begun + n * interval_s - time.perf_counter()))
                cfg.write({"rules.yaml": rules(n)})
                started = time.perf_counter()
                async with admin.post(f"{served.admin_url}/v1/reload") as r:
                    body = await r.json()
                report.reload_ms.append((time.perf_counter() - started) * 1000)
                if body.get("result") == "ok":
                    denies[str(body["revision"])] = bool(n % 2)
                elif body.get("result") == "unchanged":  # the watcher was first
                    async with admin.get(f"{served.admin_url}/readyz") as ready:
                        denies[str((await ready.json())["policy_revision"])] = bool(n % 2)
                else:
                    report.problems.append(f"reload {n}: {body}")
            await asyncio.sleep(interval_s)
            done.set()

        tasks: set[asyncio.Task[None]] = set()
        reloading = asyncio.create_task(reloader())
        started = time.perf_counter()
        while not done.is_set():  # a request every 1/rate s, at most max_in_flight at once
            await slots.acquire()
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            report.sent += 1
            next_at = started + report.sent / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        report.seconds = time.perf_counter() - started
        await reloading
        await asyncio.gather(*tasks)
    check_audit(audit, denies, first, report)
