"""The decision step both front ends call: decide, record, count.

`Governor.decide` is synchronous (the mitmproxy stream hook is) and never
raises: a failure while deciding becomes a deny (or an allow under
`on_error: allow`, counted apart), and a decision that cannot be audited is
a deny too. An allow or deny is recorded with its `outcome`; a `hold` is
returned as it is: the front end asks a human (approvals/holds.py), which
records how it ended under the same `decision_id` (audit/outcomes.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from opentelemetry.trace import Tracer, get_current_span

from . import tracing
from .audit import AuditLog, AuditWriteError
from .audit.outcomes import immediate
from .ids import new_id
from .model import Action, Decision, Effect, Exchange, RuleTrace, ToolCall
from .policy.engine import PolicyEngine, merge
from .policy.names import normalize
from .telemetry import Metrics, exact_names

log = logging.getLogger("tether.governor")

INTERNAL_ERROR = "tether:internal-error"
AUDIT_ERROR = "tether:audit-unavailable"
HELD_KEPT = 4096  # held calls remembered for re-judging after a reload (approvals.max_pending: 100)


@dataclass(frozen=True, slots=True)
class Held:
    """What a `hold` was decided on, so a reload can judge the same call again under the
    new policy (server/reload.py): the verdicts from outside the rules (`extra`: OPA,
    OpenAPI, loops) are carried as they were, not asked again."""

    call: ToolCall
    exchange: Exchange
    api: str | None
    effect: Effect | None
    extra: tuple[RuleTrace, ...]
    revision: str


class Governor:
    def __init__(self, engine: PolicyEngine, audit: AuditLog, metrics: Metrics,
                 tracer: Tracer | None = None) -> None:
        self.tracer = tracer  # None: tracing is off, no span is made
        self.audit = audit
        self.metrics = metrics
        self.held: OrderedDict[str, Held] = OrderedDict()  # by decision id, the newest last
        self.use(engine)

    def use(self, engine: PolicyEngine) -> None:
        """Make `engine` the one every later decision reads (a reload swaps it whole; a
        decision reads it once, so it is judged by one revision from start to end)."""
        self.engine = engine
        # Tool labels: the `tools:` map and the exact (glob-free) names in rules and agent
        # scopes; a glob like `delete_*` names no tool, so its matches count as `other`.
        policy = engine.policy
        labels = self.metrics.labels
        labels.tools |= set(policy.effects)
        labels.tools |= exact_names(p for r in policy.rules for p in (r.tools or ()))
        labels.tools |= exact_names(p for a in policy.agents.values() for p in a.tools)
        labels.agents |= set(policy.agents)

    def decide(self, call: ToolCall, exchange: Exchange, *, request_id: str = "",
               extra: Sequence[RuleTrace] = (), api: str | None = None,
               effect: Effect | None = None, stage: str | None = None,
               linked: str | None = None) -> Decision:
        """`extra`: verdicts from outside the rules (loop breakers, per-tool budgets,
        OpenAPI checks). `api`, `effect`: the operation a call is (`jira.createIssue`).
        `stage`: "request" for a provider-run tool judged before the request leaves, "ran"
        for one an answer reports the provider already ran. `linked`: the LLM-side decision
        an egress request redeems (docs/linked-calls.md), recorded as `linked_decision`."""
        if self.tracer is None:
            return self._decide(call, exchange, request_id, extra, api, effect, stage, linked)
        name = tracing.decide_span_name(call.name, exchange.declared_tools)
        with self.tracer.start_as_current_span(name) as span:
            decision = self._decide(call, exchange, request_id, extra, api, effect, stage, linked)
            span.set_attributes(tracing.decision_attributes(call.name, call.id, decision,
                                                            self.engine.revision))
            return decision

    def _decide(self, call: ToolCall, exchange: Exchange, request_id: str,
                extra: Sequence[RuleTrace], api: str | None, effect: Effect | None,
                stage: str | None = None, linked: str | None = None) -> Decision:
        started = time.perf_counter()
        engine = self.engine  # once: a reload in between must not mix two revisions
        policy_action: Action | None = None
        try:
            decision = merge(engine.decide(call, exchange, api=api, effect=effect), extra)
            policy_action = decision.action
        except Exception as e:  # noqa: BLE001 - any failure here must fail closed
            log.exception("deciding a tool call failed")
            decision = self._on_error(f"internal error while deciding: {type(e).__name__}",
                                      engine)
        elapsed = time.perf_counter() - started
        span = get_current_span().get_span_context()
        decision = replace(decision, decision_id=new_id())
        outcome = immediate(decision.action)
        record: dict[str, object] = {
            "kind": "decision",
            "decision_id": decision.decision_id,
            "trace_id": format(span.trace_id, "032x") if span.is_valid else None,
            "request_id": request_id,
            "session": exchange.session,
            "agent": exchange.agent,
            "provider": exchange.provider,
            "endpoint": exchange.endpoint,
            "model": exchange.model,
            "stream": exchange.stream,
            "tool": call.name,
            "api": api,
            "call_id": call.id,
            "arguments": call.arguments if call.arguments is not None else call.raw_arguments,
            "action": decision.action.value,
            "policy_action": policy_action.value if policy_action else None,
            **({"outcome": outcome.value} if outcome else {}),
            "rules": list(decision.rules),
            "shadow_rules": list(decision.shadow),
            "message": decision.message,
            "effect": decision.effect.value,
            "policy_revision": engine.revision,
            "latency_ms": round(elapsed * 1000, 3),
            **({"stage": stage} if stage else {}),
            **({"linked_decision": linked} if linked else {}),
        }
        try:
            self.audit.write(record)
        except AuditWriteError:
            log.exception("audit write failed; denying")
            self.metrics.fail_closed.labels("audit").inc()
            decision = Decision(Action.DENY, (AUDIT_ERROR,), "the audit log cannot be written",
                                decision_id=decision.decision_id)
        self.metrics.decision_seconds.observe(elapsed)
        tool = self.metrics.labels.tool(normalize(call.name))
        for rule in decision.rules or ("none",):
            self.metrics.decisions.labels(self.metrics.labels.provider(exchange.provider), tool,
                                          decision.action.value, rule).inc()
        for rule in decision.shadow:
            self.metrics.shadow_matches.labels(rule).inc()
        if decision.action is Action.HOLD:
            self.held[decision.decision_id] = Held(call, exchange, api, effect, tuple(extra),
                                                   engine.revision)
            while len(self.held) > HELD_KEPT:
                self.held.popitem(last=False)
        return decision

    def _on_error(self, reason: str, engine: PolicyEngine) -> Decision:
        if engine.policy.on_error is Action.ALLOW:
            self.metrics.fail_open.labels("decide").inc()
            return Decision(Action.ALLOW, (INTERNAL_ERROR,), reason)
        self.metrics.fail_closed.labels("decide").inc()
        return Decision(Action.DENY, (INTERNAL_ERROR,), reason)

    def reject(self, *, provider: str, status: int, code: str, message: str,
               request_id: str, session: str | None = None, agent: str | None = None,
               endpoint: str = "") -> None:
        """Record a request that was refused as a whole (bad input, bad upstream)."""
        try:
            self.audit.write({
                "kind": "request",
                "request_id": request_id,
                "provider": provider,
                "endpoint": endpoint,
                "session": session,
                "agent": agent,
                "status": status,
                "code": code,
                "message": message,
                "policy_revision": self.engine.revision,
            })
        except AuditWriteError:
            log.exception("audit write failed for a rejected request")
            self.metrics.fail_closed.labels("audit").inc()
