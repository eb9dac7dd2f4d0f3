"""Benchmark: the latency tether adds in front of an OpenAI-compatible upstream.

One run starts a fake upstream (proxy/demo/fake_openai.py, fixed latency) and
`tether serve` as two child processes, then drives both from this process at a
fixed concurrency, alternating direct (client -> fake) and proxied
(client -> tether -> fake) phases so that machine noise falls on both alike.
It prints a table and writes bench/results/bench-<time>.json. See bench/README.md.

    .venv/bin/python bench/run.py [--concurrency 8] [--rounds 6] [--phase-seconds 2.5]
                                  [--workloads chat,stream,models] [--profile FILE]
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
    from proxy.demo.fake_base import serve_until_stopped
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
    await serve_until_stopped(fake.app())


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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# --- load

WORKLOADS = ("chat", "stream", "models")  # models: GET /models, an ungoverned pass-through


@dataclass
class Cell:
    """Samples of one (workload, target) pair, summed over all rounds."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process -> [user, sys]


def body(n: int, stream: bool) -> dict[str, Any]:
    ask = "delete the production volume" if n % DENY_EVERY == 0 else "weather in Paris?"
    return {"model": "gpt-fake", "stream": stream, "tools": TOOLS,
            "messages": [{"role": "user", "content": f"{ask} (request {n})"}]}


async def one(http: aiohttp.ClientSession, base: str, workload: str, n: int
              ) -> tuple[float, float | None]:
    """One request; returns (total latency, time to first content token) in seconds."""
    t0 = time.perf_counter()
    ttft: float | None = None
    if workload == "models":
        async with http.get(f"{base}/models") as resp:
            if resp.status != 200 or not (await resp.json())["data"]:
                raise RuntimeError(f"HTTP {resp.status}")
        return time.perf_counter() - t0, None
    stream = workload == "stream"
    async with http.post(f"{base}/chat/completions", json=body(n, stream)) as resp:
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


async def phase(http: aiohttp.ClientSession, base: str, workload: str, seconds: float,
                concurrency: int, cell: Cell | None) -> None:
    """`concurrency` closed-loop workers for `seconds` (results go to `cell` unless warm-up)."""
    counter = iter(range(MAX_REQUESTS_PER_PHASE))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        for n in counter:
            if time.perf_counter() >= deadline:
                return
            try:
                total, ttft = await one(http, base, workload, n)
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


async def measured(http: aiohttp.ClientSession, base: str, workload: str, args: argparse.Namespace,
                   cell: Cell, pids: dict[str, int]) -> None:
    """One phase, adding its wall time and each process's CPU time to `cell`."""
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    await phase(http, base, workload, args.phase_seconds, args.concurrency, cell)
    cell.seconds += time.perf_counter() - t0
    for name, pid in pids.items():
        used = cell.cpu.setdefault(name, [0.0, 0.0])
        for i, (after, before) in enumerate(zip(cpu_seconds(pid), cpu0[name], strict=True)):
            used[i] += after - before


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
            "req_per_s": len(cell.latency) / cell.seconds if cell.seconds else 0.0,
            **{f"cpu_{name}_cores": sum(u) / cell.seconds for name, u in cell.cpu.items()},
            **{f"cpu_{name}_{kind}_ms_per_req": 1000 * u[i] / max(len(cell.latency), 1)
               for name, u in cell.cpu.items() for i, kind in enumerate(("user", "sys"))}}


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
    lines.append("\nCPU, in cores busy: load generator + fake + tether = total (of the machine's)")
    procs = ("loadgen", "fake", "tether")
    for name, row in results.items():
        if name == "TTFT":  # the same requests as "stream latency"
            continue
        busy = [f"{target} " + " + ".join(f"{r[f'cpu_{p}_cores']:.2f}" for p in procs)
                + f" = {sum(r[f'cpu_{p}_cores'] for p in procs):.2f}"
                for target, r in row.items()]
        t = row["tether"]
        lines.append(f"  {name:<19}{'  |  '.join(busy)}  |  tether CPU/request "
                     f"{t['cpu_tether_user_ms_per_req']:.2f} user + "
                     f"{t['cpu_tether_sys_ms_per_req']:.2f} sys ms")
    return "\n".join(lines)


# --- main

async def start_children(args: argparse.Namespace, tmp: Path,
                         procs: list[asyncio.subprocess.Process]) -> dict[str, str]:
    """Start the fake upstream and tether; returns the base URL of each."""
    fake, line = await spawn(
        [sys.executable, __file__, "--serve-fake", "--first-delay-ms", str(args.first_delay_ms),
         "--event-delay-ms", str(args.event_delay_ms)], tmp / "fake.log")
    procs.append(fake)
    fake_port = int(line.split()[-1])
    (tmp / "tether.yaml").write_text(CONFIG.format(port=fake_port, audit=tmp / "audit.jsonl"))
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{fake_port}"}
    cmd = ([sys.executable, "-m", "cProfile", "-o", str(args.profile), "-m", "proxy"]
           if args.profile else [str(Path(sys.executable).parent / "tether")])
    tether, line = await spawn(
        [*cmd, "serve", "--config", str(tmp / "tether.yaml"), "--host", "127.0.0.1",
         "--port", "0", "--admin-port", "0"], tmp / "tether.log", env)
    procs.append(tether)
    proxy_port = int(line.split("http://127.0.0.1:")[1].split()[0])
    return {"direct": f"http://127.0.0.1:{fake_port}/v1",
            "tether": f"http://127.0.0.1:{proxy_port}/openai/v1"}


def audited(path: Path) -> dict[str, int]:
    actions: dict[str, int] = {}
    if not path.exists():
        return actions
    with path.open() as audit:
        for record in map(json.loads, audit):
            if record.get("kind") == "decision":
                actions[record["action"]] = actions.get(record["action"], 0) + 1
    return actions


async def bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    procs: list[asyncio.subprocess.Process] = []
    workloads = args.workloads.split(",")
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # -> finally
    try:
        bases = await start_children(args, tmp, procs)
        pids = {"loadgen": os.getpid(), "fake": procs[0].pid, "tether": procs[1].pid}
        print(f"pids {pids}; {bases}\nconcurrency {args.concurrency}, {args.rounds} rounds x "
              f"{len(workloads)} workloads x 2 targets x {args.phase_seconds}s", flush=True)
        cells = {(w, t): Cell() for w in workloads for t in bases}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:
            for workload in workloads:  # warm-up, discarded
                for base in bases.values():
                    await phase(http, base, workload, args.warmup_seconds, args.concurrency, None)
            for r in range(args.rounds):
                order = list(bases) if r % 2 == 0 else list(reversed(bases))
                for workload in workloads:
                    for target in order:
                        await measured(http, bases[target], workload, args,
                                       cells[(workload, target)], pids)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        rows = [("non-stream latency", "chat", "latency"), ("stream latency", "stream", "latency"),
                ("TTFT", "stream", "ttft"), ("GET /models", "models", "latency")]
        results = {name: {t: summary(cells[(w, t)], getattr(cells[(w, t)], attr)) for t in bases}
                   for name, w, attr in rows if w in workloads}
        actions = audited(tmp / "audit.jsonl")
        errors = sum(c.errors for c in cells.values())
        print(f"\n{table(results)}\n\nerrors: {errors}; audited decisions (with warm-up): "
              + ", ".join(f"{a} {n}" for a, n in sorted(actions.items())))
        out = HERE / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({
            "settings": vars(args), "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "results": results, "audited_decisions": actions,
        }, indent=2, default=str) + "\n")
        print(f"results written to {out}")
        failed = errors > 0 or (not actions.get("deny") and workloads != ["models"])
    finally:
        for proc in reversed(procs):
            await stop(proc)
    if failed:
        print(f"failed; child logs kept in {tmp}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp)
    return 0


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
    p.add_argument("--workloads", default="chat,stream",
                   help="comma-separated, of: chat (non-streaming), stream, models (GET "
                        "/models, which tether passes through ungoverned: the cost of the "
                        "extra HTTP hop alone). Default chat,stream")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="run tether under cProfile and write its stats to FILE "
                        "(inflates the proxied figures; for finding where time goes)")
    p.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.first_delay_ms / 1000, args.event_delay_ms / 1000))
        return 0
    if not (1 <= args.concurrency <= 256 and 1 <= args.rounds <= 100
            and 0 < args.phase_seconds <= 600 and 0 <= args.warmup_seconds <= 600):
        p.error("concurrency 1-256, rounds 1-100, phase/warm-up seconds up to 600")
    if not args.workloads or not set(args.workloads.split(",")) <= set(WORKLOADS):
        p.error(f"--workloads: a comma-separated subset of {','.join(WORKLOADS)}")
    try:
        return asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
