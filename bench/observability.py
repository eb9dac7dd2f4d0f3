"""What auditing and tracing cost per tool-call decision, measured side by side.

    .venv/bin/python bench/observability.py [--calls 4000] [--rounds 5]

The governor's decision (policy + audit record + metrics, and a span when
tracing is on) is timed in process for five set-ups, alternated round by round
so machine noise falls on all of them alike:

    audit off            no audit file (the floor: policy and metrics only)
    fsync never          one JSON line written and flushed to the OS per decision
    fsync interval       ... plus an fsync at most once a second (the default)
    fsync always         ... plus an fsync per decision
    fsync never + trace  as "fsync never", with an SDK tracer (batch processor,
                         spans dropped by a no-op exporter)

Arguments carry a secret so redaction does real work. The audit files go to a
temporary directory on the same disk as the repo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from proxy import config as config_mod  # noqa: E402
from proxy.audit import AuditLog, AuditSettings, Fsync  # noqa: E402
from proxy.governor import Governor  # noqa: E402
from proxy.model import Exchange, ToolCall  # noqa: E402
from proxy.policy.engine import PolicyEngine  # noqa: E402
from proxy.telemetry import Metrics  # noqa: E402

RULES = Path(__file__).resolve().parent.parent / "proxy" / "demo" / "janitor.yaml"
ARGS = {"volume_id": "vol-0b2", "tags": {"env": "production-candidate"}, "password": "hunter2"}


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def governor(engine: PolicyEngine, path: str | None, fsync: Fsync, traced: bool) -> Governor:
    metrics = Metrics()
    audit = AuditLog(path, AuditSettings(fsync=fsync), metrics)
    tracer = None
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        tracer = provider.get_tracer("bench")
    return Governor(engine, audit, metrics, tracer)


def timed(g: Governor, calls: int) -> list[float]:
    raw = json.dumps(ARGS)
    exchange = Exchange(provider="openai", model="gpt-4o-mini", agent="janitor", session="s",
                        declared_tools=("delete_volume",))
    out: list[float] = []
    for i in range(calls):
        call = ToolCall(id=f"c{i}", name="delete_volume", raw_arguments=raw, arguments=ARGS)
        t = time.perf_counter()
        g.decide(call, exchange, request_id="r")
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not (1 <= args.calls <= 1_000_000 and 1 <= args.rounds <= 100):
        raise SystemExit("calls 1-1000000, rounds 1-100")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        cfg_file = Path(tmp) / "tether.yaml"
        cfg_file.write_text(f"include: [{RULES}]\naudit: {{path: null}}\n")
        engine = PolicyEngine(config_mod.load(cfg_file, env={}).policy)
        setups = {
            "audit off": governor(engine, None, Fsync.NEVER, False),
            "fsync never": governor(engine, f"{tmp}/never.jsonl", Fsync.NEVER, False),
            "fsync interval": governor(engine, f"{tmp}/interval.jsonl", Fsync.INTERVAL, False),
            "fsync always": governor(engine, f"{tmp}/always.jsonl", Fsync.ALWAYS, False),
            "fsync never + trace": governor(engine, f"{tmp}/traced.jsonl", Fsync.NEVER, True),
        }
        samples: dict[str, list[float]] = {name: [] for name in setups}
        for g in setups.values():
            timed(g, 200)  # warm up
        for r in range(args.rounds):
            order = list(setups.items())
            for name, g in order if r % 2 == 0 else reversed(order):
                samples[name] += timed(g, args.calls)
        for g in setups.values():
            g.audit.close()
        secret_leaked = any("hunter2" in p.read_text() for p in Path(tmp).glob("*.jsonl"))
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.calls} decisions each")
    floor = statistics.median(samples["audit off"])
    print(f"{'set-up':22} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'added p50':>10}")
    for name, xs in samples.items():
        xs.sort()
        p50, p99 = statistics.median(xs), xs[int(len(xs) * 0.99) - 1]
        print(f"{name:22} {p50:8.1f} {p99:8.1f} {statistics.fmean(xs):8.1f} "
              f"{p50 - floor:+10.1f}")
    print(f"secret in an audit file: {'YES (bug)' if secret_leaked else 'no'}")


if __name__ == "__main__":
    main()
