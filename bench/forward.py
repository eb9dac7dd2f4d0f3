"""Benchmark: the latency tether's forward proxy (HTTP_PROXY mode) adds to tool-API calls.

One run starts a fake tool API (a small aiohttp app answering a small JSON body
after a fixed delay, on a plain HTTP port and on a TLS port with its own CA)
and `tether serve --forward-port` as two child processes, then drives both from
this process at a fixed concurrency, alternating direct and proxied phases
(ABBA) so that machine noise falls on both alike:

- http:  client -> fake (plain HTTP)  vs  client -> tether (proxy request) -> fake
- https: client -> fake (TLS)         vs  client -> CONNECT tether (TLS with tether's CA,
                                          mitmproxy) -> TLS -> fake

The fake's host (`localhost`) is a `pass_hosts` entry, so this measures the
forward path itself (mitmproxy, target checks, TLS interception), not policy.
Clients keep their connections alive (--per-connection N closes each after N
requests, on both sides alike; 0, the default, never does).
It prints a table and writes bench/results/forward-<time>.json. See bench/README.md.

    .venv/bin/python bench/forward.py [--concurrency 4] [--rounds 6] [--phase-seconds 2.5]
                                      [--delay-ms 5] [--per-connection 0] [--workloads http,https]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import cpu_seconds, pct, spawn, stop  # noqa: E402  (bench/run.py, this directory)

from tests.fakes.tls import make_fake_ca  # noqa: E402

HERE = Path(__file__).resolve().parent
HOST = "localhost"  # the name the client asks for: a pass_hosts entry, and on the fake's certificate
MAX_REQUESTS_PER_PHASE = 200_000
WORKLOADS = ("http", "https")
TARGETS = ("direct", "proxy")
CONFIG = """\
audit: {{path: "{audit}"}}
forward:
  ca_dir: "{ca_dir}"
  upstream_ca: "{upstream_ca}"
  pass_hosts: [localhost]
  allow_private: [127.0.0.1, localhost]
"""


# --- the fake tool API (runs in its own process: forward.py --serve-fake)

async def serve_fake(delay_s: float, cert: str, key: str) -> None:
    from aiohttp import web

    peers: set[tuple[str, str]] = set()  # (scheme, client address:port): connections seen

    async def item(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peers.add((request.scheme, str(peer)))
        await asyncio.sleep(delay_s)
        n = request.query.get("n", "")
        return web.json_response({"id": f"item-{n}", "n": n, "status": "open", "owner": "ops",
                                  "tags": ["bench", "tool-api"], "updated": "2026-11-25T00:00:00Z"})

    async def stats(request: web.Request) -> web.Response:
        """Connections seen since the last call, per scheme; then forget them."""
        counts = {s: sum(1 for p in peers if p[0] == s) for s in ("http", "https")}
        peers.clear()
        return web.json_response(counts)

    app = web.Application()
    app.router.add_get("/api/items", item)
    app.router.add_get("/_stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    plain_site = web.TCPSite(runner, "127.0.0.1", 0)
    tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await plain_site.start()
    await tls_site.start()
    ports = [addr[1] for addr in runner.addresses]
    print(f"fake on {ports[0]} {ports[1]}", flush=True)
    stop_event = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop_event.set)
    await stop_event.wait()
    await runner.cleanup()


# --- load

@dataclass(frozen=True)
class Target:
    url: str                     # http(s)://localhost:PORT/api/items
    proxy: str | None            # tether's HTTP_PROXY URL, or None for direct
    ssl: ssl.SSLContext | bool   # what the client trusts (True: default, unused for http)


@dataclass
class Cell:
    """Samples of one (workload, target) pair, summed over all rounds."""

    latency: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    upstream_connections: int = 0
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process -> [user, sys]


async def one(http: aiohttp.ClientSession, target: Target, n: int, last: bool) -> float:
    """One request; `last`: ask for the connection to be closed after it."""
    t0 = time.perf_counter()
    async with http.get(target.url, params={"n": str(n)}, proxy=target.proxy, ssl=target.ssl,
                        headers={"Connection": "close"} if last else None) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        if (await resp.json()).get("n") != str(n):
            raise RuntimeError("answer is not for this request")
    return time.perf_counter() - t0


async def phase(target: Target, seconds: float, concurrency: int, per_connection: int,
                cell: Cell | None) -> None:
    """`concurrency` closed-loop workers for `seconds` (results go to `cell` unless warm-up).

    Each worker has its own session with one keep-alive connection, which it closes
    (`Connection: close`) after `per_connection` requests (0: never)."""
    counter = iter(range(MAX_REQUESTS_PER_PHASE))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not reroute "direct"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=10)) as http:
            await work(http)

    async def work(http: aiohttp.ClientSession) -> None:
        sent = 0
        for n in counter:
            if time.perf_counter() >= deadline:
                return
            sent += 1
            try:
                latency = await one(http, target, n, per_connection > 0 and sent % per_connection == 0)
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
                if cell is None:
                    raise
                cell.errors += 1
                print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            if cell is not None:
                cell.latency.append(latency)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fake_connections(http: aiohttp.ClientSession, plain_port: int, scheme: str) -> int:
    """New connections the fake saw for `scheme` since the last call (and reset)."""
    async with http.get(f"http://127.0.0.1:{plain_port}/_stats") as resp:
        counts: dict[str, int] = await resp.json()
    return counts[scheme]  # /_stats requests themselves are not counted


# --- reporting

def summary(cell: Cell) -> dict[str, float]:
    n = max(len(cell.latency), 1)
    return {"n": len(cell.latency), "errors": cell.errors, "p50_ms": pct(cell.latency, 50),
            "p90_ms": pct(cell.latency, 90), "p99_ms": pct(cell.latency, 99),
            "max_ms": pct(cell.latency, 100),
            "req_per_s": len(cell.latency) / cell.seconds if cell.seconds else 0.0,
            "upstream_connections": cell.upstream_connections,
            **{f"cpu_{name}_cores": sum(u) / cell.seconds for name, u in cell.cpu.items()},
            **{f"cpu_{name}_{kind}_ms_per_req": 1000 * u[i] / n
               for name, u in cell.cpu.items() for i, kind in enumerate(("user", "sys"))}}


ROW_NAMES = {"http": "HTTP (proxy request)", "https": "HTTPS (CONNECT+MITM)"}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    head = (f"{'(ms)':<22}{'direct p50':>11}{'p99':>8}{'proxy p50':>11}{'p99':>8}"
            f"{'added p50':>11}{'p99':>8}{'req/s direct':>14}{'proxy':>8}")
    lines = [head, "-" * len(head)]
    for w, row in results.items():
        d, t = row["direct"], row["proxy"]
        lines.append(f"{ROW_NAMES[w]:<22}{d['p50_ms']:>11.2f}{d['p99_ms']:>8.2f}"
                     f"{t['p50_ms']:>11.2f}{t['p99_ms']:>8.2f}{t['p50_ms'] - d['p50_ms']:>11.2f}"
                     f"{t['p99_ms'] - d['p99_ms']:>8.2f}{d['req_per_s']:>14.0f}"
                     f"{t['req_per_s']:>8.0f}")
    lines.append("\nCPU, in cores busy: load generator + fake + tether = total (of the machine's)")
    procs = ("loadgen", "fake", "tether")
    for w, row in results.items():
        busy = [f"{target} " + " + ".join(f"{r[f'cpu_{p}_cores']:.2f}" for p in procs)
                + f" = {sum(r[f'cpu_{p}_cores'] for p in procs):.2f}"
                for target, r in row.items()]
        t = row["proxy"]
        lines.append(f"  {ROW_NAMES[w]:<21}{'  |  '.join(busy)}  |  tether CPU/request "
                     f"{t['cpu_tether_user_ms_per_req']:.2f} user + "
                     f"{t['cpu_tether_sys_ms_per_req']:.2f} sys ms")
    lines.append("\nTCP connections the fake accepted during measured phases (keep-alive check):")
    for w, row in results.items():
        lines.append(f"  {ROW_NAMES[w]:<21}" + "  |  ".join(
            f"{target} {int(r['upstream_connections'])} for {int(r['n'])} requests"
            for target, r in row.items()))
    return "\n".join(lines)


# --- main

async def start_children(args: argparse.Namespace, tmp: Path,
                         procs: list[asyncio.subprocess.Process]) -> dict[str, Any]:
    """Start the fake and tether; return the ports, the proxy URL and tether's CA file."""
    fake_ca = make_fake_ca(tmp / "fake-ca", names=(HOST,))
    fake, line = await spawn(
        [sys.executable, __file__, "--serve-fake", "--delay-ms", str(args.delay_ms),
         "--cert", str(fake_ca.cert_file), "--key", str(fake_ca.key_file)], tmp / "fake.log")
    procs.append(fake)
    http_port, https_port = (int(p) for p in line.split()[-2:])
    config = tmp / "tether.yaml"
    config.write_text(CONFIG.format(audit=tmp / "audit.jsonl", ca_dir=tmp / "tether-ca",
                                    upstream_ca=fake_ca.ca_file))
    tether_bin = str(Path(sys.executable).parent / "tether")
    export = await asyncio.create_subprocess_exec(  # as a user would: `tether ca export`
        tether_bin, "ca", "export", "--config", str(config), stdout=asyncio.subprocess.PIPE)
    pem, _ = await asyncio.wait_for(export.communicate(), 60)
    if export.returncode != 0 or b"BEGIN CERTIFICATE" not in pem:
        raise RuntimeError("tether ca export failed")
    (tmp / "tether-ca.pem").write_bytes(pem)
    tether, line = await spawn(
        [tether_bin, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0",
         "--admin-port", "0", "--forward-port", "0"], tmp / "tether.log")
    procs.append(tether)
    forward_port = int(line.split("HTTP_PROXY on http://127.0.0.1:")[1].split()[0])
    return {"http_port": http_port, "https_port": https_port,
            "proxy": f"http://127.0.0.1:{forward_port}", "fake_ca": fake_ca.ca_file,
            "tether_ca": tmp / "tether-ca.pem"}


def targets(ports: dict[str, Any]) -> dict[tuple[str, str], Target]:
    trust_fake = ssl.create_default_context(cafile=str(ports["fake_ca"]))
    trust_tether = ssl.create_default_context(cafile=str(ports["tether_ca"]))
    http_url = f"http://{HOST}:{ports['http_port']}/api/items"
    https_url = f"https://{HOST}:{ports['https_port']}/api/items"
    return {("http", "direct"): Target(http_url, None, True),
            ("http", "proxy"): Target(http_url, ports["proxy"], True),
            ("https", "direct"): Target(https_url, None, trust_fake),
            ("https", "proxy"): Target(https_url, ports["proxy"], trust_tether)}


async def bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-forward-"))
    procs: list[asyncio.subprocess.Process] = []
    workloads = args.workloads.split(",")
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # -> finally
    failed = True
    try:
        ports = await start_children(args, tmp, procs)
        pids = {"loadgen": os.getpid(), "fake": procs[0].pid, "tether": procs[1].pid}
        plan = targets(ports)
        print(f"pids {pids}; fake http {ports['http_port']} https {ports['https_port']}, "
              f"HTTP_PROXY {ports['proxy']}\nconcurrency {args.concurrency}, {args.rounds} "
              f"rounds x {len(workloads)} workloads x 2 targets x {args.phase_seconds}s", flush=True)
        cells = {(w, t): Cell() for w in workloads for t in TARGETS}
        async with aiohttp.ClientSession(trust_env=False) as http:  # for /_stats only
            for w in workloads:  # warm-up, discarded; any error stops the run
                for t in TARGETS:
                    try:
                        await phase(plan[(w, t)], args.warmup_seconds, args.concurrency,
                                    args.per_connection, None)
                    except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
                        raise RuntimeError(f"warm-up {w} {t} failed: {type(e).__name__}: {e}"
                                           ) from e
            for r in range(args.rounds):
                order = TARGETS if r % 2 == 0 else TARGETS[::-1]
                for w in workloads:
                    for t in order:
                        cell = cells[(w, t)]
                        await fake_connections(http, ports["http_port"], w)  # reset
                        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                        t0 = time.perf_counter()
                        await phase(plan[(w, t)], args.phase_seconds, args.concurrency,
                                    args.per_connection, cell)
                        cell.seconds += time.perf_counter() - t0
                        for name, pid in pids.items():
                            used = cell.cpu.setdefault(name, [0.0, 0.0])
                            for i, (a, b) in enumerate(zip(cpu_seconds(pid), cpu0[name],
                                                           strict=True)):
                                used[i] += a - b
                        cell.upstream_connections += await fake_connections(
                            http, ports["http_port"], w)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        results = {w: {t: summary(cells[(w, t)]) for t in TARGETS} for w in workloads}
        errors = sum(c.errors for c in cells.values())
        print(f"\n{table(results)}\n\nerrors: {errors}")
        out = HERE / "results" / time.strftime("forward-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({
            "settings": vars(args), "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "aiohttp": aiohttp.__version__, "platform": platform.platform(), "results": results,
        }, indent=2, default=str) + "\n")
        print(f"results written to {out}")
        failed = errors > 0
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
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--phase-seconds", type=float, default=2.5,
                   help="length of one (workload, target) phase (default 2.5)")
    p.add_argument("--warmup-seconds", type=float, default=1.5, help="per phase (default 1.5)")
    p.add_argument("--delay-ms", type=float, default=5.0,
                   help="fake tool API latency before answering (default 5)")
    p.add_argument("--per-connection", type=int, default=0, metavar="N",
                   help="requests per client connection before the client closes it "
                        "(0, the default: keep it open)")
    p.add_argument("--workloads", default="http,https",
                   help="comma-separated, of: http (plain proxy request), https (CONNECT, "
                        "tether terminates TLS with its CA). Default http,https")
    p.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.delay_ms / 1000, args.cert, args.key))
        return 0
    if not (1 <= args.concurrency <= 256 and 1 <= args.rounds <= 100
            and 0 < args.phase_seconds <= 600 and 0 <= args.warmup_seconds <= 600
            and 0 <= args.delay_ms <= 10_000 and 0 <= args.per_connection <= 1_000_000):
        p.error("concurrency 1-256, rounds 1-100, phase/warm-up seconds up to 600, delay-ms "
                "0-10000, per-connection 0-1000000")
    if not args.workloads or not set(args.workloads.split(",")) <= set(WORKLOADS):
        p.error(f"--workloads: a comma-separated subset of {','.join(WORKLOADS)}")
    try:
        return asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except RuntimeError as e:  # a child did not start, or the warm-up failed
        print(f"failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
