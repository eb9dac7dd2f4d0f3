"""Session store benchmark: memory for 100k sessions, and the cost of a budget check.

    .venv/bin/python bench/sessions.py [--sessions 100000] [--checks 5000]

1. Memory: 100k distinct sessions each reserve and settle one request in the
   memory store with session, agent and global budgets configured (the
   realistic shape: every session bucket holds five counters). Reported as the
   growth of the Python heap (tracemalloc) and of the process RSS.
2. Latency: the budget check a request pays (admit = tripped? + reserve, then
   settle), against the memory store and against a real redis-server on
   loopback started by this script, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.audit import AuditLog  # noqa: E402
from proxy.model import Usage  # noqa: E402
from proxy.sessions.budgets import Budgets, Limit, Scope  # noqa: E402
from proxy.sessions.guard import SessionGuard  # noqa: E402
from proxy.sessions.redis_store import RedisStore  # noqa: E402
from proxy.sessions.store import MemoryStore, Store  # noqa: E402
from proxy.telemetry import Metrics  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

BUDGETS = Budgets(
    session=Limit(Scope.SESSION, {"tokens": 200_000, "llm_calls": 50, "cost_usd": 5_000_000}),
    agent=Limit(Scope.AGENT, {"tokens": 10**12}, window_s=3600),
    global_=Limit(Scope.GLOBAL, {"cost_usd": 10**12}, window_s=86400),
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def guard(store: Store) -> SessionGuard:
    return SessionGuard(BUDGETS, store, Metrics(), AuditLog(None))


async def fill(g: SessionGuard, sessions: int) -> None:
    for i in range(sessions):
        a = await g.admit(agent=f"agent-{i % 10}", session=f"session-{i}", model="gpt-4o-mini",
                          body_bytes=600, max_output=256)
        await g.settle(a, Usage(180, 40))


async def memory_for(sessions: int) -> dict[str, float]:
    store = MemoryStore()
    g = guard(store)
    gc.collect()
    tracemalloc.start()
    before_rss = rss_mb()
    start = tracemalloc.get_traced_memory()[0]
    await fill(g, sessions)
    gc.collect()
    heap = (tracemalloc.get_traced_memory()[0] - start) / 2**20
    tracemalloc.stop()
    return {"sessions": sessions, "buckets": len(store), "heap_mb": round(heap, 1),
            "rss_growth_mb": round(rss_mb() - before_rss, 1)}


async def check_latency(g: SessionGuard, checks: int) -> dict[str, float]:
    samples: list[float] = []
    for i in range(checks):
        t = time.perf_counter()
        a = await g.admit(agent="bench", session=f"lat-{i % 500}", model="gpt-4o-mini",
                          body_bytes=600, max_output=256)
        await g.settle(a, Usage(180, 40))
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return {"p50_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(len(samples) * 0.99) - 1], 1),
            "mean_us": round(statistics.fmean(samples), 1)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--checks", type=int, default=5000)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {args.sessions} sessions, {args.checks} checks")
    mem = await memory_for(args.sessions)
    print(f"memory store: {mem['buckets']} buckets for {mem['sessions']} sessions: "
          f"heap +{mem['heap_mb']} MB, RSS +{mem['rss_growth_mb']} MB")
    if shutil.which("redis-server") is None:
        print("redis-server not installed: skipping the Redis latency run")
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            redis_store = RedisStore(server.url)
            memory_guard, redis_guard = guard(MemoryStore()), guard(redis_store)
            await check_latency(memory_guard, 200)   # warm up
            await check_latency(redis_guard, 200)
            rounds = []
            for _ in range(3):  # alternate so machine noise hits both alike
                rounds.append(("memory", await check_latency(memory_guard, args.checks // 3)))
                rounds.append(("redis", await check_latency(redis_guard, args.checks // 3)))
            for name in ("memory", "redis"):
                rs = [r for n, r in rounds if n == name]
                p50 = statistics.median(r["p50_us"] for r in rs)
                p99 = statistics.median(r["p99_us"] for r in rs)
                print(f"budget check (admit + settle), {name:6}: p50 {p50:7.1f} us, "
                      f"p99 {p99:7.1f} us")
            await redis_store.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
