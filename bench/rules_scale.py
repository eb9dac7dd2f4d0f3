"""Benchmark: one policy decision against the number of rules, 10 to 10,000.

In this process, no sockets: `PolicyEngine.decide` on a loaded config. Two policies per
size: rules that name their tool exactly (`tool: svc_17_delete`, with an argument
condition), the usual shape, and rules that name it by a glob (`tool: "svc_17_*"`).
Each decision is timed for a call that one rule matches and for one that none does.
The median of five rounds of `--repeat` decisions, in µs per decision.

    .venv/bin/python bench/rules_scale.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import config as config_mod  # noqa: E402
from proxy.model import Exchange, ToolCall  # noqa: E402
from proxy.policy.engine import PolicyEngine  # noqa: E402

SIZES = (10, 100, 1000, 10_000)


def policy(n: int, glob: bool) -> str:
    lines = ["defaults: {action: allow}", "rules:"]
    for i in range(n):
        tool = f'"svc_{i}_*"' if glob else f"svc_{i}_delete"
        lines += [f"  - id: r{i}",
                  f"    match: {{tool: {tool}, args: {{env: {{in: [production]}}}}}}",
                  "    action: deny"]
    return "\n".join(lines) + "\n"


def engine(text: str, tmp: Path) -> PolicyEngine:
    path = tmp / "p.yaml"
    path.write_text(text)
    return PolicyEngine(config_mod.load(path, env={}).policy)


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        rounds.append((time.perf_counter() - started) / repeat)
    return statistics.median(rounds) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=2000)
    args = p.parse_args()
    hit = ToolCall("c1", "svc_7_delete", '{"env": "production"}', {"env": "production"})
    miss = ToolCall("c2", "get_weather", '{"city": "Oslo"}', {"city": "Oslo"})
    exchange = Exchange("openai", "m", ("svc_7_delete", "get_weather"))
    print(f"{'policy decision (us per call)':<40}" + "".join(f"{n:>10,}" for n in SIZES))
    with tempfile.TemporaryDirectory() as tmp:
        for glob in (False, True):
            engines = [engine(policy(n, glob), Path(tmp)) for n in SIZES]
            for label, call in (("matched by one rule", hit), ("matched by none", miss)):
                assert engines[0].decide(call, exchange).rules == (
                    ("r7",) if call is hit else ())
                cells = [per_call_us(lambda e=e, c=call: e.decide(c, exchange),  # type: ignore[misc]
                                     args.repeat) for e in engines]
                name = f"{'glob' if glob else 'exact'} tool names, {label}"
                print(f"{name:<40}" + "".join(f"{c:>10.1f}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
