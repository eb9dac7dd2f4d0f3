"""Budgets: what is limited, per whom, and the counters a request must reserve.

Pure data and arithmetic; the store applies the counters atomically. Limits
key on the agent first and the session second: a session bucket is named by
agent *and* session, and agent buckets are separate, so rotating session ids
does not reset an agent's caps.

    budgets:
      session: {tokens: 200000, llm_calls: 50, cost_usd: 5, max_age: 1h,
                repeats: 3, pingpong: 2, trip: call, tools: {delete_volume: 3}}
      agent:   {per: hour, tokens: 1000000, cost_usd: 20}    # each agent, windowed
      global:  {per: day, cost_usd: 500}                     # everyone together
      max_output_tokens: 4096   # worst case when a request names no max_tokens
      session_ttl: 24h          # an idle session's counters expire
      prices: {default: {input: 15, output: 75}, models: [{match: "gpt-4o*", input: 2.5, output: 10}]}

Every block takes `mode: shadow` to count and report without enforcing.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..config_tables import BUDGETS, SESSION_LIMIT, WINDOW_LIMIT
from ..errors import ConfigError
from ..policy.names import normalize
from ..policy.rules import parse_duration
from ..policy.source import YMap, load_yaml
from ..surrogates import utf8
from .prices import Price, PriceTable

DIMS = ("tokens", "input_tokens", "output_tokens", "cost_usd", "llm_calls")
WINDOWS = {"hour": 3600, "day": 86400}
LOOP_KEYS = {"repeats", "pingpong", "trip"}
SESSION_KEYS = SESSION_LIMIT.names  # documented in config_tables.py
WINDOW_KEYS = WINDOW_LIMIT.names


class Scope(enum.StrEnum):
    SESSION = "session"
    AGENT = "agent"
    GLOBAL = "global"


@dataclass(frozen=True, slots=True)
class Limit:
    scope: Scope
    dims: Mapping[str, int]              # cost_usd in micro-dollars
    window_s: int | None = None
    shadow: bool = False
    max_age_s: float | None = None
    tools: Mapping[str, int] = field(default_factory=dict)   # normalised name -> max per session


@dataclass(frozen=True, slots=True)
class Loops:
    repeats: int | None = None     # the same call more than N times in a session
    pingpong: int | None = None    # A,B repeated this many times (2: A B A B)
    trip_session: bool = False     # a loop also stops every further LLM call of the session
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Budgets:
    session: Limit | None = None
    agent: Limit | None = None
    agents: Mapping[str, Limit] = field(default_factory=dict)
    global_: Limit | None = None
    loops: Loops = Loops()
    max_output_tokens: int = 4096
    session_ttl_s: int = 86400
    prices: PriceTable = field(default_factory=lambda: PriceTable((), Price(15.0, 75.0)))

    @property
    def enabled(self) -> bool:
        return any((self.session, self.agent, self.agents, self.global_, self.loops.repeats,
                    self.loops.pingpong))


class Counter(NamedTuple):
    """One field of one bucket that a request adds to, and the most it may hold.
    (A NamedTuple: a request builds fifteen of these, twice.)"""

    bucket: str
    field: str
    amount: int
    limit: int | None      # None: counted, not limited
    shadow: bool
    ttl_s: int
    reset_at: float | None = None  # when a windowed bucket starts afresh
    label: str = ""


def with_amount(c: Counter, amount: int) -> Counter:
    """`c._replace(amount=amount)` without `_replace`'s generic machinery (per request)."""
    return Counter(c.bucket, c.field, amount, c.limit, c.shadow, c.ttl_s, c.reset_at, c.label)


def digest(text: str) -> str:
    """Total: a session header aiohttp decoded with `surrogateescape` hashes too."""
    return hashlib.sha256(utf8(text)).hexdigest()[:24]


def session_bucket(agent: str | None, session: str) -> str:
    return f"s:{digest(f'{agent or ''}|{session}')}"


def _window(now: float, window_s: int) -> tuple[int, float]:
    start = int(now // window_s)
    return start, (start + 1) * window_s


def _limit_counters(limit: Limit, bucket: str, amounts: Mapping[str, int], ttl_s: int,
                    reset_at: float | None, who: str) -> list[Counter]:
    return [
        Counter(bucket, dim, amounts.get(dim, 0), limit.dims.get(dim), limit.shadow, ttl_s,
                reset_at, f"{who} {dim}")
        for dim in DIMS
    ]


def counters(budgets: Budgets, agent: str | None, session: str, now: float,
             amounts: Mapping[str, int]) -> list[Counter]:
    """Every counter a request touches. Unlimited dimensions are still counted,
    so `GET /v1/sessions/{id}` reports spend whether or not it is limited."""
    out = _limit_counters(budgets.session or Limit(Scope.SESSION, {}),
                          session_bucket(agent, session), amounts, budgets.session_ttl_s, None,
                          "session")
    agent_limit = budgets.agents.get(agent or "") or budgets.agent
    if agent_limit is not None:
        window = agent_limit.window_s or 86400 * 365
        start, reset = _window(now, window)
        out += _limit_counters(agent_limit, f"a:{digest(agent or '')}:{window}:{start}",
                               amounts, window + 60, reset if agent_limit.window_s else None,
                               f"agent {agent or '(none)'}")
    if budgets.global_ is not None:
        window = budgets.global_.window_s or 86400 * 365
        start, reset = _window(now, window)
        out += _limit_counters(budgets.global_, f"g:{window}:{start}", amounts, window + 60,
                               reset if budgets.global_.window_s else None, "global")
    return out


def worst_case(budgets: Budgets, model: str, input_tokens: int, max_output: int | None
               ) -> dict[str, int]:
    output = max_output if max_output is not None else budgets.max_output_tokens
    price = budgets.prices.price(model)
    cost = math.ceil(input_tokens * price.input + output * price.output)
    return {"tokens": input_tokens + output, "input_tokens": input_tokens,
            "output_tokens": output, "cost_usd": cost, "llm_calls": 1}


def estimate_input_tokens(body_bytes: int) -> int:
    """An upper-leaning estimate without a tokenizer: JSON request bytes / 3."""
    return max(1, body_bytes // 3)


# --- config -------------------------------------------------------------------------------


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def _positive(value: object, node: YMap, key: str, where: str, *, money: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _err("must be a positive number", node, key, where)
    return math.ceil(value * 1_000_000) if money else int(value)


def _limit(node: object, scope: Scope, parent: YMap, key: str) -> Limit:
    where = f"budgets.{key}"
    if not isinstance(node, YMap):
        raise _err("must be a mapping", parent, key, "budgets")
    allowed = SESSION_KEYS if scope is Scope.SESSION else WINDOW_KEYS
    for k in node:
        if k not in allowed:
            raise _err(f"unknown key (expected one of {', '.join(sorted(allowed))})", node, k,
                       where)
    dims = {d: _positive(node[d], node, d, where, money=d == "cost_usd") for d in DIMS if d in node}
    mode = node.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        raise _err("must be enforce or shadow", node, "mode", where)
    window = None
    if "per" in node:
        if node["per"] not in WINDOWS:
            raise _err("must be hour or day", node, "per", where)
        window = WINDOWS[str(node["per"])]
    max_age = None
    if "max_age" in node:
        max_age = parse_duration(node["max_age"], lambda m: _err(m, node, "max_age", where))
    tools: dict[str, int] = {}
    if "tools" in node:
        tnode = node["tools"]
        if not isinstance(tnode, YMap):
            raise _err("must map tool names to counts", node, "tools", where)
        tools = {normalize(str(t)): _positive(n, tnode, str(t), f"{where}.tools")
                 for t, n in tnode.items()}
    return Limit(scope, dims, window, mode == "shadow", max_age, tools)


def _loops(node: YMap | None) -> Loops:
    if node is None:
        return Loops()
    where = "budgets.session"
    repeats = _positive(node["repeats"], node, "repeats", where) if "repeats" in node else None
    pingpong = _positive(node["pingpong"], node, "pingpong", where) if "pingpong" in node else None
    trip = node.get("trip", "call")
    if trip not in ("call", "session"):
        raise _err("must be call or session", node, "trip", where)
    return Loops(repeats, pingpong, trip == "session", node.get("mode") == "shadow")


def _prices(node: object, parent: YMap) -> PriceTable:
    if not isinstance(node, YMap):
        raise _err("must be a mapping with default and models", parent, "prices", "budgets")

    def price(item: object, where: YMap, key: str) -> Price:
        if not isinstance(item, dict) or not all(
                isinstance(item.get(k), int | float) and not isinstance(item.get(k), bool)
                for k in ("input", "output")):
            raise _err("a price is {input: USD per 1M tokens, output: USD per 1M tokens}",
                       where, key, "budgets.prices")
        return Price(float(item["input"]), float(item["output"]))

    default = price(node["default"], node, "default") if "default" in node else Price(15.0, 75.0)
    models = node.get("models", [])
    if not isinstance(models, list):
        raise _err("must be a list", node, "models", "budgets.prices")
    entries = []
    for item in models:
        if not isinstance(item, dict) or not isinstance(item.get("match"), str):
            raise _err("each model price needs match: GLOB", node, "models", "budgets.prices")
        entries.append((str(item["match"]), price(item, node, "models")))
    return PriceTable.build(entries, default)


def shipped_prices() -> YMap:
    from importlib import resources

    text = resources.files("proxy.sessions").joinpath("prices.yaml").read_text("utf-8")
    doc = load_yaml(text, "proxy/sessions/prices.yaml")
    assert isinstance(doc, YMap)
    return doc


@functools.cache
def _shipped_table() -> PriceTable:
    """The packaged price table, parsed once: it cannot change while tether runs, and a
    config reload (proxy/reload.py) would otherwise spend most of its time on it."""
    return _prices(shipped_prices(), YMap())


def parse_budgets(node: YMap | None, agents: Mapping[str, object]) -> Budgets:
    shipped = _shipped_table()
    if node is None:
        return Budgets(prices=shipped)
    allowed = BUDGETS.names
    for k in node:
        if k not in allowed:
            raise _err(f"unknown key (expected one of {', '.join(sorted(allowed))})", node, k,
                       "budgets")
    session = _limit(node["session"], Scope.SESSION, node, "session") if "session" in node else None
    agent = _limit(node["agent"], Scope.AGENT, node, "agent") if "agent" in node else None
    global_ = _limit(node["global"], Scope.GLOBAL, node, "global") if "global" in node else None
    per_agent: dict[str, Limit] = {}
    for name, spec in agents.items():
        if isinstance(spec, YMap) and "budgets" in spec:
            per_agent[name] = _limit(spec["budgets"], Scope.AGENT, spec, "budgets")
    prices = shipped
    if "prices" in node:
        override = _prices(node["prices"], node)
        prices = PriceTable(override.entries + shipped.entries,
                            override.default if "default" in node["prices"] else shipped.default)
    ttl = 86400
    if "session_ttl" in node:
        ttl = int(parse_duration(node["session_ttl"],
                                 lambda m: _err(m, node, "session_ttl", "budgets")))
    max_out = 4096
    if "max_output_tokens" in node:
        max_out = _positive(node["max_output_tokens"], node, "max_output_tokens", "budgets")
    session_node = node["session"] if isinstance(node.get("session"), YMap) else None
    return Budgets(session, agent, per_agent, global_, _loops(session_node), max_out, ttl, prices)
