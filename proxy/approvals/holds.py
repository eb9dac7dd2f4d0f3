"""Turning a `hold` decision into allow or deny, by asking a human.

`wait` (default): an approval is opened for the exact call and the response
waits (a stream gets keep-alive comments) until it is approved, denied or
times out; approved releases the original call unchanged, anything else is a
deny. `ticket`: the call is answered at once with text naming the approval;
once approved, the same call (same tool, arguments, session and policy
revision) is allowed when the model issues it again, once, within the
validity window.

Every step is audited (`kind: approval`) with who decided and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from ..audit import AuditLog, AuditWriteError
from ..model import Action, Decision, Exchange, ToolCall
from ..telemetry import Metrics
from .queue import Approval, ApprovalQueue, Mode, State, TooManyPending, binding_of
from .settings import ApprovalSettings

log = logging.getLogger("tether.approvals")

KeepAlive = Callable[[str], Awaitable[None]]
LIMIT_RULE = "tether:approval-limit"


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


class Holds:
    def __init__(self, queue: ApprovalQueue, settings: ApprovalSettings, audit: AuditLog,
                 metrics: Metrics, revision: str) -> None:
        self.queue = queue
        self.settings = settings
        self.audit = audit
        self.metrics = metrics
        self.revision = revision
        queue.on_created(self._created)
        queue.on_decided(self._decided)

    def stop(self) -> None:
        """tether is stopping: whatever is pending ends denied (and audited), so a held
        call can never be approved by a click that arrives after a restart."""
        for approval in self.queue.pending():
            self.queue.decide(approval.id, approve=False, by="tether",
                              reason="tether stopped before anyone decided")

    def _record(self, event: str, approval: Approval) -> None:
        try:
            self.audit.write({"kind": "approval", "event": event, **approval.as_json()})
        except AuditWriteError:
            log.exception("audit write failed for an approval")

    def _created(self, approval: Approval) -> None:
        self.metrics.approvals_pending.inc()
        self._record("created", approval)

    def _decided(self, approval: Approval) -> None:
        self.metrics.approvals_pending.dec()
        self.metrics.approvals_decided.labels(approval.state.value).inc()
        self.metrics.approval_wait_seconds.observe((approval.decided_at or time.time())
                                                   - approval.created)
        self._record(approval.state.value, approval)

    async def resolve(self, calls: Sequence[ToolCall], decisions: Sequence[Decision],
                      exchange: Exchange, keepalive: KeepAlive | None = None) -> list[Decision]:
        """The decisions with every hold replaced by allow or deny."""
        out = list(decisions)
        waiting: list[tuple[int, Approval, Decision]] = []
        for i, (call, decision) in enumerate(zip(calls, decisions, strict=True)):
            if decision.action is not Action.HOLD:
                continue
            if decision.ticket:
                out[i] = self._ticket(call, decision, exchange)
                continue
            try:
                approval = self._open(call, decision, exchange, Mode.WAIT)
            except TooManyPending as e:
                out[i] = self._limited(decision, e)
                continue
            waiting.append((i, approval, decision))
        if waiting:
            finals = await self._wait([a for _, a, _ in waiting], keepalive)
            for (i, _, decision), final in zip(waiting, finals, strict=True):
                out[i] = self._outcome(decision, final)
        return out

    def _open(self, call: ToolCall, decision: Decision, exchange: Exchange, mode: Mode
              ) -> Approval:
        return self.queue.create(
            call, exchange, mode=mode, rules=decision.rules, message=decision.message,
            revision=self.revision, approvers=decision.approvers,
            timeout_s=decision.timeout_s or self.settings.timeout_s)

    def _limited(self, decision: Decision, e: TooManyPending) -> Decision:
        self.metrics.approvals_decided.labels("limited").inc()
        return Decision(Action.DENY, decision.rules + (LIMIT_RULE,),
                        f"{decision.message}; approval required, but {e}".lstrip("; "),
                        decision.on_deny, decision.effect)

    def _ticket(self, call: ToolCall, decision: Decision, exchange: Exchange) -> Decision:
        binding = binding_of(call, exchange, self.revision)
        used = self.queue.redeem(binding)
        if used is not None:
            self._record("used", used)
            return Decision(Action.ALLOW, decision.rules,
                            f"approved by {used.decided_by} (approval {used.id})",
                            decision.on_deny, decision.effect)
        try:
            approval = self.queue.waiting_for(binding) or self._open(call, decision, exchange,
                                                                     Mode.TICKET)
        except TooManyPending as e:
            return self._limited(decision, e)
        validity = _human(self.settings.ticket_validity_s)
        why = f"{decision.message}; " if decision.message else ""
        return Decision(Action.DENY, decision.rules,
                        f"{why}it awaits human approval {approval.id}. Once it is approved, "
                        f"issue exactly the same call again (within {validity})",
                        decision.on_deny, decision.effect)

    async def _wait(self, approvals: list[Approval], keepalive: KeepAlive | None
                    ) -> list[Approval]:
        tasks = [asyncio.ensure_future(self.queue.wait(a.id)) for a in approvals]
        names = ", ".join(a.id for a in approvals)
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=self.settings.keepalive_s)
                if not pending:
                    break
                if keepalive is not None:
                    await keepalive(f"tether: waiting for approval {names}")
        except BaseException:
            # The agent went away (or we are shutting down): nobody should approve a
            # call whose request is gone.
            for task in tasks:
                task.cancel()
            for a in approvals:
                self.queue.decide(a.id, approve=False, by="tether",
                                  reason="the agent's request ended while it waited")
            raise
        return [t.result() for t in tasks]

    def _outcome(self, decision: Decision, final: Approval) -> Decision:
        if final.state is State.APPROVED:
            return Decision(Action.ALLOW, decision.rules,
                            f"approved by {final.decided_by} (approval {final.id})",
                            decision.on_deny, decision.effect)
        if final.state is State.DENIED:
            reason = f": {final.reason}" if final.reason else ""
            message = f"denied by {final.decided_by} (approval {final.id}){reason}"
        else:
            message = (f"no one approved it within "
                       f"{_human(final.expires - final.created)} (approval {final.id})")
        why = f"{decision.message}; " if decision.message else "approval required; "
        return Decision(Action.DENY, decision.rules, why + message, decision.on_deny,
                        decision.effect)
