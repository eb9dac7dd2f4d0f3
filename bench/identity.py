"""Benchmark: what agent authentication, declared-tool filtering and OPA cost, side by side.

One run measures, on one machine and in one process tree:

1. Micro (in this process, p50/p99 per operation): the static-key and JWT (RS256,
   ES256; keys cached) identify; `restrict_tools` on a 20-tool Chat Completions
   request (10 removed, nothing removed; with the re-parse tether does after a
   cut); the OPA input document + cache key + interpretation; the embedded Rego
   decision (rules/opa) through the OpaClient with the cache off, on a cache hit,
   and the engine alone without the worker-thread hop; a remote decision over
   loopback against tests/fakes/opa_server.py and against a compiled-policy
   Data API server (both in a child process), cache off. The costly ones are timed
   again after 20 ms idle before each call (cold caches, an idle core: what each
   request finds at concurrency 1).
2. End to end: five `tether serve` processes (baseline; + auth required with a
   JWT; + filter_tools; + OPA embedded; + OPA remote) in front of the fake
   OpenAI upstream of bench/run.py, driven with non-streaming tool-call requests
   at each concurrency, the configs alternated round by round so machine noise
   falls on all of them alike. "Added" is a config's percentile minus the
   baseline's percentile from the same run.

It prints two tables and writes bench/results/identity-<time>.json. See bench/README.md.

    .venv/bin/python bench/identity.py [--concurrency 1,8] [--rounds 6] [--phase-seconds 2.5]
                                       [--alg RS256] [--opa-cache-ttl 0] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import cpu_seconds, pct, spawn, stop  # noqa: E402  (bench/run.py, this directory)

from proxy import config as config_mod  # noqa: E402
from proxy.auth.authenticator import Authenticator  # noqa: E402
from proxy.auth.settings import AuthSettings, JwtIssuer, Mode  # noqa: E402
from proxy.model import Action, Effect, ToolCall  # noqa: E402
from proxy.opa.client import OpaClient  # noqa: E402
from proxy.opa.embedded import EmbeddedOpa  # noqa: E402
from proxy.opa.settings import OpaSettings, read_policy_dir  # noqa: E402
from proxy.policy.engine import PolicyEngine  # noqa: E402
from proxy.policy.opa import Defined, Undefined, input_for, interpret  # noqa: E402
from proxy.providers.base import exchange_for  # noqa: E402
from proxy.providers.openai import OpenAIProvider  # noqa: E402
from proxy.providers.openai_chat import CHAT  # noqa: E402
from proxy.telemetry import Metrics  # noqa: E402
from tests.fakes.oidc import FakeIssuer  # noqa: E402
from tests.fakes.opa_server import RULES, FakeOpa  # noqa: E402

HERE = Path(__file__).resolve().parent
AGENT = "bench-agent"
ISSUER = "https://issuer.bench.invalid"
STATIC_KEY = "tk-bench-static-agent-key"
OPA_PATH = "tether/decision"
OPA_RULE = "opa:" + OPA_PATH
TOOL_NAMES = ("get_weather", *(f"tool_{i:02d}" for i in range(1, 20)))   # 20 tools
SCOPE = TOOL_NAMES[:10]                                                  # the agent may keep 10
WEATHER = '{"city": "Paris", "unit": "celsius"}'
MAX_REQUESTS_PER_PHASE = 200_000

# --- the tether configs, cumulative: each adds one feature to the one before

BASE = """\
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
AUTH = """\
auth:
  mode: required
  jwt: {{issuer: "{issuer}", audiences: [tether], jwks_file: "{jwks}", algorithms: [RS256, ES256],
        claims: [sub]}}
"""
FILTER = "agents:\n  {agent}: {{tools: [{scope}]}}\n"
OPA_EMBEDDED = 'opa: {{embedded: "{rules}", cache: {{ttl: {ttl}}}}}\n'
OPA_REMOTE = 'opa: {{url: "http://127.0.0.1:{opa_port}", cache: {{ttl: {ttl}}}}}\n'
CONFIGS = ("baseline", "auth", "filter", "opa-embedded", "opa-remote")
LABELS = {"baseline": "baseline (no auth, no OPA)", "auth": "+ auth required (JWT)",
          "filter": "+ filter_tools (20 -> 10)", "opa-embedded": "+ OPA embedded",
          "opa-remote": "+ OPA remote (loopback)"}


def config_text(name: str, fake_port: int, opa_port: int, audit: Path, jwks: Path,
                ttl: float) -> str:
    parts = [BASE.format(port=fake_port, audit=audit)]
    level = CONFIGS.index(name)
    if level >= 1:
        parts.append(AUTH.format(issuer=ISSUER, jwks=jwks))
    if level >= 2:
        parts.append(FILTER.format(agent=AGENT, scope=", ".join(SCOPE)))
    if name == "opa-embedded":
        parts.append(OPA_EMBEDDED.format(rules=RULES, ttl=ttl))
    if name == "opa-remote":
        parts.append(OPA_REMOTE.format(opa_port=opa_port, ttl=ttl))
    return "".join(parts)


def tools() -> list[dict[str, Any]]:
    """20 function tools shaped like a real agent's (a description, a small schema)."""
    return [{"type": "function", "function": {
        "name": name,
        "description": f"{name.replace('_', ' ')}: looks up or changes one resource of the "
                       "fleet; returns a JSON summary of what it found or did.",
        "parameters": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string", "description": "the resource id"},
            "region": {"type": "string", "enum": ["eu-west-1", "us-east-1"]},
            "dry_run": {"type": "boolean"}}}}} for name in TOOL_NAMES]


def request_body(n: int) -> dict[str, Any]:
    return {"model": "gpt-fake", "stream": False, "tools": tools(),
            "messages": [{"role": "system", "content": "You are the fleet's operations agent."},
                         {"role": "user", "content": f"weather in Paris? (request {n})"}]}


# --- the OPA child process (identity.py --serve-opa)

async def serve_opa() -> None:
    """Two Data API servers on two ports: tests/fakes/opa_server.py (re-compiles the
    query on every request, as its regopy `query` does) and a compiled-policy one
    (one bundle built at start, as a real OPA prepares its queries)."""
    from aiohttp import web

    modules, data = read_policy_dir(RULES)
    engine = EmbeddedOpa(modules, data, OPA_PATH)

    async def decide(request: web.Request) -> web.Response:
        if request.match_info["path"].strip("/") != OPA_PATH:
            return web.json_response({}, status=404)
        doc = json.loads(await request.read())
        reply = engine.evaluate(json.dumps(doc.get("input")))
        if isinstance(reply, Defined):
            return web.json_response({"result": reply.value})
        if isinstance(reply, Undefined):
            return web.json_response({})
        return web.json_response({"code": "internal_error", "message": reply.detail}, status=500)

    compiled = web.Application()
    compiled.router.add_post("/v1/data/{path:.*}", decide)
    fake = FakeOpa()
    runners = [web.AppRunner(fake.app(), access_log=None), web.AppRunner(compiled, access_log=None)]
    ports = []
    for runner in runners:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        ports.append(runner.addresses[0][1])
    print(f"opa on {ports[0]} {ports[1]}", flush=True)
    stop_event = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop_event.set)
    await stop_event.wait()
    for runner in runners:
        await runner.cleanup()
    engine.close()


# --- micro

Sync = Callable[[], object]
Async = Callable[[], Awaitable[object]]


@dataclass
class Op:
    name: str
    sync: Sync | None = None
    run: Async | None = None
    gap_s: float = 0.0     # idle time before each call (not timed): cold caches, idle cores
    samples: list[float] = field(default_factory=list)   # microseconds

    async def once(self) -> object:
        if self.sync is not None:
            return self.sync()
        assert self.run is not None
        return await self.run()

    async def timed(self, calls: int, seconds: float) -> None:
        if self.gap_s:
            for _ in range(calls):
                await asyncio.sleep(self.gap_s)
                t = time.perf_counter()
                await self.once()
                self.samples.append((time.perf_counter() - t) * 1e6)
            return
        deadline = time.perf_counter() + seconds
        clock = time.perf_counter
        out = self.samples
        if self.sync is not None:
            fn = self.sync
            for _ in range(calls):
                t = clock()
                fn()
                out.append((clock() - t) * 1e6)
                if t > deadline:
                    return
        else:
            assert self.run is not None
            coro = self.run
            for _ in range(calls):
                t = clock()
                await coro()
                out.append((clock() - t) * 1e6)
                if t > deadline:
                    return


def expect(what: str, ok: bool) -> None:
    """A micro operation must do what its name says before it is timed."""
    if not ok:
        raise RuntimeError(f"micro check failed: {what}")


def scope_engine(tmp: Path) -> PolicyEngine:
    """Two agents from a real config: one whose scope keeps 10 of the 20 tools, one
    whose scope keeps all of them (nothing removed)."""
    cfg = tmp / "scope.yaml"
    cfg.write_text(f"agents:\n  {AGENT}: {{tools: [{', '.join(SCOPE)}]}}\n"
                   "  all-tools: {tools: [get_weather, 'tool_*']}\naudit: {path: null}\n")
    return PolicyEngine(config_mod.load(cfg, env={}).policy)


async def micro_ops(tmp: Path, issuer: FakeIssuer, opa_ports: tuple[int, int], gap_ms: float,
                    closers: list[Callable[[], Awaitable[None]]]) -> list[Op]:
    jwks = issuer.jwks()

    async def fetch(_: JwtIssuer) -> object:
        return jwks

    jwt_issuer = JwtIssuer(issuer=ISSUER, audiences=("tether",), claims=("sub",))
    jwt_auth = Authenticator(AuthSettings(Mode.REQUIRED, (jwt_issuer,)), {}, trust_headers=False,
                             fetch=fetch)
    key_auth = Authenticator(AuthSettings(Mode.REQUIRED), {
        hashlib.sha256(STATIC_KEY.encode()).hexdigest(): AGENT}, trust_headers=False, fetch=fetch)
    static_h = {"authorization": f"Bearer {STATIC_KEY}"}
    rs_h = {"authorization": f"Bearer {issuer.mint(AGENT, kid='rsa-1', ttl=7200)}"}
    es_h = {"authorization": f"Bearer {issuer.mint(AGENT, kid='ec-1', ttl=7200)}"}
    for auth, headers, method in ((key_auth, static_h, "key"), (jwt_auth, rs_h, "jwt"),
                                  (jwt_auth, es_h, "jwt")):
        who = await auth.identify(headers)   # the first JWT fetches the key set: cached after
        expect(f"identify by {method}", who.agent == AGENT and who.method == method)

    route = OpenAIProvider().route("POST", "v1/chat/completions", {})
    body = json.dumps(request_body(1)).encode()
    engine = scope_engine(tmp)
    keep10, keep_all = engine.tool_filter(AGENT), engine.tool_filter("all-tools")
    assert keep10 is not None and keep_all is not None
    cut = CHAT.restrict_tools(body, keep10)
    expect("10 tools removed", cut is not None and len(cut.removed) == 10)
    expect("nothing removed", CHAT.restrict_tools(body, keep_all) is None)
    assert cut is not None

    def restrict_and_reparse() -> object:
        restricted = CHAT.restrict_tools(body, keep10)
        assert restricted is not None
        return CHAT.parse_request(restricted.body, route)

    parsed = CHAT.parse_request(cut.body, route)
    exchange = exchange_for("openai", parsed, session=None, agent=AGENT,
                            endpoint="v1/chat/completions", claims={"sub": AGENT})
    call = ToolCall("call_1", "get_weather", WEATHER, json.loads(WEATHER))

    def input_and_interpret() -> object:
        doc = input_for(call, exchange, source="llm", effect=Effect.READ)
        hashlib.sha256(doc.canonical().encode()).hexdigest()
        return interpret(Defined({"allow": True}), OPA_PATH)

    expect("OPA interpret allows", input_and_interpret() is not None)

    modules, data = read_policy_dir(RULES)
    no_cache = OpaSettings(OPA_PATH, modules=modules, data=data, cache_ttl_s=0, timeout_s=2)
    cached = OpaSettings(OPA_PATH, modules=modules, data=data, cache_ttl_s=3600, timeout_s=2)
    emb, emb_cached = OpaClient(no_cache, Metrics()), OpaClient(cached, Metrics())
    remote_fake = OpaClient(OpaSettings(OPA_PATH, url=f"http://127.0.0.1:{opa_ports[0]}",
                                        cache_ttl_s=0, timeout_s=2), Metrics())
    remote_compiled = OpaClient(OpaSettings(OPA_PATH, url=f"http://127.0.0.1:{opa_ports[1]}",
                                            cache_ttl_s=0, timeout_s=2), Metrics())
    closers += [emb.close, emb_cached.close, remote_fake.close, remote_compiled.close]
    for client in (emb, emb_cached, remote_fake, remote_compiled):
        trace = await client.judge(call, exchange, "llm")
        expect(f"OPA allows ({trace.rule_id}: {trace.reason})",
               trace.action is Action.ALLOW and trace.rule_id == OPA_RULE)
    hits_before = len(emb_cached.cache or {})
    expect("the cache holds the verdict", hits_before == 1)
    engine_alone = EmbeddedOpa(modules, data, OPA_PATH)
    closers.append(_async(engine_alone.close))
    document = input_for(call, exchange, source="llm", effect=Effect.READ).canonical()
    expect("the engine alone allows", engine_alone.evaluate(document) == Defined({"allow": True}))
    hop = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-hop")
    closers.append(_async(lambda: hop.shutdown(wait=False)))
    loop = asyncio.get_running_loop()

    def nothing() -> None:
        return None

    hot = [
        Op("auth: static key identify (SHA-256 lookup)", run=lambda: key_auth.identify(static_h)),
        Op("auth: JWT RS256 identify (keys cached)", run=lambda: jwt_auth.identify(rs_h)),
        Op("auth: JWT ES256 identify (keys cached)", run=lambda: jwt_auth.identify(es_h)),
        Op("tools: parse_request, 20 tools (reference)", sync=lambda: CHAT.parse_request(body, route)),
        Op("tools: restrict_tools, nothing removed", sync=lambda: CHAT.restrict_tools(body, keep_all)),
        Op("tools: restrict_tools, 10 of 20 removed", sync=lambda: CHAT.restrict_tools(body, keep10)),
        Op("tools: restrict + re-parse, 10 removed", sync=restrict_and_reparse),
        Op("opa: input + canonical + hash + interpret", sync=input_and_interpret),
        Op("opa: embedded engine alone (caller's thread)",
           sync=lambda: engine_alone.evaluate(document)),
        Op("opa: empty hop to a 1-worker thread", run=lambda: loop.run_in_executor(hop, nothing)),
        Op("opa: EmbeddedOpa.query (engine + hop)", run=lambda: engine_alone.query(document)),
        Op("opa: embedded via OpaClient, cache off",
           run=lambda: emb.judge(call, exchange, "llm")),
        Op("opa: embedded via OpaClient, cache hit",
           run=lambda: emb_cached.judge(call, exchange, "llm")),
        Op("opa: remote, tests/fakes/opa_server.py, cache off",
           run=lambda: remote_fake.judge(call, exchange, "llm")),
        Op("opa: remote, compiled-policy server, cache off",
           run=lambda: remote_compiled.judge(call, exchange, "llm")),
    ]
    # The same work after the process sat idle, as each request finds it at concurrency 1.
    cold = ("auth: JWT RS256 identify (keys cached)", "tools: restrict + re-parse, 10 removed",
            "opa: embedded engine alone (caller's thread)", "opa: EmbeddedOpa.query (engine + hop)",
            "opa: embedded via OpaClient, cache off", "opa: remote, compiled-policy server, cache off")
    return hot + [Op(f"{op.name} [idle {gap_ms:g} ms before]", op.sync, op.run, gap_ms / 1000)
                  for op in hot if op.name in cold]


def _async(fn: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        fn()

    return run


async def micro(args: argparse.Namespace, tmp: Path, issuer: FakeIssuer,
                opa_ports: tuple[int, int]) -> dict[str, dict[str, float]]:
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        ops = await micro_ops(tmp, issuer, opa_ports, args.idle_gap_ms, closers)
        for op in ops:   # warm-up, discarded
            await op.timed(5 if op.gap_s else 200, 0.2)
            op.samples.clear()
        for r in range(args.micro_rounds):
            for op in ops if r % 2 == 0 else reversed(ops):
                await op.timed(args.idle_calls if op.gap_s else args.micro_calls,
                               args.micro_seconds)
    finally:
        for close in closers:
            await close()
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        xs = sorted(op.samples)
        out[op.name] = {"n": len(xs), "p50_us": xs[len(xs) // 2],
                        "p99_us": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                        "mean_us": sum(xs) / len(xs)}
    return out


def micro_table(results: dict[str, dict[str, float]]) -> str:
    head = f"{'operation':<70}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}{'n':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<70}{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{r['mean_us']:>9.1f}"
                     f"{r['n']:>8.0f}")
    return "\n".join(lines)


# --- end to end

@dataclass
class Cell:
    latency: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    cpu: dict[str, list[float]] = field(default_factory=dict)   # process -> [user, sys]


async def one(http: aiohttp.ClientSession, base: str, headers: dict[str, str], n: int) -> float:
    t0 = time.perf_counter()
    async with http.post(f"{base}/chat/completions", json=request_body(n),
                         headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        msg = (await resp.json())["choices"][0]["message"]
    calls = msg.get("tool_calls") or []
    if [c["function"]["name"] for c in calls] != ["get_weather"]:
        raise RuntimeError(f"the get_weather call did not come through: {str(msg)[:200]}")
    return time.perf_counter() - t0


async def phase(http: aiohttp.ClientSession, base: str, headers: dict[str, str], seconds: float,
                concurrency: int, cell: Cell | None) -> None:
    counter = iter(range(MAX_REQUESTS_PER_PHASE))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        for n in counter:
            if time.perf_counter() >= deadline:
                return
            try:
                total = await one(http, base, headers, n)
            except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError, KeyError) as e:
                if cell is None:
                    raise
                cell.errors += 1
                print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            if cell is not None:
                cell.latency.append(total)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measured(http: aiohttp.ClientSession, base: str, headers: dict[str, str],
                   seconds: float, concurrency: int, cell: Cell, pids: dict[str, int]) -> None:
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    await phase(http, base, headers, seconds, concurrency, cell)
    cell.seconds += time.perf_counter() - t0
    for name, pid in pids.items():
        used = cell.cpu.setdefault(name, [0.0, 0.0])
        for i, (after, before) in enumerate(zip(cpu_seconds(pid), cpu0[name], strict=True)):
            used[i] += after - before


def summary(cell: Cell) -> dict[str, float]:
    n = max(len(cell.latency), 1)
    return {"n": len(cell.latency), "errors": cell.errors, "p50_ms": pct(cell.latency, 50),
            "p90_ms": pct(cell.latency, 90), "p99_ms": pct(cell.latency, 99),
            "max_ms": pct(cell.latency, 100),
            "req_per_s": len(cell.latency) / cell.seconds if cell.seconds else 0.0,
            **{f"cpu_{p}_cores": sum(u) / cell.seconds for p, u in cell.cpu.items()},
            **{f"cpu_{p}_ms_per_req": 1000 * sum(u) / n for p, u in cell.cpu.items()}}


def e2e_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for conc, rows in results.items():
        base = rows["baseline"]
        head = (f"{'concurrency ' + conc:<30}{'p50':>7}{'p99':>8}{'added p50':>11}{'p99':>7}"
                f"{'x p50':>7}{'x p99':>7}{'req/s':>7}{'tether CPU':>12}{'OPA CPU':>9}")
        lines += [head, "-" * len(head)]
        for name, r in rows.items():
            added = (f"{'-':>11}{'-':>7}" if name == "baseline" else
                     f"{r['p50_ms'] - base['p50_ms']:>+11.2f}{r['p99_ms'] - base['p99_ms']:>+7.2f}")
            opa = r.get("cpu_opa_ms_per_req", 0.0) if name == "opa-remote" else 0.0
            lines.append(
                f"{LABELS[name]:<30}{r['p50_ms']:>7.2f}{r['p99_ms']:>8.2f}{added}"
                f"{r['p50_ms'] / base['p50_ms']:>7.3f}{r['p99_ms'] / base['p99_ms']:>7.3f}"
                f"{r['req_per_s']:>7.0f}{r['cpu_tether_ms_per_req']:>9.2f} ms"
                + (f"{opa:>6.2f} ms" if name == "opa-remote" else ""))
        lines.append("")
    lines.append("(ms; added = config's percentile minus the baseline's, same run; x = ratio; "
                 "CPU = user+sys per request)")
    return "\n".join(lines)


def audited(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    with path.open() as audit:
        for record in map(json.loads, audit):
            kind = record.get("kind")
            if kind == "decision":
                key = f"decision:{record['action']}"
                counts[key] = counts.get(key, 0) + 1
                if OPA_RULE in record.get("rules", []):
                    counts["opa_rule"] = counts.get("opa_rule", 0) + 1
            else:
                counts[str(kind)] = counts.get(str(kind), 0) + 1
    return counts


def audit_problems(name: str, counts: dict[str, int]) -> list[str]:
    """Each config must have done its feature's work on every request (and denied nothing)."""
    allowed = counts.get("decision:allow", 0)
    problems = []
    if not allowed or any(k.startswith("decision:") and k != "decision:allow" for k in counts):
        problems.append(f"{name}: decisions {counts}")
    filtered = counts.get("tools_filtered", 0)
    if (CONFIGS.index(name) >= 2) != (filtered == allowed):
        problems.append(f"{name}: {filtered} tools_filtered records for {allowed} decisions")
    if name.startswith("opa") and counts.get("opa_rule", 0) != allowed:
        problems.append(f"{name}: {counts.get('opa_rule', 0)} OPA verdicts for {allowed} decisions")
    return problems


# --- main

async def start_children(args: argparse.Namespace, tmp: Path, jwks: Path,
                         procs: dict[str, asyncio.subprocess.Process]) -> tuple[dict[str, str],
                                                                                 tuple[int, int]]:
    fake, line = await spawn([sys.executable, str(HERE / "run.py"), "--serve-fake",
                              "--first-delay-ms", str(args.first_delay_ms)], tmp / "fake.log")
    procs["fake"] = fake
    fake_port = int(line.split()[-1])
    opa, line = await spawn([sys.executable, __file__, "--serve-opa"], tmp / "opa.log")
    procs["opa"] = opa
    opa_ports = (int(line.split()[-2]), int(line.split()[-1]))
    remote_port = opa_ports[1] if args.remote_opa == "compiled" else opa_ports[0]
    env = {**os.environ, "TETHER_UPSTREAM_OPENAI": f"http://127.0.0.1:{fake_port}"}
    env.pop("TETHER_UPSTREAM_OPA", None)
    bases = {}
    for name in CONFIGS:
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(config_text(name, fake_port, remote_port, tmp / f"{name}.audit.jsonl", jwks,
                                   args.opa_cache_ttl))
        proc, line = await spawn(
            [str(Path(sys.executable).parent / "tether"), "serve", "--config", str(cfg),
             "--host", "127.0.0.1", "--port", "0", "--admin-port", "0"], tmp / f"{name}.log", env)
        procs[name] = proc
        bases[name] = f"http://127.0.0.1:{int(line.split('http://127.0.0.1:')[1].split()[0])}/openai/v1"
    return bases, opa_ports


async def e2e(args: argparse.Namespace, bases: dict[str, str], headers: dict[str, str],
              procs: dict[str, asyncio.subprocess.Process]
              ) -> tuple[dict[str, dict[str, dict[str, float]]], int]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    cells = {(c, name): Cell() for c in concurrencies for name in CONFIGS}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        for c in concurrencies:   # warm-up, discarded (also the first JWKS read)
            for name in CONFIGS:
                await phase(http, bases[name], headers, args.warmup_seconds, c, None)
        for r in range(args.rounds):
            order = list(CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)])
            if r % 2:
                order.reverse()
            for c in concurrencies:
                for name in order:
                    pids = {"loadgen": os.getpid(), "fake": procs["fake"].pid,
                            "tether": procs[name].pid, "opa": procs["opa"].pid}
                    await measured(http, bases[name], headers, args.phase_seconds, c,
                                   cells[(c, name)], pids)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    results = {str(c): {name: summary(cells[(c, name)]) for name in CONFIGS}
               for c in concurrencies}
    return results, sum(cell.errors for cell in cells.values())


async def bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-identity-"))
    procs: dict[str, asyncio.subprocess.Process] = {}
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # -> finally
    issuer = FakeIssuer(issuer=ISSUER)
    issuer.add_key("rsa-1")
    issuer.add_key("ec-1", kind="EC")
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    kid = "rsa-1" if args.alg == "RS256" else "ec-1"
    headers = {"Authorization": f"Bearer {issuer.mint(AGENT, kid=kid, ttl=4 * 3600)}",
               "X-Tether-Agent": AGENT}   # the header names the agent where auth is off
    failed = True
    try:
        bases, opa_ports = await start_children(args, tmp, jwks, procs)
        print(f"children {({n: p.pid for n, p in procs.items()})}", flush=True)
        print(f"micro: {args.micro_rounds} rounds x up to {args.micro_calls} calls "
              f"/ {args.micro_seconds}s per operation", flush=True)
        micro_results = await micro(args, tmp, issuer, opa_ports)
        print(f"\n{micro_table(micro_results)}\n", flush=True)
        e2e_results: dict[str, dict[str, dict[str, float]]] = {}
        errors, problems, counts = 0, [], {}
        if not args.skip_e2e:
            print(f"end to end: concurrency {args.concurrency}, {args.rounds} rounds x "
                  f"{len(CONFIGS)} configs x {args.phase_seconds}s, JWT {args.alg}, OPA cache ttl "
                  f"{args.opa_cache_ttl}, remote OPA: {args.remote_opa} server", flush=True)
            e2e_results, errors = await e2e(args, bases, headers, procs)
            counts = {name: audited(tmp / f"{name}.audit.jsonl") for name in CONFIGS}
            problems = [p for name in CONFIGS for p in audit_problems(name, counts[name])]
            print(f"\n{e2e_table(e2e_results)}\n\nerrors: {errors}; audit checks: "
                  + ("; ".join(problems) if problems else "ok (every request allowed, filtered "
                     "and judged by OPA where configured)"))
        out = HERE / "results" / time.strftime("identity-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({
            "settings": vars(args), "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "micro_us": micro_results, "e2e": e2e_results,
            "audit": counts}, indent=2, default=str) + "\n")
        print(f"results written to {out}")
        failed = errors > 0 or bool(problems)
    finally:
        for proc in reversed(procs.values()):
            await stop(proc)
    if failed:
        print(f"failed; child logs kept in {tmp}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--concurrency", default="1,8",
                   help="comma-separated concurrencies, each a set of phases (default 1,8)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--phase-seconds", type=float, default=2.5,
                   help="length of one (config, concurrency) phase (default 2.5)")
    p.add_argument("--warmup-seconds", type=float, default=1.0, help="per phase (default 1)")
    p.add_argument("--first-delay-ms", type=float, default=20.0,
                   help="fake upstream latency before answering (default 20)")
    p.add_argument("--alg", choices=("RS256", "ES256"), default="RS256",
                   help="the JWT the end-to-end requests carry (default RS256)")
    p.add_argument("--opa-cache-ttl", type=float, default=0.0,
                   help="opa.cache.ttl of the OPA configs; 0 (default) turns the cache off so "
                        "every call is evaluated (identical calls would otherwise all hit it)")
    p.add_argument("--remote-opa", choices=("compiled", "fake"), default="compiled",
                   help="which loopback OPA the remote config asks: a compiled-policy Data API "
                        "server (default) or tests/fakes/opa_server.py (re-compiles per query)")
    p.add_argument("--micro-rounds", type=int, default=5, help="micro rounds (default 5)")
    p.add_argument("--micro-calls", type=int, default=3000,
                   help="calls per operation per micro round (default 3000)")
    p.add_argument("--micro-seconds", type=float, default=0.6,
                   help="at most this long per operation per micro round (default 0.6)")
    p.add_argument("--idle-gap-ms", type=float, default=20.0,
                   help="idle time before each call of the [idle] micro variants (default 20)")
    p.add_argument("--idle-calls", type=int, default=40,
                   help="calls per [idle] operation per micro round (default 40)")
    p.add_argument("--skip-e2e", action="store_true", help="the micro part only")
    p.add_argument("--serve-opa", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_opa:
        asyncio.run(serve_opa())
        return 0
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency: comma-separated whole numbers, like 1,8")
    if not (all(1 <= c <= 256 for c in concurrencies) and 1 <= args.rounds <= 100
            and 0 < args.phase_seconds <= 600 and 0 <= args.warmup_seconds <= 600
            and 1 <= args.micro_rounds <= 100 and 1 <= args.micro_calls <= 1_000_000
            and 0 < args.micro_seconds <= 60 and 0 <= args.opa_cache_ttl <= 3600
            and 0 < args.idle_gap_ms <= 1000 and 1 <= args.idle_calls <= 10_000):
        p.error("concurrency 1-256, rounds 1-100, phase/warm-up seconds up to 600, micro rounds "
                "1-100, micro calls 1-1000000, micro seconds up to 60, OPA cache ttl 0-3600, idle "
                "gap up to 1000 ms, idle calls 1-10000")
    try:
        return asyncio.run(bench(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
