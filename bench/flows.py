"""Benchmark: what flow rules cost on the decision path, against the history's size.

In this process, side by side in one run:
  - the policy decision alone (`PolicyEngine.decide`): plain rules, and the same rules
    plus two flow rules, with a session history of 10, 100 and 1,000 calls. The worst
    case is a history with no call the flow rules look for (each rule scans all of it);
    the usual case for a held write has the untrusted read somewhere in it;
  - the history's I/O for one answer: load the session's history and record one call,
    in memory and in a real redis-server on loopback (started here when installed).

    .venv/bin/python bench/flows.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import config as config_mod  # noqa: E402
from proxy.model import Action, Decision, Effect, Exchange, PastCall, ToolCall  # noqa: E402
from proxy.policy.engine import PolicyEngine  # noqa: E402
from proxy.sessions.history import History, MemoryHistory, RedisHistory, entry  # noqa: E402
from proxy.sessions.redis_store import RedisStore  # noqa: E402
from tests.redis_server import free_port  # noqa: E402

PLAIN = """
tools: {web_fetch: {effect: read}, query_customers: {effect: read}}
rules:
  - id: no-prod-deletes
    match: {tool: "delete_*", args: {tags.env: {in: [production]}}}
    action: deny
  - id: no-drop
    match: {tool: drop_database}
    action: deny
  - id: big-resizes
    match: {tool: resize_volume, args: {size_gb: {gt: 1000}}}
    action: hold
"""
FLOWS = PLAIN + """
  - id: write-after-untrusted
    match: {effect: write, session: {after: {label: untrusted}}}
    action: hold
  - id: lethal-trifecta
    match: {label: external, session: {after: [{label: sensitive}, {label: untrusted}]}}
    action: deny
flows:
  labels:
    untrusted: [web_fetch]
    sensitive: [query_customers]
    external: [send_email]
"""
SIZES = (10, 100, 1000)
CALL = ToolCall("c", "update_record", '{"id": 7, "status": "closed"}',
                {"id": 7, "status": "closed"})


def engine(text: str, tmp: Path) -> PolicyEngine:
    path = tmp / "p.yaml"
    path.write_text(text)
    return PolicyEngine(config_mod.load(path, env={}).policy)


def history(n: int, with_read: bool) -> tuple[PastCall, ...]:
    """n calls, none labelled; with_read: an untrusted read in the middle."""
    out = [PastCall(f"d{i}", "get_weather", Effect.READ, Action.ALLOW, frozenset(),
                    at=1.0e9 + i, summary=f"get_weather(city='c{i}')") for i in range(n)]
    if with_read:
        out[n // 2] = PastCall("dr", "web_fetch", Effect.READ, Action.ALLOW,
                               frozenset({"untrusted"}), summary="web_fetch(url='x')")
    return tuple(out)


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        rounds.append((time.perf_counter() - started) / repeat)
    return statistics.median(rounds) * 1e6


def decide_rows(repeat: int, tmp: Path) -> None:
    plain, flows = engine(PLAIN, tmp), engine(FLOWS, tmp)
    tools = ("update_record",)
    print(f"{'policy decision (us per call)':<44}" + "".join(f"{n:>10}" for n in SIZES))
    base = Exchange("openai", "m", tools)
    cells = [per_call_us(lambda: plain.decide(CALL, base), repeat) for _ in SIZES]
    print(f"{'plain rules (history not read)':<44}" + "".join(f"{c:>10.1f}" for c in cells))
    for label, with_read in (("flow rules, no match (full scan)", False),
                             ("flow rules, untrusted read in it (hold)", True)):
        cells = []
        for n in SIZES:
            ex = Exchange("openai", "m", tools, history=history(n, with_read))
            cells.append(per_call_us(lambda ex=ex: flows.decide(CALL, ex), repeat))  # type: ignore[misc]
        print(f"{label:<44}" + "".join(f"{c:>10.1f}" for c in cells))


async def io_rows(repeat: int, redis_url: str | None) -> None:
    """Per answer: record its call, then (the next answer) load the history, the session
    holding n calls (keep = n, so it stays at n). `cold`: a replica's first load of a
    session it has not read before (every entry read and parsed)."""
    print(f"\n{'history I/O (us)':<44}" + "".join(f"{n:>10}" for n in SIZES))
    decided = Decision(Action.ALLOW, effect=Effect.WRITE, decision_id="x")
    store = RedisStore(redis_url) if redis_url is not None else None
    makers: list[tuple[str, Callable[[int], History]]] = [
        ("memory", lambda n: MemoryHistory(n, 3600))]
    if store is not None:
        client = store.client
        makers.append(("redis (loopback)", lambda n: RedisHistory(client, n, 3600)))
    reps = max(50, repeat // 20)
    for label, make in makers:
        steady, cold = [], []
        for n in SIZES:
            bucket = f"bench-{label}-{n}"
            hist = make(n)
            await hist.delete(bucket)
            await hist.record(bucket, history(n, True))
            times = []
            for i in range(reps):
                one = [replace(entry(CALL, decided, frozenset()), decision_id=f"x{i}")]
                started = time.perf_counter()
                await hist.record(bucket, one)
                await hist.load(bucket)
                times.append(time.perf_counter() - started)
            steady.append(statistics.median(times) * 1e6)
            times = []
            for _ in range(max(10, reps // 10)):
                fresh = make(n)
                started = time.perf_counter()
                await fresh.load(bucket)
                times.append(time.perf_counter() - started)
            cold.append(statistics.median(times) * 1e6)
            await hist.delete(bucket)
        print(f"{label + ': record 1 + load':<44}" + "".join(f"{c:>10.1f}" for c in steady))
        print(f"{label + ': cold load':<44}" + "".join(f"{c:>10.1f}" for c in cold))
    if store is not None:
        await store.close()


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        print("(redis-server not installed: Redis rows skipped)")
        return None, None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        decide_rows(repeat, tmp)
        proc, url = start_redis(tmp)
        try:
            asyncio.run(io_rows(repeat, url))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(5)


if __name__ == "__main__":
    main()
