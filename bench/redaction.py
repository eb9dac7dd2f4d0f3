"""Benchmark: what redaction costs against the size of a tool call's arguments, and what
a running tether answers while it redacts a megabyte.

1. In process, no sockets: `redact()` of the arguments `{"path": ..., "content": X}` as the
   audit log redacts them, where X is random hex, random base64, prose, a JSON document
   (parsed, as valid arguments arrive) or the same JSON as text (as malformed arguments
   arrive: one string, full of `"key": value` pairs), or `a=b ` repeated (the pair
   scanner's worst case), at 1 KB, 64 KB and 1 MB. Median of `--repeat`, in µs, and µs
   per KB, which stays flat when the cost is linear. For scale, the pair pattern tether
   used before, searched through hex of 1, 4 and 16 KB (it was quadratic).
2. Through a running tether (a child process, with the fake upstream in another): one
   client keeps asking for answers whose tool call carries 1 MB of arguments of one kind
   (tether reads, parses, judges, redacts and audits each, then answers it), while this
   process polls the admin port's `/healthz` every 10 ms. Reports the health check's
   latency against an idle baseline, and how many 1 MB answers went through.

    .venv/bin/python bench/redaction.py [--repeat 7] [--seconds 6] [--kinds hex,json-text]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import spawn, stop  # noqa: E402  (bench/run.py: child processes)

from proxy.audit.redact import is_secret_key, redact  # noqa: E402

SIZES = {"1 KB": 1024, "64 KB": 64 * 1024, "1 MB": 1024 * 1024}
WORDS = ("the volume snapshot was taken before noon and the cluster kept serving reads while "
         "engineers checked every replica; status: green, owner: storage-team, region = eu").split()
# The pair pattern before this change, searched through the text (for scale only).
OLD_PAIR = re.compile(r"""(["']?)([A-Za-z][A-Za-z0-9_.-]*)\1(\s*[:=]\s*)"""
                      r"""("(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s,;&}]+)""")


def make(kind: str, size: int, rnd: random.Random) -> object:
    """Content of about `size` bytes: a string, or for `json` a parsed document."""
    if kind == "hex":
        return rnd.randbytes(size // 2).hex()
    if kind == "base64":
        return base64.b64encode(rnd.randbytes(size * 3 // 4)).decode()
    if kind == "text":
        out: list[str] = []
        n = 0
        while n < size:
            word = rnd.choice(WORDS) + rnd.choice((" ", " ", " ", ", ", ".\n"))
            out.append(word)
            n += len(word)
        return "".join(out)[:size]
    if kind == "pairs":
        return "a=b " * (size // 4)
    items: list[object] = []
    doc = {"items": items}
    n = len(json.dumps(doc))
    while n < size:
        item = {"id": len(items), "name": rnd.choice(WORDS), "tags": {"env": rnd.choice(WORDS)},
                "note": " ".join(rnd.choices(WORDS, k=8))}
        items.append(item)
        n += len(json.dumps(item)) + 2
    if kind == "json-text":
        return json.dumps(doc)
    return doc


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def in_process(repeat: int) -> None:
    rnd = random.Random(7)
    kinds = ("hex", "base64", "text", "json", "json-text", "pairs")
    print(f"redact({{path, content}}), median of {repeat}, µs (µs per KB)")
    print(f"{'content':12}" + "".join(f"{s:>22}" for s in SIZES))
    for kind in kinds:
        row = f"{kind:12}"
        for size in SIZES.values():
            args = {"path": "src/blob.bin", "content": make(kind, size, rnd)}
            redact(args)  # warm the key cache, as a running tether has it
            s = timed(lambda a=args: redact(a), repeat)  # type: ignore[misc]
            row += f"{s * 1e6:>13,.0f} ({s * 1e6 / (size / 1024):6.1f})"
        print(row)
    print("\nthe pair pattern before, searched through hex, µs")
    for size in (1024, 4096, 16384):
        text = rnd.randbytes(size // 2).hex()
        s = timed(lambda t=text: OLD_PAIR.sub(  # type: ignore[misc]
            lambda m: m.group(0) if not is_secret_key(m.group(2)) else "", t), 3)
        print(f"  {size // 1024:>2} KB {s * 1e6:>13,.0f}")


# --- through a running tether

CONFIG = """\
upstreams:
  openai: {{url: "http://127.0.0.1:{port}"}}
audit: {{path: "{audit}"}}
"""


async def serve_fake() -> None:
    """The fake upstream: `kind=<k>` in the last message picks 1 MB arguments of that kind."""
    from proxy.demo.fake_base import serve_until_stopped
    from proxy.demo.fake_openai import Body, Call, FakeOpenAI, Reply

    rnd = random.Random(11)
    calls = {k: Call("write_file", json.dumps({"path": "src/blob.bin",
                                               "content": make(k, SIZES["1 MB"], rnd)}))
             for k in ("hex", "base64", "text", "json-text")}
    calls["json"] = Call("write_file", json.dumps(
        {"path": "src/blob.json", "content": make("json", SIZES["1 MB"], rnd)}))
    fake = FakeOpenAI()

    def script(body: Body) -> Reply:
        fake.requests.clear()
        fake.headers.clear()
        return Reply(calls=(calls[str(body["messages"][-1]["content"]).split("=")[1]],))

    fake.script = script
    await serve_until_stopped(fake.app())


async def poll(http: aiohttp.ClientSession, url: str, until: float) -> list[float]:
    samples = []
    while time.perf_counter() < until:
        t = time.perf_counter()
        async with http.get(url) as r:
            await r.read()
            assert r.status == 200
        samples.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    return samples


async def flood(http: aiohttp.ClientSession, url: str, kind: str, until: float) -> list[float]:
    done = []
    tools = [{"type": "function", "function": {"name": "write_file",
                                               "parameters": {"type": "object"}}}]
    while time.perf_counter() < until:
        t = time.perf_counter()
        async with http.post(url, json={"model": "m", "tools": tools, "messages": [
                {"role": "user", "content": f"kind={kind}"}]}) as r:
            body = await r.json()
            assert r.status == 200 and body["choices"][0]["message"]["tool_calls"], body
        done.append(time.perf_counter() - t)
    return done


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)

    def p(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return f"p50 {p(0.5):7.2f}  p99 {p(0.99):7.2f}  max {ms[-1]:7.2f} ms  (n={len(ms)})"


async def through_tether(kinds: list[str], seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tether-redaction-"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        fake, line = await spawn([sys.executable, __file__, "--serve-fake"], tmp / "fake.log")
        procs.append(fake)
        port = int(line.split()[-1])
        (tmp / "tether.yaml").write_text(CONFIG.format(port=port, audit=tmp / "audit.jsonl"))
        env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{port}"}
        tether, line = await spawn(
            [str(Path(sys.executable).parent / "tether"), "serve", "--config",
             str(tmp / "tether.yaml"), "--host", "127.0.0.1", "--port", "0",
             "--admin-port", "0"], tmp / "tether.log", env)
        procs.append(tether)
        proxy_port = int(line.split("http://127.0.0.1:")[1].split()[0])
        admin_port = int(line.split("admin on http://127.0.0.1:")[1].split(",")[0])
        health = f"http://127.0.0.1:{admin_port}/healthz"
        chat = f"http://127.0.0.1:{proxy_port}/openai/v1/chat/completions"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await flood(http, chat, "hex", time.perf_counter() + 1)  # warm-up
            idle = await poll(http, health, time.perf_counter() + seconds / 2)
            print(f"\n/healthz while idle:                 {summary(idle)}")
            for kind in kinds:
                until = time.perf_counter() + seconds
                loaded, answers = await asyncio.gather(poll(http, health, until),
                                                       flood(http, chat, kind, until))
                print(f"/healthz, 1 MB {kind:9} answers: {summary(loaded)}; "
                      f"{len(answers)} answers, each {statistics.median(answers) * 1000:.0f} ms")
    finally:
        for proc in reversed(procs):
            await stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--kinds", default="hex,base64,text,json,json-text")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake())
        return 0
    in_process(args.repeat)
    asyncio.run(through_tether(args.kinds.split(","), args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
