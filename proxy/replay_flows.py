"""The session histories of a replay, rebuilt from the audit records in order.

Flow rules read what the session did before a call; in a replay that is what the
recorded session did: each `decision` record adds its call, as it ended (the recorded
`outcome`, or for a hold the `hold` record that ended it, `approved` counting as
allowed), keyed by agent and session as the proxy keys them. A provider-run call
(`stage: ran`) ran whatever the verdict. Labels and effects come from the new config,
so a label added to it is seen on calls recorded before it existed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from .model import Action, Effect, PastCall, ToolCall
from .policy.engine import Policy, effect_of
from .policy.names import normalize
from .sessions.history import args_sha256, summary

_FINAL = {"allowed": Action.ALLOW, "approved": Action.ALLOW, "denied": Action.DENY,
          "expired": Action.DENY, "abandoned": Action.DENY}


def _time(value: object) -> float:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


class ReplayHistory:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._sessions: dict[tuple[str, str], deque[PastCall]] = defaultdict(
            lambda: deque(maxlen=policy.flows.keep))
        self._where: dict[str, tuple[str, str]] = {}  # decision id -> its session

    @staticmethod
    def _key(record: Mapping[str, object]) -> tuple[str, str]:
        return str(record.get("agent") or ""), str(record.get("session") or "default")

    def before(self, record: Mapping[str, object]) -> tuple[PastCall, ...]:
        found = self._sessions.get(self._key(record))
        return tuple(found) if found else ()

    def add(self, record: Mapping[str, object], call: ToolCall) -> None:
        """A decision record, after it was re-decided."""
        name = normalize(call.name)
        api = record.get("api") if isinstance(record.get("api"), str) else None
        effect = effect_of(name, self.policy.effects)
        if api is not None:
            try:
                effect = Effect(str(record.get("effect")))
            except ValueError:
                pass
        verdict = str(record.get("action") or "")
        outcome = record.get("outcome")
        if record.get("stage") == "ran":
            action = Action.ALLOW
        elif isinstance(outcome, str) and outcome in _FINAL:
            action = _FINAL[outcome]
        else:  # a hold, until its `hold` record; or a record from before `outcome`
            action = Action(verdict) if verdict in ("allow", "deny") else Action.HOLD
        did = str(record.get("decision_id") or "")
        key = self._key(record)
        self._sessions[key].append(PastCall(
            did, name, effect, action, self.policy.flows.labels.of(name, str(api) if api else None),
            at=_time(record.get("time")), args_sha256=args_sha256(call), summary=summary(call),
            call_id=call.id, api=str(api) if api else None))
        if did:
            self._where[did] = key

    def ended(self, record: Mapping[str, object]) -> None:
        """A `hold` record: how a held call ended."""
        did = str(record.get("decision_id") or "")
        key = self._where.get(did)
        action = _FINAL.get(str(record.get("outcome") or ""))
        if key is None or action is None:
            return
        entries = self._sessions[key]
        for i in range(len(entries) - 1, -1, -1):
            if entries[i].decision_id == did:
                entries[i] = replace(entries[i], action=action)
                return
