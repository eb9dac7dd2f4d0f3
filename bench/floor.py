"""Benchmark: tether against the floor, a bare pass-through that parses nothing.

One run starts, as child processes, a fake OpenAI upstream that answers at once, a bare
aiohttp pass-through to it (no parsing: the least a Python proxy on this design can cost),
and `tether serve` (default config, an audit log, a deny rule), optionally a second tether
with `--workers N` on Redis. It drives each with wrk (C; not the bottleneck) at 1 and 16
connections, non-streamed and streamed, every other request's answer carrying a tool call
(and every tenth of those denied), in interleaved rounds (the target order alternates), and
measures TTFT at one connection with its own client. It prints the ratios to the floor:
throughput (target / floor) and added latency (target's p50 minus direct's, over the
floor's). See bench/README.md.

    .venv/bin/python bench/floor.py [--rounds 4] [--seconds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "delete_volume")]
CONFIG = """\
upstreams:
  openai: {{url: "http://127.0.0.1:{port}"}}
audit: {{path: "{audit}"}}
{store}
{defaults}
tools:
  get_weather: {{effect: read}}
rules:
  - id: no-prod-deletes
    match: {{tool: ["delete_*"], args: {{tags.env: {{in: [production]}}}}}}
    action: deny
    message: Deleting production resources is not allowed
"""
ASKS = ("weather in Paris?", "say hello", "weather in Rome?", "say hello",
        "weather in Oslo?", "say hello", "weather in Lima?", "say hello",
        "delete the production volume", "say hello")
WRK_SCRIPT = """\
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50": %%d, "p90": %%d, "p99": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def body(ask: str, stream: bool) -> dict[str, Any]:
    return {"model": "gpt-fake", "stream": stream, "tools": TOOLS,
            "messages": [{"role": "user", "content": ask}]}


# --- the children: a fake upstream and the floor (run.py-style --serve-* modes)

async def serve_fake() -> None:
    from proxy.demo.fake_openai import Body, Call, FakeOpenAI, Reply

    fake = FakeOpenAI(first_delay_s=0.0, delay_s=0.0)

    def script(b: Body) -> Reply:
        fake.requests.clear()
        fake.headers.clear()
        ask = str(b["messages"][-1]["content"])
        if ask.startswith("delete"):
            return Reply(calls=(Call("delete_volume",
                                     '{"id": "vol-1", "tags": {"env": "production"}}'),))
        if ask.startswith("weather"):
            return Reply(calls=(Call("get_weather", '{"city": "Paris", "unit": "celsius"}'),))
        return Reply(content="Hello! How can I help you today?")

    fake.script = script
    await _serve(fake.app())


async def serve_floor(upstream: str) -> None:
    """The floor: forwards method, path, headers and body, streams the answer back."""
    from aiohttp import web

    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        data = await request.read()
        async with session.request(request.method, upstream + request.path_qs, data=data,
                                   headers={"Content-Type": request.content_type}) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": up.content_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def started(_: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stopped(_: web.Application) -> None:
        if session is not None:
            await session.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(started)
    app.on_cleanup.append(stopped)
    await _serve(app)


async def _serve(app: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# --pin: the proxies measured (floor, every tether) share the last CPU, one at a time;
# wrk, the fake upstream and this script's TTFT client the others. Unpinned, the kernel
# places each process for a whole run, and a proxy that shares its core with wrk more
# often than another looks slower in every round of that run (bench/README.md).
PROXY_CPUS: set[int] | None = None


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | None = None,
          *, proxy: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    err = log.open("wb")
    cpus = PROXY_CPUS if proxy else None
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args} did not start; see {log}:\n{log.read_text()}")
    return proc, line.strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- load

def wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                          "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


async def ttft(url: str, seconds: float) -> list[float]:
    """Time to the first content chunk of streamed answers that carry text, one connection."""
    samples: list[float] = []
    stream_body = json.dumps(body("say hello", True)).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            first = None
            async with http.post(url, data=stream_body,
                                 headers={"Content-Type": "application/json"}) as r:
                async for line in r.content:
                    if first is None and b'"content":"' in line.replace(b" ", b""):
                        first = time.perf_counter() - started
                if r.status != 200 or first is None:
                    raise RuntimeError(f"{url}: status {r.status}, no content chunk")
            samples.append(first)
    return samples


def scripts(tmp: Path) -> dict[str, Path]:
    out = {}
    for stream in (False, True):
        bodies = ", ".join(json.dumps(json.dumps(body(a, stream))) for a in ASKS)
        path = tmp / f"{'stream' if stream else 'chat'}.lua"
        path.write_text(WRK_SCRIPT % bodies)
        out["stream" if stream else "chat"] = path
    return out


def redis_server(tmp: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def start(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]
          ) -> dict[str, str]:
    me = [sys.executable, __file__]
    fake, line = spawn([*me, "--serve-fake"], tmp / "fake.log")
    procs.append(fake)
    port = int(line.split()[-1])
    up = f"http://127.0.0.1:{port}"
    floor, line = spawn([*me, "--serve-floor", up], tmp / "floor.log", proxy=True)
    procs.append(floor)
    targets = {"direct": f"{up}/v1/chat/completions",
               "floor": f"http://127.0.0.1:{line.split()[-1]}/v1/chat/completions"}
    tether_bin = str(Path(sys.executable).parent / "tether")
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": up}
    setups = [("tether", 1, "store: memory")]
    if args.baseline:  # the same config on another source tree (git archive REV proxy)
        setups.append(("tether-base", 1, "store: memory"))
    if args.compare_loops:  # the same tether on asyncio's own loop instead of uvloop
        setups.append(("tether-asyncio", 1, "store: memory"))
    if args.workers > 1:
        redis = redis_server(tmp)
        if redis is None:
            print("no redis-server: --workers skipped", file=sys.stderr)
        else:
            procs.append(redis[0])
            store = f"store: redis://127.0.0.1:{redis[1]}/0"
            setups = [("tether-redis-w1", 1, store), (f"tether-redis-w{args.workers}",
                                                      args.workers, store)]
            if not args.workers_only:
                setups.insert(0, ("tether", 1, "store: memory"))
    for name, workers, store in setups:
        config = tmp / f"{name}.yaml"
        config.write_text(CONFIG.format(
            port=port, audit=tmp / f"{name}.jsonl", store=store,
            defaults=f"defaults: {{on_deny: {args.on_deny}}}" if args.on_deny else ""))
        serve = [sys.executable, "-m", "proxy"] if name == "tether-base" else [tether_bin]
        cmd = [*serve, "serve", "--config", str(config), "--host", "127.0.0.1",
               "--port", "0", "--admin-port", "0"]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        loop = {"TETHER_EVENT_LOOP": "asyncio"} if name.endswith("-asyncio") else {}
        base = {"PYTHONPATH": args.baseline} if name == "tether-base" else {}
        proc, line = spawn(cmd, tmp / f"{name}.log", {**env, **loop, **base},
                           cwd=args.baseline if base else None, proxy=True)
        procs.append(proc)
        proxy_port = int(line.split("http://127.0.0.1:")[1].split()[0])
        targets[name] = f"http://127.0.0.1:{proxy_port}/openai/v1/chat/completions"
    return targets


def summarise(cells: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {key: {k: statistics.median(r[k] for r in runs)
                  for k in ("rps", "p50", "p90", "p99", "errors")}
            for key, runs in cells.items()}


def paired(cells: dict[str, list[dict[str, float]]], ttfts: dict[str, list[float]],
           workloads: list[str], a: str, b: str) -> str:
    """`a` against `b` round by round (each round runs them back to back): the median
    and range of the per-round ratios, steadier than a ratio of medians on a machine
    whose speed drifts between minutes."""
    lines = [f"paired, {a} / {b} per round: median [min - max] over rounds"]
    for workload in workloads:
        for conns in (1, 16):
            ra = cells[f"{workload}/{conns}/{a}"]
            rb = cells[f"{workload}/{conns}/{b}"]
            rps = [x["rps"] / y["rps"] for x, y in zip(ra, rb, strict=True)]
            p50 = [x["p50"] / y["p50"] for x, y in zip(ra, rb, strict=True)]
            lines.append(f"  {workload:<6} {conns:>2} conn  req/s {statistics.median(rps):.3f} "
                         f"[{min(rps):.3f} - {max(rps):.3f}]   p50 {statistics.median(p50):.3f} "
                         f"[{min(p50):.3f} - {max(p50):.3f}]")
    if "stream" in workloads and ttfts[a] and ttfts[b]:
        lines.append(f"  TTFT p50 {statistics.median(ttfts[a]) / statistics.median(ttfts[b]):.3f}")
    return "\n".join(lines)


def report(summary: dict[str, dict[str, float]], ttfts: dict[str, list[float]],
           targets: list[str], workloads: list[str]) -> str:
    lines = []
    for workload in workloads:
        for conns in (1, 16):
            direct = summary[f"{workload}/{conns}/direct"]
            floor = summary[f"{workload}/{conns}/floor"]
            lines.append(f"{workload}, {conns} connection(s)")
            lines.append(f"  {'target':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                         f"{'added p50':>10} {'x floor':>8} {'rps/floor':>9}")
            floor_added = floor["p50"] - direct["p50"]
            for t in targets:
                s = summary[f"{workload}/{conns}/{t}"]
                added = s["p50"] - direct["p50"]
                ratio = added / floor_added if t not in ("direct", "floor") and floor_added else 0
                lines.append(
                    f"  {t:<18} {s['rps']:>8.0f} {s['p50'] / 1000:>8.3f} {s['p99'] / 1000:>8.3f} "
                    f"{added / 1000 if t != 'direct' else 0:>10.3f} "
                    f"{ratio:>8.2f} {s['rps'] / floor['rps']:>9.2f}")
    if "stream" not in workloads:
        return "\n".join(lines)
    lines.append("stream TTFT, 1 connection (p50 ms; added over direct)")
    d = statistics.median(ttfts["direct"])
    for t in targets:
        m = statistics.median(ttfts[t])
        lines.append(f"  {t:<18} {m * 1000:>8.3f}  added {max(0.0, m - d) * 1000:.3f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk phase")
    p.add_argument("--ttft-seconds", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=1,
                   help="also run tether --workers N and --workers 1, both on Redis")
    p.add_argument("--workers-only", action="store_true",
                   help="with --workers: skip the memory-store tether")
    p.add_argument("--compare-loops", action="store_true",
                   help="also run tether on asyncio's loop (TETHER_EVENT_LOOP=asyncio)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run tether from the source tree DIR (holding proxy/, e.g. "
                        "`git archive HEAD proxy | tar -x -C DIR`): before and after, one run")
    p.add_argument("--pin", action="store_true",
                   help="the proxies on the last CPU, wrk and the upstream on the others")
    p.add_argument("--only", choices=["chat", "stream"],
                   help="one workload (more rounds in the same time)")
    p.add_argument("--on-deny", choices=["continue", "rewrite", "error"], default=None,
                   help="defaults.on_deny for every tether (default: tether's own default)")
    p.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-floor", metavar="UPSTREAM", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake())
        return 0
    if args.serve_floor:
        asyncio.run(serve_floor(args.serve_floor))
        return 0
    if shutil.which("wrk") is None:
        print("error: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.pin:
        if args.workers > 1:
            print("error: --pin gives the proxies one CPU; --workers wants them all",
                  file=sys.stderr)
            return 2
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("error: --pin needs two CPUs", file=sys.stderr)
            return 2
        global PROXY_CPUS
        PROXY_CPUS = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # this script, wrk, the fake upstream
    tmp = Path(tempfile.mkdtemp(prefix="tether-floor-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        targets = start(args, tmp, procs)
        lua = scripts(tmp)
        names = list(targets)
        workloads = [args.only] if args.only else ["chat", "stream"]
        for workload in workloads:  # warm-up, discarded: twice, the first runs are slower
            for t in names + names[::-1]:
                wrk(targets[t], lua[workload], 16, 1)
        cells: dict[str, list[dict[str, float]]] = {}
        ttfts: dict[str, list[float]] = {t: [] for t in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for workload in workloads:
                for conns in (1, 16):
                    for t in order:
                        result = wrk(targets[t], lua[workload], conns, args.seconds)
                        if result["errors"]:
                            raise RuntimeError(f"{t} {workload}/{conns}: {result}")
                        cells.setdefault(f"{workload}/{conns}/{t}", []).append(result)
            for t in order if "stream" in workloads else ():
                ttfts[t] += asyncio.run(ttft(targets[t], args.ttft_seconds))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        summary = summarise(cells)
        print(report(summary, ttfts, names, workloads))
        if "tether-base" in names:
            print(paired(cells, ttfts, workloads, "tether", "tether-base"))
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"floor-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
            json.dumps({"summary": summary, "ttft": ttfts}, indent=1))
    finally:
        for proc in reversed(procs):
            stop(proc)
    for name in targets if "targets" in dir() else ():
        if name.startswith("tether"):
            # --workers N: one chain per worker (name.w0.jsonl ...)
            files = [tmp / f"{name}.jsonl", *sorted(tmp.glob(f"{name}.w*.jsonl"))]
            n = sum(sum(1 for _ in f.open()) for f in files if f.exists())
            print(f"{name}: {n} audit records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
