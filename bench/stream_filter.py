"""Micro-benchmark: the stream filters' cost per stream, this tree against a baseline.

Feeds the fake OpenAI upstream's 12-event text answer (and a 2-call answer, both calls
allowed) to `ChatStream` as one read, the way the one-connection TTFT workload's first
read arrives, and the fake Anthropic answer (text and one call) to `MessagesStream`.
Both trees run in one process, the baseline imported as `proxybase` (a symlink to its
`proxy/`; the filters import only relatively), alternated round by round, so they see
the same machine load; each figure is the best of 5 repeats of 2,000 streams, and the
table gives the median and the best of the rounds.

    .venv/bin/python bench/stream_filter.py --baseline /tmp/base [--rounds 10]

`--baseline` is a directory holding another tree's `proxy/` (`git archive HEAD proxy`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def workloads(pkg: str) -> dict[str, Callable[[], None]]:
    """name -> one stream fed, decided (everything allowed) and closed, with `pkg`'s code."""
    def mod(name: str) -> ModuleType:
        return importlib.import_module(f"{pkg}.{name}")

    base, model = mod("demo.fake_base"), mod("model")
    chat_events = mod("demo.fake_openai").stream_events
    claude_events = mod("demo.fake_anthropic").stream_events
    chat, messages = mod("providers.openai_chat_stream"), mod("providers.anthropic_stream")
    call, reply = base.Call, base.Reply
    allow = model.Decision(model.Action.ALLOW)
    text = b"".join(chat_events(reply(content="The weather in Paris is sunny, 21 C."), "gpt-4o"))
    calls = b"".join(chat_events(reply(calls=(call("get_weather", '{"city": "Paris"}'),
                                              call("get_weather", '{"city": "Rome"}'))),
                                 "gpt-4o"))
    claude = b"".join(claude_events(reply(content="The weather in Paris is sunny, 21 C.",
                                          calls=(call("get_weather", '{"city": "Paris"}'),)),
                                    "claude"))

    def drive(make: Callable[[], Any], data: bytes) -> Callable[[], None]:
        def once() -> None:
            stream = make()
            step = stream.feed(data)
            while step.pending:
                step = stream.decide([allow] * len(step.pending))
            step = stream.close()
            while step.pending:
                step = stream.decide([allow] * len(step.pending))
        return once

    return {"chat text (12 events)": drive(chat.ChatStream, text),
            "chat 2 calls": drive(chat.ChatStream, calls),
            "anthropic text+call": drive(messages.MessagesStream, claude)}


def best_us(fn: Callable[[], None], n: int = 2000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    links = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    (links / "proxybase").symlink_to(args.baseline.resolve() / "proxy")
    sys.path[:0] = [str(HERE.parent), str(links)]
    trees = {"baseline": workloads("proxybase"), "this tree": workloads("proxy")}
    seen: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for r in range(args.rounds):
        for label in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            for name, fn in trees[label].items():
                seen[label].setdefault(name, []).append(best_us(fn))
    print(f"{'stream':24} {'tree':10} {'median µs':>10} {'best':>7}")
    for name in trees["baseline"]:
        for label in trees:
            xs = seen[label][name]
            print(f"{name:24} {label:10} {statistics.median(xs):10.1f} {min(xs):7.1f}")
    print(json.dumps({t: {n: round(statistics.median(v), 1) for n, v in d.items()}
                      for t, d in seen.items()}))


if __name__ == "__main__":
    main()
