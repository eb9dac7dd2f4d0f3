"""Turning a `hold` decision into allow or deny, by asking a human.

`wait` (default): an approval is opened for the exact call and the response
waits (a stream gets keep-alive comments) until it is approved, denied or
times out; approved releases the original call unchanged, anything else is a
deny. `ticket`: the call is answered at once with text naming the approval;
once approved, the same call (same tool, arguments, session and policy
revision) is allowed when the model issues it again, once, within the
validity window.

Every step is audited (`kind: approval`) with who decided and why. When the
approval store (Redis) cannot be reached, a hold is a deny that says so,
counted (`tether_approvals_decided_total{outcome="unavailable"}`) and audited
(`event: store_unavailable`): nothing held runs without a recorded approval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from ..audit import AuditLog, AuditWriteError
from ..errors import StoreUnavailable
from ..model import Action, Decision, Exchange, ToolCall
from ..telemetry import Metrics
from .queue import Approval, Approvals, Mode, State, TooManyPending, binding_of
from .settings import ApprovalSettings

log = logging.getLogger("tether.approvals")

KeepAlive = Callable[[str], Awaitable[None]]
LIMIT_RULE = "tether:approval-limit"
STORE_RULE = "tether:approval-store"


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
        queue.on_created(self._created)
        queue.on_decided(self._decided)

    async def stop(self) -> None:
        """tether is stopping: what ends with it (everything, in memory; what its own
        requests wait on, in Redis) ends denied and audited, so a held call can never be
        approved by a click that arrives after a restart."""
        try:
            for approval in await self.queue.orphans():
                await self.queue.decide(approval.id, approve=False, by="tether",
                                        reason="tether stopped before anyone decided")
        except StoreUnavailable as e:
            log.error("approvals: could not end pending approvals at shutdown: %s", e.message)
        finally:
            await self.queue.close()

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
            try:
                if decision.ticket:
                    out[i] = await self._ticket(call, decision, exchange)
                    continue
                approval = await self._open(call, decision, exchange, Mode.WAIT)
            except TooManyPending as e:
                out[i] = self._limited(decision, e)
                continue
            except StoreUnavailable as e:
                out[i] = self._unavailable(call, decision, exchange, e)
                continue
            waiting.append((i, approval, decision))
        if waiting:
            finals = await self._wait([a for _, a, _ in waiting], keepalive)
            for (i, approval, decision), final in zip(waiting, finals, strict=True):
                out[i] = (self._outcome(decision, final) if isinstance(final, Approval) else
                          self._unavailable(calls[i], decision, exchange, final, approval.id))
        return out

    async def _open(self, call: ToolCall, decision: Decision, exchange: Exchange, mode: Mode
                    ) -> Approval:
        return await self.queue.create(
            call, exchange, mode=mode, rules=decision.rules, message=decision.message,
            revision=self.revision, approvers=decision.approvers,
            timeout_s=decision.timeout_s or self.settings.timeout_s)

    def _limited(self, decision: Decision, e: TooManyPending) -> Decision:
        self.metrics.approvals_decided.labels("limited").inc()
        return Decision(Action.DENY, decision.rules + (LIMIT_RULE,),
                        f"{decision.message}; approval required, but {e}".lstrip("; "),
                        decision.on_deny, decision.effect)

    def _unavailable(self, call: ToolCall, decision: Decision, exchange: Exchange,
                     e: StoreUnavailable, approval_id: str | None = None) -> Decision:
        """Fail closed: without the store, no approval can be recorded or read."""
        log.error("approvals: %s is denied: %s", call.name, e.message)
        self.metrics.approvals_decided.labels("unavailable").inc()
        try:
            self.audit.write({"kind": "approval", "event": "store_unavailable",
                              "id": approval_id, "tool": call.name, "session": exchange.session,
                              "agent": exchange.agent, "provider": exchange.provider,
                              "rules": list(decision.rules), "error": e.message})
        except AuditWriteError:
            log.exception("audit write failed for an approval")
        return Decision(Action.DENY, decision.rules + (STORE_RULE,),
                        f"{decision.message}; approval required, but {e.message}, so it is "
                        f"denied".lstrip("; "), decision.on_deny, decision.effect)

    async def _ticket(self, call: ToolCall, decision: Decision, exchange: Exchange) -> Decision:
        binding = binding_of(call, exchange, self.revision)
        used = await self.queue.redeem(binding)
        if used is not None:
            self._record("used", used)
            return Decision(Action.ALLOW, decision.rules,
                            f"approved by {used.decided_by} (approval {used.id})",
                            decision.on_deny, decision.effect)
        approval = (await self.queue.waiting_for(binding)
                    or await self._open(call, decision, exchange, Mode.TICKET))
        validity = _human(self.settings.ticket_validity_s)
        why = f"{decision.message}; " if decision.message else ""
        return Decision(Action.DENY, decision.rules,
                        f"{why}it awaits human approval {approval.id}. Once it is approved, "
                        f"issue exactly the same call again (within {validity})",
                        decision.on_deny, decision.effect)

    async def _wait(self, approvals: list[Approval], keepalive: KeepAlive | None
                    ) -> list[Approval | StoreUnavailable]:
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
            try:
                for a in approvals:
                    await self.queue.decide(a.id, approve=False, by="tether",
                                            reason="the agent's request ended while it waited")
            except StoreUnavailable as e:
                log.error("approvals: could not end %s: %s", names, e.message)
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
