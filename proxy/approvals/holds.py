"""Turning a `hold` decision into allow or deny, by asking a human.

`wait` (default): an approval is opened for the exact call and the response
waits (a stream gets keep-alive comments) until it is approved, denied or
times out; approved releases the original call unchanged, anything else is a
deny. `ticket`: the call is answered at once with text naming the approval;
once approved, the same call (same tool, arguments, session and policy
revision) is allowed when the model issues it again, once, within the
validity window.

Every step of an approval is audited (`kind: approval`) with who decided and
why, and every held call ends with one `kind: hold` record under its decision's
id: approved, denied (by a person or by tether), expired or abandoned
(audit/outcomes.py). A held call is released only once that record is written.
When the approval store (Redis) cannot be reached, a hold is a deny that says
so, counted (`tether_approvals_decided_total{outcome="unavailable"}`) and
audited (`event: store_unavailable`): nothing held runs without a recorded
approval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from ..audit import AuditLog, AuditWriteError
from ..audit.outcomes import Outcome, hold_record
from ..errors import StoreUnavailable
from ..governor import AUDIT_ERROR
from ..model import Action, Decision, Exchange, ToolCall
from ..telemetry import Metrics
from . import caller
from .caller import CallerGone
from .context import RECENT, RECENT_CHARS, HoldContext, with_effect
from .queue import Approval, Approvals, Mode, State, TooManyPending, binding_of
from .settings import ApprovalSettings

log = logging.getLogger("tether.approvals")

KeepAlive = Callable[[str], Awaitable[None]]
# A held call a person approved, judged again when the policy changed while it waited
# (server/reload.py): the verdict to release instead of the approval's allow, or None.
Rejudge = Callable[[Decision, Approval], Decision | None]
LIMIT_RULE = "tether:approval-limit"
STORE_RULE = "tether:approval-store"
TETHER = "tether"   # `by` of what tether ended itself
EARLIER_SCAN = 20   # decided approvals read for a session's earlier holds
# Why a hold ended `abandoned`, as the agent and the approver read it.
RESTARTING = ("tether is restarting, so the call was not executed; it was not approved "
              "or denied by anyone")
LEFT = "the caller disconnected while it waited, so the call was not executed"
ENDED = "the caller's request ended while it waited, so the call was not executed"


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


class Holds:
    def __init__(self, queue: Approvals, settings: ApprovalSettings, audit: AuditLog,
                 metrics: Metrics, revision: str) -> None:
        self.queue = queue
        self.settings = settings
        self.audit = audit
        self.metrics = metrics
        self.revision = revision
        self._why: dict[str, str] = {}  # approval id -> why this process abandons it (metric)
        self._stopping = False
        self.rejudge: Rejudge | None = None  # set when the config can be reloaded
        queue.on_created(self._created)
        queue.on_decided(self._decided)

    async def start(self) -> None:
        await self.queue.start()

    async def stop(self) -> None:
        """tether is stopping (SIGTERM): what ends with it (everything, in memory; what
        its own requests wait on, in Redis) ends `abandoned` and audited, and each
        waiting request is answered at once with a denial saying tether is restarting;
        a hold that starts from now on ends the same way. So a held call can never be
        approved by a click that arrives after a restart. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        try:
            for approval in await self.queue.orphans():
                await self._abandon(approval, RESTARTING, "shutdown")
        except StoreUnavailable as e:
            log.error("approvals: could not end pending approvals at shutdown: %s", e.message)

    async def close(self) -> None:
        """After the last request: stop (if not yet) and let the store go."""
        try:
            await self.stop()
        finally:
            await self.queue.close()

    async def _abandon(self, approval: Approval, reason: str, why: str) -> None:
        self._why[approval.id] = why
        _, changed = await self.queue.abandon(approval.id, reason=reason)
        if not changed:
            self._why.pop(approval.id, None)

    def _record(self, event: str, approval: Approval) -> None:
        try:
            self.audit.write({"kind": "approval", "event": event, **approval.as_json()})
        except AuditWriteError:
            log.exception("audit write failed for an approval")

    def _created(self, approval: Approval) -> None:
        self.metrics.approvals_pending.inc()
        self._record("created", approval)

    def _decided(self, approval: Approval) -> None:
        if approval.state is State.ABANDONED:  # ended here; otherwise by a replica's sweep
            self.metrics.holds_abandoned.labels(self._why.pop(approval.id, "replica_gone")).inc()
        self.metrics.approvals_pending.dec()
        self.metrics.approvals_decided.labels(approval.state.value).inc()
        self.metrics.approval_wait_seconds.observe((approval.decided_at or time.time())
                                                   - approval.created)
        self._record(approval.state.value, approval)

    async def resolve(self, calls: Sequence[ToolCall], decisions: Sequence[Decision],
                      exchange: Exchange, keepalive: KeepAlive | None = None,
                      contexts: Sequence[HoldContext | None] = ()) -> list[Decision]:
        """The decisions with every hold replaced by allow or deny, each ending recorded.
        `contexts`: what the approver is shown beside each call (approvals/context.py),
        aligned with `calls`; missing ones are shown as unknown."""
        out = list(decisions)
        waiting: list[tuple[int, Approval]] = []
        started = time.monotonic()
        for i, (call, decision) in enumerate(zip(calls, decisions, strict=True)):
            if decision.action is not Action.HOLD:
                continue
            if self._stopping:  # nobody will be here to release it
                self.metrics.holds_abandoned.labels("shutdown").inc()
                out[i] = self._end(call, exchange, decision, Decision(
                    Action.DENY, decision.rules, RESTARTING, decision.on_deny, decision.effect),
                    Outcome.ABANDONED, by=TETHER, reason=RESTARTING)
                continue
            try:
                context = contexts[i] if i < len(contexts) else None
                if decision.ticket:
                    out[i] = await self._ticket(call, decision, exchange, context)
                    continue
                approval = await self._open(call, decision, exchange, Mode.WAIT, context)
            except TooManyPending as e:
                out[i] = self._limited(call, decision, exchange, e)
                continue
            except StoreUnavailable as e:
                out[i] = self._unavailable(call, decision, exchange, e)
                continue
            waiting.append((i, approval))
        if not waiting:
            return out
        try:
            finals = await self._wait([a for _, a in waiting], keepalive)
        except BaseException as e:
            why = LEFT if isinstance(e, CallerGone) else f"{ENDED} ({type(e).__name__})"
            for i, approval in waiting:
                gone = Decision(Action.DENY, decisions[i].rules, why, decisions[i].on_deny,
                                decisions[i].effect)
                self._end(calls[i], exchange, decisions[i], gone, Outcome.ABANDONED, by=TETHER,
                          reason=why, approval=approval, waited_s=time.monotonic() - started)
            raise
        waited = time.monotonic() - started
        for (i, approval), final in zip(waiting, finals, strict=True):
            out[i] = (self._outcome(calls[i], decisions[i], exchange, final, waited)
                      if isinstance(final, Approval) else
                      self._unavailable(calls[i], decisions[i], exchange, final, approval))
        return out

    def _end(self, call: ToolCall, exchange: Exchange, held: Decision, final: Decision,
             outcome: Outcome, *, by: str | None, reason: str | None,
             approval: Approval | None = None, waited_s: float | None = None) -> Decision:
        """Record how a hold ended; a release that cannot be recorded is a deny."""
        final = replace(final, decision_id=held.decision_id)
        mode = Mode.TICKET if held.ticket else Mode.WAIT
        try:
            self.audit.write(hold_record(
                call, exchange, held, final, outcome, by=by, reason=reason,
                approval_id=approval.id if approval else None, mode=mode.value,
                waited_s=waited_s))
        except AuditWriteError:
            log.exception("audit write failed for the end of a hold")
            self.metrics.fail_closed.labels("audit").inc()
            if final.allowed:
                return Decision(Action.DENY, final.rules + (AUDIT_ERROR,),
                                "approved, but the audit log cannot be written", final.on_deny,
                                final.effect, decision_id=held.decision_id)
        return final

    async def _open(self, call: ToolCall, decision: Decision, exchange: Exchange, mode: Mode,
                    context: HoldContext | None) -> Approval:
        context = with_effect(context, decision.effect.value)
        if context.recent is None:  # no session history was read: its earlier holds, then
            context = replace(context, recent=await self._earlier_holds(exchange))
        return await self.queue.create(
            call, exchange, mode=mode, rules=decision.rules, message=decision.message,
            revision=self.revision, approvers=decision.approvers,
            timeout_s=decision.timeout_s or self.settings.timeout_s, context=context)

    async def _earlier_holds(self, exchange: Exchange) -> tuple[str, ...] | None:
        """The session's last holds and how they ended, when no history was read (None:
        not known, shown as unknown); without a session, the agent's."""
        if exchange.session is None and exchange.agent is None:
            return None
        try:
            found = [*await self.queue.recent(EARLIER_SCAN), *await self.queue.pending()]
        except StoreUnavailable:
            return None
        # A request with no session (egress, often) is the agent's: its holds anywhere.
        mine = sorted((a for a in found if a.agent == exchange.agent and (
            exchange.session is None or a.session == exchange.session)), key=lambda a: a.created)
        return tuple(f"{time.strftime('%H:%M:%S', time.gmtime(a.created))} held "
                     f"{a.tool[:RECENT_CHARS]}: {a.state.value}"
                     + (f" by {a.decided_by[:80]}" if a.decided_by else "")
                     for a in mine[-RECENT:])

    def _limited(self, call: ToolCall, decision: Decision, exchange: Exchange,
                 e: TooManyPending) -> Decision:
        self.metrics.approvals_decided.labels("limited").inc()
        final = Decision(Action.DENY, decision.rules + (LIMIT_RULE,),
                         f"{decision.message}; approval required, but {e}".lstrip("; "),
                         decision.on_deny, decision.effect)
        return self._end(call, exchange, decision, final, Outcome.DENIED, by=TETHER,
                         reason=str(e))

    def _unavailable(self, call: ToolCall, decision: Decision, exchange: Exchange,
                     e: StoreUnavailable, approval: Approval | None = None) -> Decision:
        """Fail closed: without the store, no approval can be recorded or read."""
        log.error("approvals: %s is denied: %s", call.name, e.message)
        self.metrics.approvals_decided.labels("unavailable").inc()
        try:
            self.audit.write({"kind": "approval", "event": "store_unavailable",
                              "id": approval.id if approval else None, "tool": call.name,
                              "session": exchange.session, "agent": exchange.agent,
                              "provider": exchange.provider, "rules": list(decision.rules),
                              "error": e.message})
        except AuditWriteError:
            log.exception("audit write failed for an approval")
        final = Decision(Action.DENY, decision.rules + (STORE_RULE,),
                         f"{decision.message}; approval required, but {e.message}, so it is "
                         f"denied".lstrip("; "), decision.on_deny, decision.effect)
        return self._end(call, exchange, decision, final, Outcome.DENIED, by=TETHER,
                         reason=e.message, approval=approval)

    async def _ticket(self, call: ToolCall, decision: Decision, exchange: Exchange,
                      context: HoldContext | None = None) -> Decision:
        binding = binding_of(call, exchange, self.revision)
        used = await self.queue.redeem(binding)
        if used is not None:
            self._record("used", used)
            allowed = Decision(Action.ALLOW, decision.rules,
                               f"approved by {used.decided_by} (approval {used.id})",
                               decision.on_deny, decision.effect)
            return self._end(call, exchange, decision, allowed, Outcome.APPROVED,
                             by=used.decided_by, reason=used.reason, approval=used)
        approval = (await self.queue.waiting_for(binding)
                    or await self._open(call, decision, exchange, Mode.TICKET, context))
        validity = _human(self.settings.ticket_validity_s)
        why = f"{decision.message}; " if decision.message else ""
        answered = Decision(Action.DENY, decision.rules,
                            f"{why}it awaits human approval {approval.id}. Once it is approved, "
                            f"issue exactly the same call again (within {validity})",
                            decision.on_deny, decision.effect)
        return self._end(call, exchange, decision, answered, Outcome.DENIED, by=TETHER,
                         reason=f"a ticket: it awaits approval {approval.id}; the same call "
                                "issued again once approved is allowed", approval=approval)

    async def _wait(self, approvals: list[Approval], keepalive: KeepAlive | None
                    ) -> list[Approval | StoreUnavailable]:
        """Every `caller.PRESENCE_S` it looks whether the caller is still there (the
        front end's `caller.watching`), every `keepalive` it sends a keep-alive."""
        tasks = [asyncio.ensure_future(self.queue.wait(a.id)) for a in approvals]
        names = ", ".join(a.id for a in approvals)
        gone = caller.current()
        loop = asyncio.get_running_loop()
        next_keepalive = loop.time() + self.settings.keepalive_s
        try:
            while True:
                if self._stopping:  # opened as tether began to stop: it ends like the rest
                    for a in approvals:
                        await self._abandon(a, RESTARTING, "shutdown")
                tick = min(caller.PRESENCE_S, max(0.0, next_keepalive - loop.time()))
                done, pending = await asyncio.wait(tasks, timeout=tick)
                if gone is not None and gone():
                    # Even when just decided: a call whose caller is gone is not released
                    # (nor an egress request sent); its hold ends abandoned.
                    raise CallerGone(f"the caller of {names} disconnected")
                if not pending:
                    break
                if keepalive is not None and loop.time() >= next_keepalive:
                    next_keepalive = loop.time() + self.settings.keepalive_s
                    await keepalive(f"tether: waiting for approval {names}")
        except BaseException as e:
            # The agent went away (or its request was cancelled): nobody may approve a
            # call whose request is gone; a late click is told so.
            for task in tasks:
                task.cancel()
            left = isinstance(e, CallerGone | ConnectionResetError)
            try:
                for a in approvals:
                    await self._abandon(a, LEFT if left else ENDED,
                                        "caller_gone" if left else "request_ended")
            except StoreUnavailable as unavailable:
                log.error("approvals: could not end %s: %s", names, unavailable.message)
            raise
        finals: list[Approval | StoreUnavailable] = []
        for task in tasks:
            error = task.exception()
            if isinstance(error, StoreUnavailable):
                finals.append(error)
            elif error is not None:
                raise error
            else:
                finals.append(task.result())
        return finals

    def _outcome(self, call: ToolCall, decision: Decision, exchange: Exchange,
                 final: Approval, waited_s: float) -> Decision:
        def end(verdict: Decision, outcome: Outcome) -> Decision:
            return self._end(call, exchange, decision, verdict, outcome, by=final.decided_by,
                             reason=final.reason, approval=final, waited_s=waited_s)

        if final.state is State.APPROVED:
            again = self.rejudge(decision, final) if self.rejudge is not None else None
            if again is not None and not again.allowed:
                return end(again, Outcome.DENIED)
            return end(Decision(Action.ALLOW, decision.rules,
                                f"approved by {final.decided_by} (approval {final.id})",
                                decision.on_deny, decision.effect), Outcome.APPROVED)
        outcome = Outcome.DENIED
        if final.state is State.ABANDONED:
            outcome = Outcome.ABANDONED
            message = f"{final.reason or 'the caller is gone'} (approval {final.id})"
        elif final.state is State.EXPIRED:
            outcome = Outcome.EXPIRED
            message = (f"no one approved it within "
                       f"{_human(final.expires - final.created)} (approval {final.id})")
        else:
            reason = f": {final.reason}" if final.reason else ""
            message = f"denied by {final.decided_by} (approval {final.id}){reason}"
        why = f"{decision.message}; " if decision.message else "approval required; "
        return end(Decision(Action.DENY, decision.rules, why + message, decision.on_deny,
                            decision.effect), outcome)
