"""Benchmark: what a user-written pattern costs against the size of the value it judges.

In this process, no sockets. For a rule's `matches` (RE2 syntax) and an OpenAPI
`pattern` (ECMA-262, checked through the spec's validator as a tool-call argument), the
median time of one judgement at 1 KB, 64 KB and 1 MB, for an everyday pattern and for
patterns that make a backtracking engine take exponential or polynomial time, and one
that is RE2's own worst case (its DFA would need 2^20 states). The value never
matches, so the whole of it is read. Python's `re` is timed beside RE2 on the everyday
pattern only: on the others it would not finish.

    .venv/bin/python bench/patterns.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable

from proxy.policy.openapi import compile_spec
from proxy.policy.openapi_arguments import check_arguments
from proxy.policy.openapi_model import Operation
from proxy.policy.patterns import rule_pattern

SIZES = {"1 KB": 1 << 10, "64 KB": 1 << 16, "1 MB": 1 << 20}
# (name, pattern, the text that fills a value of n characters; it never matches)
CASES: list[tuple[str, str, Callable[[int], str]]] = [
    ("everyday", r"^vol-temp-[0-9]+$", lambda n: "vol-temp-" + "1" * (n - 10) + "\n"),
    ("nested +", r"^(a+)+$", lambda n: "a" * (n - 1) + "!"),
    ("alternation", r"^(a|aa)*$", lambda n: "a" * (n - 1) + "!"),
    ("20 x .*", r"^(.*a){20}$", lambda n: "a" * (n - 1) + "!"),
    # RE2's own worst case: a DFA with 2^20 states, so it falls back to its NFA.
    ("DFA blow-up", r"(a|b)*a(a|b){20}c", lambda n: "".join(random.Random(n).choices("ab", k=n))),
]


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def ticket_operation(pattern: str) -> Operation:
    schema = {"type": "object", "required": ["ticket"],
              "properties": {"ticket": {"type": "string", "pattern": pattern}}}
    spec = compile_spec({"openapi": "3.1.0", "info": {"title": "b", "version": "1"},
                         "paths": {"/t": {"post": {"operationId": "t", "responses": {},
                                                   "requestBody": {"content": {
                                                       "application/json": {"schema": schema}}}}}}},
                        name="b", file="bench")
    operation = spec.operation("t")
    assert operation is not None
    return operation


def tool_call(operation: Operation) -> Callable[[str], object]:
    return lambda text: check_arguments(operation, {"ticket": text})


def row(label: str, judge: Callable[[str], object], texts: list[str], repeat: int) -> str:
    cells = [median_ms(lambda: judge(text), repeat) for text in texts]  # noqa: B023
    return f"{label:<34}" + "".join(f"{c:>10.3f}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    repeat = parser.parse_args().repeat
    print(f"{'pattern, judged as':<34}" + "".join(f"{size:>10}" for size in SIZES) + "   (ms)")
    for name, pattern, fill in CASES:
        texts = [fill(n) for n in SIZES.values()]
        print(row(f"{name}, matches (RE2)", rule_pattern(pattern).search, texts, repeat))
        print(row(f"{name}, pattern (tool call)", tool_call(ticket_operation(pattern)), texts,
                  repeat))
        if name == "everyday":
            print(row(f"{name}, Python re (for scale)", re.compile(pattern).search, texts,
                      repeat))


if __name__ == "__main__":
    main()
