"""One decision, two planes: an LLM tool call allowed or approved, and the API request
that carries it out (docs/linked-calls.md).

The LLM plane calls `record` with the decisions it is about to release: each allowed
call of a tool linked to an API operation (`tools: {X: {api: ..., args: ...}}`) is filed
in the ledger with its decision id. The egress plane (forward proxy, transparent mode,
`/apis/`) calls `redeem` before it decides a request: an entry of the same agent (and
session, when the request names one) with exactly the same API arguments is taken,
once; the request's decision records its id (`linked_decision`), and an approved
entry answers the request's hold. `give_back` returns an entry whose request was not
forwarded after all.

Fail closed: a ledger that cannot be written or read redeems nothing (the request is
decided as if no call had asked for it), counted in `tether_fail_closed{reason="ledger"}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from .errors import StoreUnavailable
from .model import Action, Decision, Effect, Exchange, RuleTrace, ToolCall
from .policy.tool_apis import (
    NO_DECIDED_CALL,
    ToolApis,
    Uncomparable,
    canonical_text,
    expected,
    fingerprint,
    observed,
)
from .sessions.ledger import Entry, Ledger
from .telemetry import Metrics

log = logging.getLogger("tether.linked")
SHOWN = 300  # characters of the API arguments an approval message shows


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


@dataclass(frozen=True, slots=True)
class Redeemed:
    """What `redeem` found: the entry taken (None: none), and the deny that
    `require_decided_call` adds when a write found none."""

    entry: Entry | None = None
    trace: RuleTrace | None = None


class LinkedCalls:
    def __init__(self, tools: ToolApis, ledger: Ledger, metrics: Metrics) -> None:
        self.tools = tools
        self.ledger = ledger
        self.metrics = metrics

    def for_approver(self, calls: Sequence[ToolCall], decisions: Sequence[Decision]
                     ) -> list[Decision]:
        """Holds of linked tools, their message saying what approving them also lets run
        (the approval shows it; so does the agent's answer if it ends denied)."""
        out = list(decisions)
        if not self.tools.links:
            return out
        ttl = _human(self.tools.settings.decided_call_ttl_s)
        for i, (call, decision) in enumerate(zip(calls, decisions, strict=True)):
            link = self.tools.for_tool(call.name)
            if decision.action is not Action.HOLD or link is None or call.arguments is None:
                continue
            try:
                text = canonical_text(expected(link, call.arguments))
            except (Uncomparable, ValueError, RecursionError):
                continue
            if len(text) > SHOWN:
                text = text[:SHOWN] + "..."
            note = (f"approving it also lets one {link.operation} request with exactly "
                    f"{text} through, within {ttl}")
            out[i] = replace(decision, message=f"{decision.message}; {note}" if decision.message
                             else note)
        return out

    async def record(self, calls: Sequence[ToolCall], held: Sequence[Decision],
                     final: Sequence[Decision], exchange: Exchange) -> None:
        """Before the calls are released: file each allowed call of a linked tool. `held`
        are the decisions before holds were resolved (a hold that ended allowed was
        approved by a human), `final` after."""
        if not self.tools.links:
            return
        ttl = self.tools.settings.decided_call_ttl_s
        for call, before, after in zip(calls, held, final, strict=True):
            link = self.tools.for_tool(call.name)
            if link is None or not after.allowed or call.arguments is None:
                continue
            try:
                text = canonical_text(expected(link, call.arguments))
            except (Uncomparable, ValueError, RecursionError) as e:
                log.warning("%s: arguments cannot be compared (%s); its request will be "
                            "decided on its own", call.name, e)
                continue
            approved = (after.message or "approved") if before.action is Action.HOLD else None
            entry = Entry(fingerprint(exchange.agent, link.operation, text), after.decision_id,
                          exchange.agent, exchange.session, call.name, link.operation,
                          text[:SHOWN], approved, time.time() + ttl)
            try:
                await self.ledger.put(entry, ttl)
            except StoreUnavailable as e:
                # The call is released; its API request will be decided on its own (a hold,
                # or a deny under require_decided_call): nothing passes for want of a record.
                log.error("ledger: %s", e.message)
                self.metrics.fail_closed.labels("ledger").inc()

    async def redeem(self, *, agent: str | None, session: str | None, operation: str | None,
                     arguments: Mapping[str, object], effect: Effect) -> Redeemed:
        """The entry an egress request redeems, taken (at most one, at most once)."""
        entry: Entry | None = None
        why = "no allowed or approved tool call of this agent asked for it"
        if operation is None:
            why = "tether cannot name the operation, so no tool call can have asked for it"
        elif agent is None and session is None:
            why = "the request names no agent and no session, so no tool call can be its own"
        elif operation in self.tools.operations:
            try:
                text = canonical_text(observed(operation, arguments))
                entry = await self.ledger.take(fingerprint(agent, operation, text), session)
            except (Uncomparable, ValueError, RecursionError):
                why = "its arguments have no canonical form"
            except StoreUnavailable as e:
                log.error("ledger: %s", e.message)
                self.metrics.fail_closed.labels("ledger").inc()
                why = f"{e.message}, so no tool call can be redeemed"
            else:
                if entry is None:
                    why = (f"no allowed or approved tool call of this "
                           f"{'session' if session else 'agent'} asked for {operation} with "
                           "exactly these arguments (or it was already used, or expired)")
        else:
            why = f"no tool is linked to {operation}"
        trace = None
        if entry is None and effect is Effect.WRITE and self.tools.settings.require_decided_call:
            trace = RuleTrace(NO_DECIDED_CALL, True, f"no write without a governed tool call: "
                              f"{why}", Action.DENY)
        return Redeemed(entry, trace)

    async def give_back(self, entry: Entry) -> None:
        """The request that took `entry` was not forwarded: the call may still be redeemed
        until it expires."""
        left = entry.expires - time.time()
        if left <= 0:
            return
        try:
            await self.ledger.put(entry, left)
        except StoreUnavailable as e:
            log.error("ledger: %s", e.message)
            self.metrics.fail_closed.labels("ledger").inc()

    async def close(self) -> None:
        await self.ledger.close()
