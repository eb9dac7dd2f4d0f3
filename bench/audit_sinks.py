"""What shipping the audit log costs a governed decision, side by side with file-only audit.

    .venv/bin/python bench/audit_sinks.py [--calls 3000] [--rounds 4]

The governor's decision (policy, audit record, metrics) runs on an asyncio loop, as in
`tether serve`, and each decision is followed by one turn of the loop (`sleep(0)`), where
the shipper's tasks run; a decision is timed alone (`decide`) and with that turn (`turn`):
the turn is what a governed call on the same loop would wait for the shipper. Set-ups,
alternated round by round (ABBA):

    file only              the local log (fsync interval), no sinks
    http, fast receiver    + an HTTP batch sink to a receiver that answers at once
    http, slow receiver    + an HTTP batch sink to a receiver that answers in 2 s
    http, receiver down    + an HTTP batch sink to a port nobody listens on (backoff)
    otlp, fast receiver    + an OTLP/HTTP sink to a receiver that answers at once

The receivers are another process (this script, `--receiver`), so their work is not
counted here. A sink's shipper runs only during its own set-up's rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web  # noqa: E402

from proxy import config as config_mod  # noqa: E402
from proxy.audit import AuditLog  # noqa: E402
from proxy.audit.shipper import Shipper  # noqa: E402
from proxy.governor import Governor  # noqa: E402
from proxy.model import Exchange, ToolCall  # noqa: E402
from proxy.policy.engine import PolicyEngine  # noqa: E402
from proxy.telemetry import Metrics  # noqa: E402

RULES = Path(__file__).resolve().parent.parent / "proxy" / "demo" / "janitor.yaml"
ARGS = {"volume_id": "vol-0b2", "tags": {"env": "production-candidate"}, "password": "hunter2"}


def serve_receiver(port: int, delay: float) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=204)

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the receiver on {port} did not start")


class Setup:
    def __init__(self, name: str, directory: Path, engine: PolicyEngine, sinks: str) -> None:
        self.name = name
        path = directory / f"{name.replace(' ', '-').replace(',', '')}.jsonl"
        cfg = directory / f"{path.stem}.yaml"
        cfg.write_text(f"audit:\n  path: {path}\n  fsync: interval\n{sinks}")
        self.config = config_mod.load(cfg, env={})
        self.path = path
        metrics = Metrics()
        self.audit = AuditLog(str(path), self.config.audit, metrics)
        self.governor = Governor(engine, self.audit, metrics, None)
        self.metrics = metrics
        self.shipper: Shipper | None = None

    async def run(self, calls: int, decide: list[float], turn: list[float]) -> None:
        if self.config.audit_shipping.sinks:
            self.shipper = Shipper(self.path, self.config.audit_shipping, self.metrics)
            self.audit.spool = self.shipper
            self.shipper.start()
        raw = json.dumps(ARGS)
        exchange = Exchange(provider="openai", model="gpt-4o-mini", agent="janitor", session="s",
                            declared_tools=("delete_volume",))
        for i in range(calls):
            call = ToolCall(id=f"c{i}", name="delete_volume", raw_arguments=raw, arguments=ARGS)
            t = time.perf_counter()
            self.governor.decide(call, exchange, request_id="r")
            t1 = time.perf_counter()
            await asyncio.sleep(0)
            t2 = time.perf_counter()
            decide.append((t1 - t) * 1e6)
            turn.append((t2 - t) * 1e6)
        if self.shipper is not None:
            await self.shipper.close()  # stopped mid-flight: its cursor says where to go on

    def shipped(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect()
                   if m.name == "tether_audit_records_shipped" for s in m.samples
                   if s.name.endswith("_total"))


async def bench(args: argparse.Namespace, fast: int, slow: int, down: int) -> None:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        directory = Path(tmp)
        cfg_file = directory / "rules.yaml"
        cfg_file.write_text(f"include: [{RULES}]\naudit: {{path: null}}\n")
        engine = PolicyEngine(config_mod.load(cfg_file, env={}).policy)

        def sink(kind: str, port: int) -> str:
            key = "endpoint" if kind == "otlp" else "url"
            return (f"  spool: {{poll_interval: 100ms}}\n  sinks:\n    - {{type: {kind}, "
                    f"{key}: 'http://127.0.0.1:{port}/v1/logs', timeout: 10s}}\n")

        setups = [
            Setup("file only", directory, engine, ""),
            Setup("http, fast receiver", directory, engine, sink("http", fast)),
            Setup("http, slow receiver", directory, engine, sink("http", slow)),
            Setup("http, receiver down", directory, engine, sink("http", down)),
            Setup("otlp, fast receiver", directory, engine, sink("otlp", fast)),
        ]
        decide: dict[str, list[float]] = {s.name: [] for s in setups}
        turn: dict[str, list[float]] = {s.name: [] for s in setups}
        for s in setups:
            await s.run(200, [], [])  # warm up
        for r in range(args.rounds):
            for s in setups if r % 2 == 0 else list(reversed(setups)):
                await s.run(args.calls, decide[s.name], turn[s.name])
        print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.calls} decisions "
              "each; microseconds")
        print(f"{'set-up':22} {'decide p50':>10} {'p99':>7} {'turn p50':>9} {'p99':>7} "
              f"{'p99.9':>8} {'max':>8} {'shipped':>8}")
        for s in setups:
            d, t = sorted(decide[s.name]), sorted(turn[s.name])
            print(f"{s.name:22} {statistics.median(d):10.1f} {d[int(len(d) * .99)]:7.1f} "
                  f"{statistics.median(t):9.1f} {t[int(len(t) * .99)]:7.1f} "
                  f"{t[int(len(t) * .999)]:8.1f} {t[-1]:8.1f} {s.shipped():8.0f}")
            s.audit.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--receiver", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver is not None:
        serve_receiver(args.receiver, args.delay)
        return
    if not (1 <= args.calls <= 1_000_000 and 1 <= args.rounds <= 100):
        raise SystemExit("calls 1-1000000, rounds 1-100")
    logging.getLogger("tether.audit.shipper").setLevel(logging.ERROR)  # "receiver down" warnings
    fast, slow, down = free_port(), free_port(), free_port()
    receivers = [subprocess.Popen([sys.executable, __file__, "--receiver", str(port),
                                   "--delay", str(delay)])
                 for port, delay in ((fast, 0.0), (slow, 2.0))]
    try:
        wait_listening(fast)
        wait_listening(slow)
        asyncio.run(bench(args, fast, slow, down))
    finally:
        for p in receivers:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
