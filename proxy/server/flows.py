"""The session history on the decision path: loaded before a batch of calls is decided,
recorded once they are (a hold as it ended), before the agent can see any of them.

Only when a rule reads it (`Policy.reads_history`). A history that cannot be read or
written is a deny (`tether:history-unavailable`), counted, unless
`defaults.on_store_error: allow`: a flow rule that cannot see the session must not
let the call through as if the session were empty.

Tool results in the request (sessions/results.py) are tied to the calls they answer;
a result for a call this session's history has no allowed call for is seen by the
rules as an untrusted earlier call of unknown origin (flows.UNSEEN_TOOL).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from ..audit import AuditWriteError
from ..config import Config
from ..errors import StoreUnavailable
from ..governor import Governor
from ..model import Action, Decision, Effect, Exchange, PastCall, RuleTrace, ToolCall
from ..policy.apis_config import Apis
from ..policy.flows import UNSEEN_TOOL
from ..policy.names import normalize
from ..sessions.budgets import session_bucket
from ..sessions.history import History, entry, history_for, printable
from ..sessions.store import Store

log = logging.getLogger("tether.flows")

HISTORY_RULE = "tether:history-unavailable"
UNSEEN_LABEL = "untrusted"


def unseen(call_id: str) -> PastCall:
    return PastCall("", UNSEEN_TOOL, Effect.READ, Action.ALLOW, frozenset({UNSEEN_LABEL}),
                    summary=f"a tool result for call id {printable(repr(call_id[:80]))}, which tether never "
                            "allowed in this session", call_id=call_id)


@dataclass(slots=True)
class FlowState:
    """One governed request's part in its session's flow: the call ids its tool results
    answer, the provider-run calls its answer reports as run (seen by the model before
    the calls that follow them), and the decisions already recorded from this answer."""

    agent: str | None = None
    session: str | None = None
    request_id: str = ""
    results: tuple[str, ...] = ()
    ran: list[PastCall] = field(default_factory=list)
    decided: set[str] = field(default_factory=set)


class SessionFlows:
    def __init__(self, governor: Governor, history: History, apis: Apis, *,
                 fail_open: bool) -> None:
        self.governor = governor
        self.history = history
        self.apis = apis
        self.fail_open = fail_open

    async def before(self, exchange: Exchange, state: FlowState
                     ) -> tuple[Exchange, RuleTrace | None]:
        """The exchange with the session's history on it, or the trace that denies the
        batch when the history cannot be read."""
        past, broken = await self.load(state.agent, state.session, state.results,
                                       state.decided)
        return replace(exchange, history=past + tuple(state.ran)), broken

    async def after(self, calls: Sequence[ToolCall], decisions: Sequence[Decision],
                    state: FlowState) -> list[Decision]:
        """Records the batch (and the provider-run calls reported before it)."""
        apis = [op.name if (op := self.apis.for_tool(c.name)) else None for c in calls]
        batch = self.entries(calls, decisions, apis)
        entries = [*state.ran, *batch]
        state.ran.clear()
        state.decided |= {e.decision_id for e in batch}  # not the ran ones: the model saw them
        return await self.record(state.agent, state.session, entries, calls, decisions,
                                 state.request_id)

    def ran(self, call: ToolCall, decision: Decision, state: FlowState) -> None:
        """A provider-run call the answer reports as run: recorded with the next batch, as
        allowed whatever the policy said of it (it ran; its content is in the context)."""
        state.ran.extend(replace(e, action=Action.ALLOW)
                         for e in self.entries([call], [decision], [None]))

    def _failed(self, what: str, e: StoreUnavailable) -> bool:
        """Counts the failure; True when it fails open."""
        metrics = self.governor.metrics
        metrics.store_errors.labels(what).inc()
        log.warning("session history failed during %s: %s", what, e)
        (metrics.fail_open if self.fail_open else metrics.fail_closed).labels("history").inc()
        return self.fail_open

    async def load(self, agent: str | None, session: str | None, results: Sequence[str] = (),
                   skip: Collection[str] = ()) -> tuple[tuple[PastCall, ...], RuleTrace | None]:
        """The history the rules read, or the trace that denies every call when it cannot
        be read. `skip`: decision ids of calls decided earlier in this same answer (a
        stream decides its calls in batches): the model had not seen their results."""
        try:
            past = await self.history.load(session_bucket(agent, session or "default"))
        except StoreUnavailable as e:
            if self._failed("history load", e):
                return (), None
            return (), RuleTrace(HISTORY_RULE, True, f"{e.message}; flow rules cannot see "
                                 "this session, so its calls are denied", Action.DENY)
        if skip:
            past = tuple(p for p in past if p.decision_id not in skip)
        allowed = {p.call_id for p in past if p.call_id and p.action is Action.ALLOW}
        return past + tuple(unseen(c) for c in results if c not in allowed), None

    def entries(self, calls: Sequence[ToolCall], decisions: Sequence[Decision],
                apis: Sequence[str | None]) -> list[PastCall]:
        labels = self.governor.engine.policy.flows.labels
        return [entry(c, d, labels.of(normalize(c.name), api), api=api)
                for c, d, api in zip(calls, decisions, apis, strict=True)]

    async def record(self, agent: str | None, session: str | None, entries: Sequence[PastCall],
                     calls: Sequence[ToolCall], decisions: Sequence[Decision],
                     request_id: str) -> list[Decision]:
        """Records the entries; when that fails, every allowed call of the batch becomes
        a deny (its absence from the history could let a later write through), and an
        audit record of kind `history` says so under each decision id."""
        try:
            await self.history.record(session_bucket(agent, session or "default"), entries)
            return list(decisions)
        except StoreUnavailable as e:
            if self._failed("history record", e):
                return list(decisions)
            why = f"{e.message}; the call could not be recorded for flow rules, so it is denied"
        out: list[Decision] = []
        for c, d in zip(calls, decisions, strict=True):
            if not d.allowed:
                out.append(d)
                continue
            out.append(Decision(Action.DENY, d.rules + (HISTORY_RULE,), why, d.on_deny, d.effect,
                                decision_id=d.decision_id))
            try:
                self.governor.audit.write({
                    "kind": "history", "decision_id": d.decision_id, "request_id": request_id,
                    "session": session, "agent": agent, "tool": c.name, "call_id": c.id,
                    "outcome": "denied", "rules": [HISTORY_RULE], "message": why})
            except AuditWriteError:
                log.exception("audit write failed for a history failure")
        return out


def make_flows(config: Config, governor: Governor, store: Store) -> SessionFlows | None:
    """None when no rule reads the history: nothing is loaded or recorded then."""
    policy = config.policy
    if not policy.reads_history:
        return None
    ttl = policy.flows.ttl_s or config.budgets.session_ttl_s
    return SessionFlows(governor, history_for(store, policy.flows.keep, ttl), config.apis,
                        fail_open=config.on_store_error is Action.ALLOW)
