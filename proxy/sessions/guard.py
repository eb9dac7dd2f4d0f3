"""The session guard: reserve before forwarding, settle after, break loops.

    admission = await guard.admit(...)   # before a byte goes upstream; raises BudgetExceeded
    ...forward, read tool calls...
    trace = await guard.check_call(admission, call)   # loop breakers, per-tool counts
    ...respond...
    await guard.settle(admission, usage)  # real usage; or guard.release() if nothing was used

A reservation is the request's worst case (estimated input tokens plus its
max output tokens, priced), so concurrent requests cannot all pass before any
spend is recorded. A store failure fails closed (503) unless
`budgets_on_store_error: allow`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from ..audit import AuditLog, AuditWriteError
from ..errors import BudgetExceeded, StoreUnavailable
from ..model import Action, RuleTrace, ToolCall, Usage
from ..policy.names import normalize
from ..telemetry import Metrics, glob_of
from . import loops
from .budgets import (
    Budgets,
    Counter,
    counters,
    estimate_input_tokens,
    session_bucket,
    with_amount,
    worst_case,
)
from .store import Store

log = logging.getLogger("tether.sessions")

TOOL_RULE = "tether:tool-budget"
STORE_RULE = "tether:store-unavailable"


@dataclass(slots=True)
class Admission:
    agent: str | None
    session: str
    model: str
    bucket: str
    reserved: list[Counter] = field(default_factory=list)
    input_estimate: int = 0
    done: bool = False


class SessionGuard:
    def __init__(self, budgets: Budgets, store: Store, metrics: Metrics, audit: AuditLog,
                 on_store_error: Action = Action.DENY) -> None:
        self.budgets = budgets
        self.store = store
        self.metrics = metrics
        self.audit = audit
        self.fail_open = on_store_error is Action.ALLOW
        # Token and cost labels: agents with budgets, models as the price-table glob they
        # are priced by (an unreadable glob keeps its position), everything else `other`.
        metrics.labels.agents |= set(budgets.agents)
        metrics.labels.models = [(p, glob_of(p) or f"prices[{i}]")
                                 for i, (p, _) in enumerate(budgets.prices.entries)]

    def _store_failed(self, op: str, e: StoreUnavailable) -> None:
        self.metrics.store_errors.labels(op).inc()
        log.warning("session store failed during %s: %s", op, e)

    async def admit(self, *, agent: str | None, session: str, model: str, body_bytes: int,
                    max_output: int | None, now: float | None = None) -> Admission:
        now = time.time() if now is None else now
        bucket = session_bucket(agent, session)
        input_estimate = estimate_input_tokens(body_bytes)
        admission = Admission(agent, session, model, bucket, input_estimate=input_estimate)
        limit = self.budgets.session
        max_age = limit.max_age_s if limit is not None else None
        try:
            amounts = worst_case(self.budgets, model, input_estimate, max_output)
            wanted = counters(self.budgets, agent, session, now, amounts)
            # One store call (one Redis round trip): the trip note, the session's age,
            # then the reservation, which is not made when either stops the request.
            found = await self.store.admit(bucket, wanted, now=now,
                                           ttl_s=self.budgets.session_ttl_s, max_age_s=max_age,
                                           enforce_age=limit is not None and not limit.shadow)
        except StoreUnavailable as e:
            self._store_failed("reserve", e)
            if self.fail_open:
                self.metrics.fail_open.labels("store").inc()
                return replace(admission, done=True)
            self.metrics.fail_closed.labels("store").inc()
            raise
        if found.tripped:
            self.metrics.budget_trips.labels("session", "tripped", "enforce").inc()
            raise BudgetExceeded(f"this session was stopped: {found.tripped}")
        if limit is not None and max_age is not None and found.first_seen is not None \
                and now - found.first_seen > max_age:
            self._trip_metric(limit.shadow, "session", "max_age")
            if not limit.shadow:
                raise BudgetExceeded(f"the session is older than its maximum age of "
                                     f"{int(max_age)} s")
        result = found.reserved
        if result is None:  # a store reserves unless tripped or too old (both above)
            raise StoreUnavailable("the session store made no reservation")
        for c in result.shadow:
            self._trip_metric(True, c.label.split(" ")[0], c.field)
            self._record(admission, c, shadow=True)
        if not result.ok:
            c = result.blocked[0]
            self._trip_metric(False, c.label.split(" ")[0], c.field)
            self._record(admission, c, shadow=False)
            retry = int(c.reset_at - now) + 1 if c.reset_at else None
            raise BudgetExceeded(self._message(c, wanted), retry_after=retry)
        admission.reserved = wanted
        return admission

    def _message(self, c: Counter, wanted: list[Counter]) -> str:
        unit = "micro-USD" if c.field == "cost_usd" else c.field.replace("_", " ")
        if c.field == "cost_usd":
            return (f"{c.label} budget spent: this request could cost up to "
                    f"${c.amount / 1e6:.4f} and the limit is ${(c.limit or 0) / 1e6:.4f}")
        return f"{c.label} budget spent: this request needs up to {c.amount} {unit}, " \
               f"the limit is {c.limit}"

    def _trip_metric(self, shadow: bool, scope: str, dim: str) -> None:
        self.metrics.budget_trips.labels(scope, dim, "shadow" if shadow else "enforce").inc()

    def _record(self, admission: Admission, c: Counter, *, shadow: bool) -> None:
        try:
            self.audit.write({"kind": "budget", "agent": admission.agent,
                              "session": admission.session, "model": admission.model,
                              "budget": c.label, "limit": c.limit, "requested": c.amount,
                              "enforced": not shadow})
        except AuditWriteError:
            log.exception("audit write failed for a budget record")

    async def settle(self, admission: Admission | None, usage: Usage | None,
                     output_estimate: int | None = None, *, extra_calls: int = 0) -> None:
        """Charge what was used: the reported usage, else the input estimate plus the
        output seen so far, else (nothing known) the whole reservation stays charged.
        `extra_calls`: upstream calls tether made to continue the answer (mcp_approvals),
        charged as LLM calls too; `usage` is then theirs added up."""
        if admission is None or admission.done:
            return
        admission.done = True
        if usage is None and output_estimate is None:
            return
        if usage is None:
            usage = Usage(admission.input_estimate, output_estimate or 0)
        cost = self.budgets.prices.cost_micro_usd(admission.model, usage)
        labels = self.metrics.labels
        agent, model = labels.agent(admission.agent), labels.model(admission.model)
        self.metrics.tokens.labels(agent, model, "input").inc(usage.input_tokens)
        self.metrics.tokens.labels(agent, model, "output").inc(usage.output_tokens)
        self.metrics.cost.labels(agent, model).inc(cost / 1e6)
        actual = {"tokens": usage.total_tokens, "input_tokens": usage.input_tokens,
                  "output_tokens": usage.output_tokens, "cost_usd": cost,
                  "llm_calls": 1 + extra_calls}
        deltas = [with_amount(c, actual[c.field] - c.amount) for c in admission.reserved]
        await self._adjust("settle", deltas)

    async def release(self, admission: Admission | None) -> None:
        """Nothing was used (the upstream failed): give the whole reservation back."""
        if admission is None or admission.done:
            return
        admission.done = True
        await self._adjust("release", [with_amount(c, -c.amount) for c in admission.reserved])

    async def _adjust(self, op: str, deltas: list[Counter]) -> None:
        try:
            await self.store.adjust(deltas)
        except StoreUnavailable as e:
            self._store_failed(op, e)

    async def check_call(self, admission: Admission | None, call: ToolCall) -> RuleTrace | None:
        """Loop breakers and per-tool counts for one call; a trace when it must be denied."""
        if admission is None:
            return None
        try:
            return await self._check_call(admission, call)
        except StoreUnavailable as e:
            self._store_failed("loop check", e)
            if self.fail_open:
                return None
            return RuleTrace(STORE_RULE, True, e.message, Action.DENY)

    async def _check_call(self, admission: Admission, call: ToolCall) -> RuleTrace | None:
        budgets = self.budgets
        cfg = budgets.loops
        if cfg.repeats is not None or cfg.pingpong is not None:
            count, recent = await self.store.observe(
                admission.bucket + ":loops", loops.signature(call), loops.history_needed(cfg),
                budgets.session_ttl_s)
            tripped = loops.verdict(cfg, call, count, recent)
            if tripped is not None:
                rule, message = tripped
                self.metrics.loop_trips.labels(rule, "shadow" if cfg.shadow else "enforce").inc()
                if not cfg.shadow:
                    if cfg.trip_session:
                        await self.store.trip(admission.bucket, message, budgets.session_ttl_s)
                    return RuleTrace(rule, True, message, Action.DENY)
        limit = budgets.session
        name = normalize(call.name)
        if limit is not None and name in limit.tools:
            counter = Counter(admission.bucket, f"tool:{name}", 1, limit.tools[name],
                              limit.shadow, budgets.session_ttl_s, None, f"session {name}")
            result = await self.store.reserve([counter])
            if not result.ok:
                self._trip_metric(False, "session", "tool_calls")
                return RuleTrace(TOOL_RULE, True, f"{call.name} may be called at most "
                                 f"{limit.tools[name]} times in a session", Action.DENY)
        return None

    async def status(self, agent: str | None, session: str) -> dict[str, object]:
        bucket = session_bucket(agent, session)
        spent = await self.store.read(bucket)
        limit = self.budgets.session
        limits = dict(limit.dims) if limit else {}
        remaining = {d: max(0, n - spent.get(d, 0)) for d, n in limits.items()}
        return {
            "session": session,
            "agent": agent,
            "spent": {k: v for k, v in spent.items() if not k.startswith("tool:")
                      and k != "first_seen"},
            "tool_calls": {k[5:]: v for k, v in spent.items() if k.startswith("tool:")},
            "limits": limits,
            "remaining": remaining,
            "cost_unit": "micro-USD",
            "first_seen": spent.get("first_seen"),
            "tripped": await self.store.tripped(bucket),
            "mode": "shadow" if limit and limit.shadow else "enforce",
        }

    async def reset(self, agent: str | None, session: str) -> None:
        bucket = session_bucket(agent, session)
        await self.store.delete([bucket, bucket + ":loops"])
