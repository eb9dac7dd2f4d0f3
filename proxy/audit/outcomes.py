"""What finally happened to a tool call, as the audit log records it (schema v3).

Every call has one `decision` record: `action` is the verdict of the policy (rules,
OPA, budgets, OpenAPI checks), `outcome` is what happened to the call. A call the
policy allowed or denied is final at once (`outcome: allowed | denied`). A `hold` is
not: its decision record has no `outcome`, and exactly one later `hold` record with
the same `decision_id` says how it ended:

  approved   a person approved it (or an approved ticket was redeemed): it ran
  denied     a person denied it, or tether did (the pending limit, the approval
             store down, a ticket answered "not yet", no approvals on this front
             end); `rules` names the `tether:` rule when tether did
  expired    nobody decided before its timeout (a deny)
  abandoned  the caller left, or tether stopped, before anyone decided

`by` says who ended it (a person's name, `timeout` or `tether`), `reason` why.
A hold with no `hold` record ended with the process that held it (a kill -9), or
is still waiting. `tether audit calls` joins the two kinds on `decision_id`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from ..model import Action, Decision, Exchange, ToolCall

HOLD_KIND = "hold"


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    APPROVED = "approved"
    EXPIRED = "expired"
    ABANDONED = "abandoned"


def immediate(action: Action) -> Outcome | None:
    """The outcome a decision record states at once; None for a hold (not final)."""
    if action is Action.ALLOW:
        return Outcome.ALLOWED
    if action is Action.DENY:
        return Outcome.DENIED
    return None


def hold_record(call: ToolCall, exchange: Exchange, held: Decision, final: Decision,
                outcome: Outcome, *, by: str | None, reason: str | None,
                approval_id: str | None = None, mode: str | None = None,
                waited_s: float | None = None) -> dict[str, object]:
    """The record that ends a hold. `held` is the decision as recorded (its id),
    `final` the verdict the caller got (its rules and message)."""
    rules: Sequence[str] = final.rules
    return {
        "kind": HOLD_KIND,
        "decision_id": held.decision_id or None,
        "outcome": outcome.value,
        "by": by,
        "reason": reason,
        "approval_id": approval_id,
        "mode": mode,
        "tool": call.name,
        "call_id": call.id,
        "session": exchange.session,
        "agent": exchange.agent,
        "provider": exchange.provider,
        "rules": list(rules),
        "message": final.message,
        "waited_ms": round(waited_s * 1000, 3) if waited_s is not None else None,
    }
