"""Benchmark: the latency tether adds in front of an OpenAI-compatible upstream.

One run starts a fake upstream (proxy/demo/fake_openai.py, fixed latency) and
`tether serve` as two child processes, then drives both from this process at a
fixed concurrency, alternating direct (client -> fake) and proxied
(client -> tether -> fake) phases so that machine noise falls on both alike.
It prints a table and writes bench/results/bench-<time>.json.

    .venv/bin/python bench/run.py [--rounds 6] [--phase-seconds 2.5] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "delete_volume")]
TEXT = "Let me look up the current weather in Paris for you."
DENY_EVERY = 10  # every 10th request asks for a call that the policy denies
MAX_REQUESTS_PER_PHASE = 200_000
CONFIG = """\
upstreams:
  openai: {{url: "http://127.0.0.1:{port}"}}
audit: {{path: "{audit}"}}
tools:
  get_weather: {{effect: read}}
rules:
  - id: no-prod-deletes
    match: {{tool: ["delete_*"], args: {{tags.env: {{in: [production]}}}}}}
    action: deny
    message: Deleting production resources is not allowed
"""


# --- the fake upstream (runs in its own process: run.py --serve-fake)

async def serve_fake(first_delay_s: float, delay_s: float) -> None:
    from aiohttp import web

    from proxy.demo.fake_openai import Body, Call, FakeOpenAI, Reply

    fake = FakeOpenAI(first_delay_s=first_delay_s, delay_s=delay_s)

    def script(body: Body) -> Reply:
        fake.requests.clear()  # the fake records every request; keep memory flat
        fake.headers.clear()
        if str(body["messages"][-1]["content"]).startswith("delete"):
            call = Call("delete_volume", '{"id": "vol-1", "tags": {"env": "production"}}')
        else:
            call = Call("get_weather", '{"city": "Paris", "unit": "celsius"}')
        return Reply(content=TEXT if body.get("stream") else None, calls=(call,))

    fake.script = script
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"fake on {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# --- child processes

async def spawn(args: list[str], log: Path, env: dict[str, str] | None = None
                ) -> tuple[asyncio.subprocess.Process, str]:
    """Start a child; return it and its first stdout line (which names its port)."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=err, env=env)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
    except TimeoutError:
        line = b""
    if not line:
        await stop(proc)
        raise RuntimeError(f"{args[0]} did not start; see {log}:\n{log.read_text()}")
    return proc, line.decode().strip()


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- load

@dataclass
class Cell:
    """Samples of one (workload, target) pair, over all rounds."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0


def body(n: int, stream: bool) -> dict[str, Any]:
    ask = "delete the production volume" if n % DENY_EVERY == 0 else "weather in Paris?"
    return {"model": "gpt-fake", "stream": stream, "tools": TOOLS,
            "messages": [{"role": "user", "content": f"{ask} (request {n})"}]}


async def one(http: aiohttp.ClientSession, url: str, n: int, stream: bool
              ) -> tuple[float, float | None]:
    """One request; returns (total latency, time to first content token) in seconds."""
    t0 = time.perf_counter()
    ttft: float | None = None
    async with http.post(url, json=body(n, stream)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        if not stream:
            msg = (await resp.json())["choices"][0]["message"]
            if not msg.get("tool_calls") and not msg.get("content"):
                raise RuntimeError("empty answer")
            return time.perf_counter() - t0, None
        done = False
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                done = True
            elif ttft is None:
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        if not done or ttft is None:
            raise RuntimeError("stream ended without content or [DONE]")
        return time.perf_counter() - t0, ttft


async def phase(http: aiohttp.ClientSession, url: str, stream: bool, seconds: float,
                concurrency: int, cell: Cell | None) -> None:
    """`concurrency` closed-loop workers for `seconds` (results go to `cell` unless warm-up)."""
    counter = iter(range(MAX_REQUESTS_PER_PHASE))
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        for n in counter:
            if time.perf_counter() >= deadline:
                return
            try:
                total, ttft = await one(http, url, n, stream)
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError, KeyError) as e:
                if cell is None:
                    raise
                cell.errors += 1
                print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            if cell is not None:
                cell.latency.append(total)
                if ttft is not None:
                    cell.ttft.append(ttft)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if cell is not None:
        cell.seconds += time.perf_counter() - start


# --- reporting

def pct(samples: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), in milliseconds."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(cell: Cell, samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "errors": cell.errors, "p50_ms": pct(samples, 50),
            "p90_ms": pct(samples, 90), "p99_ms": pct(samples, 99), "max_ms": pct(samples, 100),
            "req_per_s": len(cell.latency) / cell.seconds if cell.seconds else 0.0}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    head = (f"{'(ms)':<20}{'direct p50':>11}{'p99':>8}{'tether p50':>12}{'p99':>8}"
            f"{'added p50':>11}{'p99':>8}{'req/s direct':>14}{'tether':>8}")
    lines = [head, "-" * len(head)]
    for name, row in results.items():
        d, t = row["direct"], row["tether"]
        lines.append(f"{name:<20}{d['p50_ms']:>11.2f}{d['p99_ms']:>8.2f}{t['p50_ms']:>12.2f}"
                     f"{t['p99_ms']:>8.2f}{t['p50_ms'] - d['p50_ms']:>11.2f}"
                     f"{t['p99_ms'] - d['p99_ms']:>8.2f}{d['req_per_s']:>14.0f}"
                     f"{t['req_per_s']:>8.0f}")
    return "\n".join(lines)


# --- main

async def bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        fake, line = await spawn(
            [sys.executable, __file__, "--serve-fake", "--first-delay-ms", str(args.first_delay_ms),
             "--event-delay-ms", str(args.event_delay_ms)], tmp / "fake.log")
        procs.append(fake)
        fake_port = int(line.split()[-1])
        (tmp / "tether.yaml").write_text(CONFIG.format(port=fake_port, audit=tmp / "audit.jsonl"))
        env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{fake_port}"}
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        tether, line = await spawn(
            [sys.executable, *profile, "-m", "proxy", "serve", "--config",
             str(tmp / "tether.yaml"), "--host", "127.0.0.1", "--port", "0",
             "--admin-port", "0"], tmp / "tether.log", env)
        procs.append(tether)
        proxy_port = int(line.split("http://127.0.0.1:")[1].split()[0])
        urls = {"direct": f"http://127.0.0.1:{fake_port}/v1/chat/completions",
                "tether": f"http://127.0.0.1:{proxy_port}/openai/v1/chat/completions"}
        print(f"fake upstream pid {fake.pid} port {fake_port}; tether pid {tether.pid} port "
              f"{proxy_port}; concurrency {args.concurrency}, {args.rounds} rounds x "
              f"{args.phase_seconds}s per phase", flush=True)

        cells = {(s, t): Cell() for s in (False, True) for t in urls}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for stream in (False, True):  # warm-up (discarded)
                for url in urls.values():
                    await phase(http, url, stream, args.warmup_seconds, args.concurrency, None)
            tether_cpu = 0.0
            for r in range(args.rounds):
                order = list(urls) if r % 2 == 0 else list(reversed(urls))
                for stream in (False, True):
                    for target in order:
                        cpu0 = cpu_seconds(tether.pid)
                        await phase(http, urls[target], stream, args.phase_seconds,
                                    args.concurrency, cells[(stream, target)])
                        if target == "tether":
                            tether_cpu += cpu_seconds(tether.pid) - cpu0
                print(f"round {r + 1}/{args.rounds} done", flush=True)

        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, stream, attr in (("non-stream latency", False, "latency"),
                                   ("stream latency", True, "latency"),
                                   ("TTFT", True, "ttft")):
            results[name] = {t: summary(cells[(stream, t)], getattr(cells[(stream, t)], attr))
                             for t in urls}
        proxied = sum(len(cells[(s, "tether")].latency) for s in (False, True))
        actions: dict[str, int] = {}
        with (tmp / "audit.jsonl").open() as audit:
            for record in map(json.loads, audit):
                if record.get("kind") == "decision":
                    actions[record["action"]] = actions.get(record["action"], 0) + 1
        print()
        print(table(results))
        print(f"\ntether CPU time: {1000 * tether_cpu / max(proxied, 1):.2f} ms per proxied "
              f"request ({proxied} requests); errors: "
              f"{sum(c.errors for c in cells.values())}; audited decisions (with warm-up): "
              + ", ".join(f"{a} {n}" for a, n in sorted(actions.items())))
        out = HERE / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({
            "settings": vars(args), "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "results": results,
            "tether_cpu_ms_per_request": 1000 * tether_cpu / max(proxied, 1),
            "audited_decisions": actions,
        }, indent=2) + "\n")
        print(f"results written to {out}")
        failed = any(c.errors for c in cells.values()) or not actions.get("deny")
    finally:
        for proc in reversed(procs):
            await stop(proc)
    shutil.rmtree(tmp)  # kept when the run failed, for the child logs
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--phase-seconds", type=float, default=2.5,
                   help="length of one (workload, target) phase (default 2.5)")
    p.add_argument("--warmup-seconds", type=float, default=1.5, help="per phase (default 1.5)")
    p.add_argument("--first-delay-ms", type=float, default=20.0,
                   help="fake upstream latency before answering (default 20)")
    p.add_argument("--event-delay-ms", type=float, default=1.0,
                   help="fake upstream pause between SSE events (default 1)")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="run tether under cProfile and write its stats to FILE "
                        "(inflates the proxied figures; for finding where time goes)")
    p.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.first_delay_ms / 1000, args.event_delay_ms / 1000))
        return 0
    if not (1 <= args.concurrency <= 256 and 1 <= args.rounds <= 100
            and 0 < args.phase_seconds <= 600):
        p.error("concurrency 1-256, rounds 1-100, phase-seconds in (0, 600]")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
