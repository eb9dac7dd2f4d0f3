"""Open Policy Agent, sans-IO: the input document tether sends and how an answer reads.

Both OPA back ends (the remote Data API and the embedded rego-cpp engine) go
through this module, so the same answer means the same verdict whichever one
produced it:

    doc = input_for(call, exchange, source="llm", effect=..., api=..., budget=...)
    reply = read_http(status, body)        # remote; the embedded engine makes a Reply itself
    verdict = interpret(reply, "tether/decision")   # a RuleTrace for Governor.decide(extra=)

The law: only a literal JSON `true`, or an object whose `allow` is the boolean
`true` (and whose `action`, if any, is `allow`), allows. `action: hold` holds,
`action: deny` or anything else denies. Every answer that is not a verdict
(undefined, a string "true", a number, malformed JSON, a non-200, no answer at
all) is a deny with a `tether:opa-*` rule id, and is never cached.

The document carries no request id and no time, so identical calls have
identical documents and the cache can answer them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .. import strict_json
from ..model import Action, Effect, Exchange, RuleTrace, ToolCall

INPUT_VERSION = 1
Source = Literal["llm", "egress", "mcp"]

RULE_PREFIX = "opa:"
UNAVAILABLE = "tether:opa-unavailable"
UNDEFINED = "tether:opa-undefined"
BAD_RESULT = "tether:opa-bad-result"

# Metric label values (bounded): why an answer was not a verdict.
ERROR_REASONS = ("connect", "timeout", "status", "eval", "internal", "bad_json", "undefined",
                 "bad_result")
_UNAVAILABLE_REASONS = {"connect", "timeout", "status", "eval", "internal"}
MAX_REASON = 300
MICRO = 1_000_000


@dataclass(frozen=True, slots=True)
class BudgetView:
    """A session's budget state as tether's store holds it at decision time.

    `used` counts what the store holds for the session: settled usage of earlier
    requests plus this request's (its settled usage for whole responses, its
    worst-case reservation while a stream is still running). Only dimensions
    with a configured session limit are counted. `cost_usd` is in dollars."""

    used: Mapping[str, float]
    limits: Mapping[str, float]
    remaining: Mapping[str, float]
    tool_calls: Mapping[str, int]
    mode: str = "enforce"      # shadow: limits are reported, not enforced
    scope: str = "session"

    def document(self) -> dict[str, object]:
        return {"scope": self.scope, "used": dict(self.used), "limits": dict(self.limits),
                "remaining": dict(self.remaining), "tool_calls": dict(self.tool_calls),
                "mode": self.mode}


def budget_view(spent: Mapping[str, int], limits: Mapping[str, int], *,
                shadow: bool = False) -> BudgetView:
    """From the store's raw counters (cost in micro-USD, `tool:<name>` counts)."""

    def unit(dim: str, n: int) -> float:
        return n / MICRO if dim == "cost_usd" else n

    used = {d: unit(d, n) for d, n in spent.items()
            if not d.startswith("tool:") and d != "first_seen"}
    return BudgetView(
        used=used,
        limits={d: unit(d, n) for d, n in limits.items()},
        remaining={d: unit(d, max(0, n - spent.get(d, 0))) for d, n in limits.items()},
        tool_calls={d[5:]: n for d, n in spent.items() if d.startswith("tool:")},
        mode="shadow" if shadow else "enforce",
    )


@dataclass(frozen=True, slots=True)
class OpaInput:
    """The input document, one shape for a model's tool call, an MCP `tools/call` and an
    HTTP egress request. `arguments` is None when they did not parse; `raw_arguments`
    then holds the text as sent (and is None otherwise)."""

    source: Source
    tool: str
    arguments: Mapping[str, object] | None
    raw_arguments: str | None
    effect: Effect
    api: str | None
    provider: str
    model: str
    endpoint: str
    agent: str | None
    session: str | None
    claims: Mapping[str, object] = field(default_factory=dict)
    declared_tools: tuple[str, ...] = ()
    budget: BudgetView | None = None
    version: int = INPUT_VERSION

    def document(self) -> dict[str, object]:
        return {
            "version": self.version,
            "source": self.source,
            "agent": self.agent,
            "claims": dict(self.claims),
            "session": self.session,
            "provider": self.provider,
            "model": self.model,
            "endpoint": self.endpoint,
            "tool": self.tool,
            "arguments": dict(self.arguments) if self.arguments is not None else None,
            "raw_arguments": self.raw_arguments,
            "effect": self.effect.value,
            "api": self.api,
            "declared_tools": list(self.declared_tools),
            "budget": self.budget.document() if self.budget is not None else None,
        }

    def canonical(self) -> str:
        """The document as canonical JSON (sorted keys, no spaces, ASCII): what is sent,
        and what the cache key hashes."""
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, default=str)

    def key(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()


def input_for(call: ToolCall, exchange: Exchange, *, source: Source, effect: Effect,
              api: str | None = None, budget: BudgetView | None = None) -> OpaInput:
    parsed = call.arguments if call.problem is None else None
    return OpaInput(
        source=source,
        tool=call.name,
        arguments=parsed,
        raw_arguments=None if parsed is not None else call.raw_arguments,
        effect=effect,
        api=api,
        provider=exchange.provider,
        model=exchange.model,
        endpoint=exchange.endpoint,
        agent=exchange.agent,
        session=exchange.session,
        claims=exchange.claims,
        declared_tools=exchange.declared_tools,
        budget=budget,
    )


# --- answers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Defined:
    """OPA answered `{"result": value}`."""

    value: object


@dataclass(frozen=True, slots=True)
class Undefined:
    """OPA answered `{}`: no rule at that path produced a value."""


@dataclass(frozen=True, slots=True)
class Failed:
    """No answer to interpret; `reason` is one of ERROR_REASONS."""

    reason: str
    detail: str


Reply = Defined | Undefined | Failed


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an answer means: `trace` joins the rules' decision; `result` (allow, deny,
    hold, error) and `error` (None for a real verdict) are the metric labels. Only a
    real verdict is cached."""

    trace: RuleTrace
    result: str
    error: str | None = None

    @property
    def cacheable(self) -> bool:
        return self.error is None


def parse_json(text: str | bytes) -> object:
    """Strict JSON: duplicate keys and NaN/Infinity are errors (two readers must not
    disagree on what OPA said)."""
    return strict_json.loads(text)


def read_http(status: int, body: bytes) -> Reply:
    """A Data API response (`POST /v1/data/{path}`) as a Reply."""
    if status != 200:
        detail = f"HTTP {status}"
        try:
            err = parse_json(body)
        except ValueError:
            err = None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            detail += f" ({err['code']})"
        return Failed("status", detail)
    try:
        doc = parse_json(body)
    except (ValueError, UnicodeDecodeError) as e:
        return Failed("bad_json", f"the response is not JSON ({e})")
    if not isinstance(doc, dict):
        return Failed("bad_json", f"the response is a JSON {_kind(doc)}, not an object")
    if "result" not in doc:
        return Undefined()
    return Defined(doc["result"])


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def clean_reason(text: str) -> str:
    """The policy's reason as the agent will read it: one line, bounded."""
    flat = "".join(c if c.isprintable() else " " for c in text).strip()
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 1] + "…"


def _error(rule: str, reason: str, detail: str) -> Verdict:
    return Verdict(RuleTrace(rule, True, detail, Action.DENY), "error", reason)


def interpret(reply: Reply, path: str) -> Verdict:
    rule = RULE_PREFIX + path
    if isinstance(reply, Failed):
        failed_rule = UNAVAILABLE if reply.reason in _UNAVAILABLE_REASONS else BAD_RESULT
        what = "could not be reached" if failed_rule == UNAVAILABLE else "answered nothing usable"
        return _error(failed_rule, reply.reason,
                      f"the policy service (OPA) {what}: {reply.detail}; denied (fail closed)")
    if isinstance(reply, Undefined):
        return _error(UNDEFINED, "undefined", f"OPA has no decision at {path} (the result is "
                      "undefined); denied (fail closed)")
    value = reply.value
    if value is True:
        return Verdict(RuleTrace(rule, True, "allowed by the OPA policy", Action.ALLOW), "allow")
    if value is False:
        return Verdict(RuleTrace(rule, True, "denied by the OPA policy", Action.DENY), "deny")
    if not isinstance(value, dict):
        return _error(BAD_RESULT, "bad_result", f"OPA's result at {path} is a {_kind(value)}, "
                      "not true/false or an object with allow; denied (fail closed)")
    allow, action, reason = value.get("allow"), value.get("action"), value.get("reason")
    problem = None
    if allow is not None and not isinstance(allow, bool):
        problem = f"allow is a {_kind(allow)}, not a boolean"
    elif action is not None and action not in ("allow", "deny", "hold"):
        problem = "action must be allow, deny or hold"
    elif reason is not None and not isinstance(reason, str):
        problem = f"reason is a {_kind(reason)}, not a string"
    if problem:
        return _error(BAD_RESULT, "bad_result", f"OPA's result at {path} is malformed ({problem});"
                      " denied (fail closed)")
    text = clean_reason(reason) if isinstance(reason, str) and reason.strip() else ""
    if action == "hold":
        return Verdict(RuleTrace(rule, True, text or "held by the OPA policy", Action.HOLD), "hold")
    if allow is True and action in (None, "allow"):
        return Verdict(RuleTrace(rule, True, text or "allowed by the OPA policy", Action.ALLOW),
                       "allow")
    return Verdict(RuleTrace(rule, True, text or "denied by the OPA policy", Action.DENY), "deny")


def check_path(path: str) -> str | None:
    """A problem with a decision path (`tether/decision`), or None. Segments are Rego
    identifiers, so the path is both a URL path and a `data.` reference."""
    parts = path.split("/")
    for p in parts:
        if not p or not (p[0].isascii() and (p[0].isalpha() or p[0] == "_")) or not all(
                c.isascii() and (c.isalnum() or c == "_") for c in p):
            return f"{path!r}: each segment must be a Rego identifier (letters, digits, _)"
    return None
