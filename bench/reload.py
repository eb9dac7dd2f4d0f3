"""Benchmark: governed traffic at a fixed rate through `tether serve` while its config is
reloaded over and over (tests/reload_load.py drives both this and the suite's test).

Reports what the agents saw (failures, latency percentiles, the rate sent) and what the
audit log says (decisions that name a revision other than the one in force where they
sit in the log, or carry another revision's verdict), with and without reloads.

    .venv/bin/python bench/reload.py [--rate 200] [--reloads 50] [--period 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reload_load import LoadReport, run  # noqa: E402


def show(name: str, r: LoadReport) -> None:
    lat = r.latencies_ms
    print(f"{name}: {r.sent} requests in {r.seconds:.1f} s ({r.rate:.0f}/s), "
          f"{len(r.failed)} failed; latency ms p50 {r.percentile(lat, 50):.1f} "
          f"p90 {r.percentile(lat, 90):.1f} p99 {r.percentile(lat, 99):.1f} "
          f"max {max(lat, default=0):.1f}")
    if r.reload_ms:
        print(f"  {r.reloads_ok} reloads ok, {r.revisions_seen} revisions; POST /v1/reload ms "
              f"p50 {r.percentile(r.reload_ms, 50):.1f} p99 {r.percentile(r.reload_ms, 99):.1f} "
              f"max {max(r.reload_ms):.1f}")
    print(f"  {r.decisions} decisions audited, {len(r.problems)} naming the wrong revision"
          + (f": {r.problems[:3]}" if r.problems else ""))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--reloads", type=int, default=50)
    p.add_argument("--period", type=float, default=0.1, help="seconds between reload starts")
    p.add_argument("--how", default="overwrite", choices=["overwrite", "rename", "kubelet"])
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print(f"commit {commit} (plus the working tree), rate {args.rate}/s")
    # The same duration without reloads first: what the machine gives without them.
    quiet = asyncio.run(run(Path(tempfile.mkdtemp()), rate=args.rate, reloads=0,
                            interval_s=args.reloads * args.period, how=args.how))
    show("no reloads", quiet)
    loud = asyncio.run(run(Path(tempfile.mkdtemp()), rate=args.rate, reloads=args.reloads,
                           interval_s=args.period, how=args.how))
    show(f"{args.reloads} reloads", loud)
    return 1 if loud.failed or loud.problems or quiet.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
