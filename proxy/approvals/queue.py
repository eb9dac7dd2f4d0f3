"""Holds: one approval per exact tool call, waited on or redeemed as a ticket.

An approval binds one call: the hash of (tool, canonical arguments, session,
policy revision). It is decided once (the first decision wins; a late or
repeated click changes nothing), expires, and an approved ticket is used at
most once. Changed arguments make a different hash, so they need a new
approval.

The queue lives in memory. Pending approvals are never auto-approved: when the
process stops, waiting requests end with it, and a restarted tether starts
with no pending approvals (so nothing held can slip through). A Redis-backed
queue that survives restarts is not built yet.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..model import Exchange, ToolCall
from ..policy.names import normalize


class State(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"


class Mode(enum.StrEnum):
    WAIT = "wait"
    TICKET = "ticket"


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    binding: str
    mode: Mode
    tool: str
    arguments: str          # canonical JSON (or the raw text when it did not parse)
    session: str | None
    agent: str | None
    provider: str
    rules: tuple[str, ...]
    message: str
    policy_revision: str
    approvers: tuple[str, ...]
    created: float
    expires: float
    state: State = State.PENDING
    decided_by: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    valid_until: float | None = None   # tickets: approved calls may be re-issued until then

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "state": self.state.value, "mode": self.mode.value,
            "tool": self.tool, "arguments": self.arguments, "arguments_hash": self.binding,
            "session": self.session, "agent": self.agent, "provider": self.provider,
            "rules": list(self.rules), "message": self.message,
            "policy_revision": self.policy_revision, "approvers": list(self.approvers),
            "created": self.created, "expires": self.expires, "decided_by": self.decided_by,
            "reason": self.reason, "decided_at": self.decided_at,
            "valid_until": self.valid_until,
        }


def canonical_arguments(call: ToolCall) -> str:
    if call.arguments is None:
        return call.raw_arguments
    return json.dumps(call.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def binding_of(call: ToolCall, exchange: Exchange, revision: str) -> str:
    text = "\0".join([normalize(call.name), canonical_arguments(call),
                      exchange.agent or "", exchange.session or "", revision])
    return hashlib.sha256(text.encode()).hexdigest()


class TooManyPending(Exception):
    """The session or the whole queue holds as many pending approvals as allowed."""


Listener = Callable[[Approval], None]


@dataclass
class ApprovalQueue:
    max_pending: int = 100
    max_pending_per_session: int = 5
    keep_decided: int = 500
    _items: OrderedDict[str, Approval] = field(default_factory=OrderedDict)
    _events: dict[str, asyncio.Event] = field(default_factory=dict)
    _created: list[Listener] = field(default_factory=list)
    _decided: list[Listener] = field(default_factory=list)

    def on_created(self, listener: Listener) -> None:
        self._created.append(listener)

    def on_decided(self, listener: Listener) -> None:
        self._decided.append(listener)

    def pending(self) -> list[Approval]:
        self._expire()
        return [a for a in self._items.values() if a.state is State.PENDING]

    def recent(self, limit: int = 50) -> list[Approval]:
        decided = [a for a in self._items.values() if a.state is not State.PENDING]
        return decided[-limit:][::-1]

    def get(self, approval_id: str) -> Approval | None:
        self._expire()
        return self._items.get(approval_id)

    def create(self, call: ToolCall, exchange: Exchange, *, mode: Mode, rules: tuple[str, ...],
               message: str, revision: str, approvers: tuple[str, ...], timeout_s: float
               ) -> Approval:
        pending = self.pending()
        if len(pending) >= self.max_pending:
            raise TooManyPending(f"{len(pending)} approvals are already pending (at most "
                                 f"{self.max_pending})")
        mine = [a for a in pending if a.session == exchange.session and a.agent == exchange.agent]
        if len(mine) >= self.max_pending_per_session:
            raise TooManyPending(f"this session already has {len(mine)} pending approvals "
                                 f"(at most {self.max_pending_per_session})")
        now = time.time()
        approval = Approval(
            id="apv_" + secrets.token_hex(8), binding=binding_of(call, exchange, revision),
            mode=mode, tool=call.name, arguments=canonical_arguments(call),
            session=exchange.session, agent=exchange.agent, provider=exchange.provider,
            rules=rules, message=message, policy_revision=revision, approvers=approvers,
            created=now, expires=now + timeout_s)
        self._items[approval.id] = approval
        self._events[approval.id] = asyncio.Event()
        self._trim()
        for listener in self._created:
            listener(approval)
        return approval

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str | None = None,
               ticket_validity_s: float = 3600) -> tuple[Approval | None, bool]:
        """(the approval, whether this call changed it). Only a pending, unexpired
        approval can be decided; everything else is a no-op that reports the state."""
        self._expire()
        current = self._items.get(approval_id)
        if current is None or current.state is not State.PENDING:
            return current, False
        now = time.time()
        decided = replace(current, state=State.APPROVED if approve else State.DENIED,
                          decided_by=by, reason=reason, decided_at=now,
                          valid_until=now + ticket_validity_s if approve
                          and current.mode is Mode.TICKET else None)
        self._items[approval_id] = decided
        event = self._events.pop(approval_id, None)
        if event is not None:
            event.set()
        for listener in self._decided:
            listener(decided)
        return decided, True

    async def wait(self, approval_id: str) -> Approval:
        """Until decided or expired; an expired approval is final (a timeout is a deny)."""
        approval = self._items[approval_id]
        event = self._events.get(approval_id)
        if event is not None and approval.state is State.PENDING:
            try:
                await asyncio.wait_for(event.wait(), max(0.0, approval.expires - time.time()))
            except TimeoutError:
                pass
        self._expire()
        return self._items[approval_id]

    def redeem(self, binding: str) -> Approval | None:
        """An approved, unused, still valid ticket for exactly this call; it is used up."""
        now = time.time()
        for approval in self._items.values():
            if (approval.binding == binding and approval.mode is Mode.TICKET
                    and approval.state is State.APPROVED
                    and (approval.valid_until or 0) >= now):
                used = replace(approval, state=State.USED)
                self._items[approval.id] = used
                return used
        return None

    def waiting_for(self, binding: str) -> Approval | None:
        """A pending ticket for exactly this call, so a re-issue does not open another."""
        return next((a for a in self.pending() if a.binding == binding), None)

    def _expire(self) -> None:
        now = time.time()
        for approval in list(self._items.values()):
            if approval.state is State.PENDING and approval.expires <= now:
                expired = replace(approval, state=State.EXPIRED, decided_at=now,
                                  decided_by="timeout")
                self._items[approval.id] = expired
                event = self._events.pop(approval.id, None)
                if event is not None:
                    event.set()
                for listener in self._decided:
                    listener(expired)

    def _trim(self) -> None:
        decided = [k for k, a in self._items.items() if a.state is not State.PENDING]
        for key in decided[: max(0, len(decided) - self.keep_decided)]:
            del self._items[key]
