"""Holds: one approval per exact tool call, waited on or redeemed as a ticket.

An approval binds one call: the hash of (tool, canonical arguments, session,
policy revision). It is decided once (the first decision wins; a late or
repeated click changes nothing), expires, and an approved ticket is used at
most once. Changed arguments make a different hash, so they need a new
approval.

Two implementations of one protocol, `Approvals`: `ApprovalQueue` keeps them
in this process (`store: memory`; when the process stops, everything pending
ends denied, and a restarted tether starts with none), `RedisApprovals`
(redis_queue.py) keeps them in the Redis that holds the budgets, so any
replica can decide or redeem what another opened. Pending approvals are never
auto-approved by either.

Listeners run on the process that made the change (the creator for `created`,
whoever won the transition for `decided`, expiry included), synchronously
inside the call; they only record and start background work.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..model import Exchange, ToolCall
from ..policy.names import normalize
from ..surrogates import json_text, utf8
from .context import HoldContext


class State(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"
    ABANDONED = "abandoned"   # the caller left, tether stopped, or its replica died


# What a late approve or deny is told about an abandoned approval.
CALLER_GONE = "the caller is gone: nothing will run, and nothing can be approved"


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
    waiter: str | None = None          # store: redis: the replica whose request waits on it
    context: HoldContext | None = None  # what the approver is shown beside it (None: unknown)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "state": self.state.value, "mode": self.mode.value,
            "tool": self.tool, "arguments": self.arguments, "arguments_hash": self.binding,
            "session": self.session, "agent": self.agent, "provider": self.provider,
            "rules": list(self.rules), "message": self.message,
            "policy_revision": self.policy_revision, "approvers": list(self.approvers),
            "created": self.created, "expires": self.expires, "decided_by": self.decided_by,
            "reason": self.reason, "decided_at": self.decided_at,
            "valid_until": self.valid_until, "waiter": self.waiter,
            "context": self.context.as_json() if self.context is not None else None,
        }


def canonical_arguments(call: ToolCall) -> str:
    if call.arguments is None:
        return call.raw_arguments
    return json_text(call.arguments, sort_keys=True, separators=(",", ":"))


def binding_of(call: ToolCall, exchange: Exchange, revision: str) -> str:
    text = "\0".join([normalize(call.name), canonical_arguments(call),
                      exchange.agent or "", exchange.session or "", revision])
    return hashlib.sha256(utf8(text)).hexdigest()


class TooManyPending(Exception):
    """The session or the whole queue holds as many pending approvals as allowed."""


Listener = Callable[[Approval], None]


@dataclass(frozen=True, slots=True)
class Message:
    """Where an approval's Slack message is, so whichever replica ends it can edit it."""

    approval: Approval
    channel: str
    ts: str
    slack_user: str | None = None   # the Slack user whose click decided it, if one did


class Approvals(Protocol):
    """The approvals of every replica that shares this store. Store failures raise
    `StoreUnavailable` (the caller fails closed); the memory queue never raises it."""

    def on_created(self, listener: Listener) -> None: ...

    def on_decided(self, listener: Listener) -> None: ...

    async def pending(self) -> list[Approval]: ...

    async def recent(self, limit: int = 50) -> list[Approval]: ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def create(self, call: ToolCall, exchange: Exchange, *, mode: Mode,
                     rules: tuple[str, ...], message: str, revision: str,
                     approvers: tuple[str, ...], timeout_s: float,
                     context: HoldContext | None = None) -> Approval: ...

    async def decide(self, approval_id: str, *, approve: bool, by: str,
                     reason: str | None = None, ticket_validity_s: float = 3600,
                     slack_user: str | None = None) -> tuple[Approval | None, bool]:
        """(the approval, whether this call changed it). Only a pending, unexpired
        approval can be decided, by exactly one caller; the rest report the state.
        `slack_user` is kept with the decision (only if this call made it), so the
        message edit can mention who clicked, whichever replica makes it."""
        ...

    async def abandon(self, approval_id: str, *, reason: str) -> tuple[Approval | None, bool]:
        """End a pending approval as `abandoned` (its caller is gone): (the approval,
        whether this call ended it). Never approves; a decided one is left as it is."""
        ...

    async def wait(self, approval_id: str) -> Approval:
        """Until decided or expired; an expired approval is final (a timeout is a deny)."""
        ...

    async def redeem(self, binding: str) -> Approval | None:
        """An approved, unused, still valid ticket for exactly this call, used up by
        this call; no two callers ever get the same one."""
        ...

    async def waiting_for(self, binding: str) -> Approval | None:
        """A pending approval for exactly this call, so a re-issue does not open another."""
        ...

    async def orphans(self) -> list[Approval]:
        """The pending approvals that end with this process (it is stopping)."""
        ...

    async def start(self) -> None:
        """Background work the store needs while the process runs (Redis: the lease)."""
        ...

    async def set_message(self, approval_id: str, channel: str, ts: str) -> None: ...

    async def claim_message(self, approval_id: str) -> Message | None:
        """The message to edit, once the approval has ended and the message exists;
        given to one caller only, so a message is edited once."""
        ...

    async def close(self) -> None: ...


@dataclass
class ApprovalQueue:
    """The memory queue (`store: memory`): one process, nothing survives it."""

    max_pending: int = 100
    max_pending_per_session: int = 5
    keep_decided: int = 500
    _items: OrderedDict[str, Approval] = field(default_factory=OrderedDict)
    _events: dict[str, asyncio.Event] = field(default_factory=dict)
    _created: list[Listener] = field(default_factory=list)
    _decided: list[Listener] = field(default_factory=list)
    _messages: dict[str, tuple[str, str]] = field(default_factory=dict)
    _claimed: set[str] = field(default_factory=set)
    _slack_users: dict[str, str] = field(default_factory=dict)

    def on_created(self, listener: Listener) -> None:
        self._created.append(listener)

    def on_decided(self, listener: Listener) -> None:
        self._decided.append(listener)

    async def pending(self) -> list[Approval]:
        return self._pending()

    def _pending(self) -> list[Approval]:
        self._expire()
        return [a for a in self._items.values() if a.state is State.PENDING]

    async def recent(self, limit: int = 50) -> list[Approval]:
        decided = [a for a in self._items.values() if a.state is not State.PENDING]
        return decided[-limit:][::-1]

    async def get(self, approval_id: str) -> Approval | None:
        self._expire()
        return self._items.get(approval_id)

    async def create(self, call: ToolCall, exchange: Exchange, *, mode: Mode,
                     rules: tuple[str, ...], message: str, revision: str,
                     approvers: tuple[str, ...], timeout_s: float,
                     context: HoldContext | None = None) -> Approval:
        pending = self._pending()
        if len(pending) >= self.max_pending:
            raise TooManyPending(f"{len(pending)} approvals are already pending (at most "
                                 f"{self.max_pending})")
        mine = [a for a in pending if a.session == exchange.session and a.agent == exchange.agent]
        if len(mine) >= self.max_pending_per_session:
            raise TooManyPending(f"this session already has {len(mine)} pending approvals "
                                 f"(at most {self.max_pending_per_session})")
        approval = new_approval(call, exchange, mode=mode, rules=rules, message=message,
                                revision=revision, approvers=approvers, timeout_s=timeout_s,
                                context=context)
        self._items[approval.id] = approval
        self._events[approval.id] = asyncio.Event()
        self._trim()
        for listener in self._created:
            listener(approval)
        return approval

    async def decide(self, approval_id: str, *, approve: bool, by: str,
                     reason: str | None = None, ticket_validity_s: float = 3600,
                     slack_user: str | None = None) -> tuple[Approval | None, bool]:
        self._expire()
        current = self._items.get(approval_id)
        if current is None or current.state is not State.PENDING:
            return current, False
        decided = decided_as(current, approve=approve, by=by, reason=reason,
                             ticket_validity_s=ticket_validity_s, now=time.time())
        if slack_user is not None:
            self._slack_users[approval_id] = slack_user
        return self._finish(decided), True

    async def abandon(self, approval_id: str, *, reason: str) -> tuple[Approval | None, bool]:
        self._expire()
        current = self._items.get(approval_id)
        if current is None or current.state is not State.PENDING:
            return current, False
        return self._finish(abandoned_as(current, reason, time.time())), True

    def _finish(self, ended: Approval) -> Approval:
        self._items[ended.id] = ended
        event = self._events.pop(ended.id, None)
        if event is not None:
            event.set()
        for listener in self._decided:
            listener(ended)
        return ended

    async def wait(self, approval_id: str) -> Approval:
        approval = self._items[approval_id]
        event = self._events.get(approval_id)
        if event is not None and approval.state is State.PENDING:
            try:
                await asyncio.wait_for(event.wait(), max(0.0, approval.expires - time.time()))
            except TimeoutError:
                pass
        self._expire()
        return self._items[approval_id]

    async def redeem(self, binding: str) -> Approval | None:
        now = time.time()
        for approval in self._items.values():
            if (approval.binding == binding and approval.mode is Mode.TICKET
                    and approval.state is State.APPROVED
                    and (approval.valid_until or 0) >= now):
                used = replace(approval, state=State.USED)
                self._items[approval.id] = used
                return used
        return None

    async def waiting_for(self, binding: str) -> Approval | None:
        return next((a for a in self._pending() if a.binding == binding), None)

    async def orphans(self) -> list[Approval]:
        return self._pending()  # nothing outlives this process

    async def start(self) -> None:
        return None

    async def set_message(self, approval_id: str, channel: str, ts: str) -> None:
        if approval_id in self._items:
            self._messages[approval_id] = (channel, ts)

    async def claim_message(self, approval_id: str) -> Message | None:
        approval = self._items.get(approval_id)
        where = self._messages.get(approval_id)
        if (approval is None or where is None or approval.state is State.PENDING
                or approval_id in self._claimed):
            return None
        self._claimed.add(approval_id)
        return Message(approval, *where, self._slack_users.get(approval_id))

    async def close(self) -> None:
        return None

    def _expire(self) -> None:
        now = time.time()
        for approval in list(self._items.values()):
            if approval.state is State.PENDING and approval.expires <= now:
                expired = expired_as(approval, now)
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
            self._messages.pop(key, None)
            self._claimed.discard(key)
            self._slack_users.pop(key, None)


def new_approval(call: ToolCall, exchange: Exchange, *, mode: Mode, rules: tuple[str, ...],
                 message: str, revision: str, approvers: tuple[str, ...], timeout_s: float,
                 context: HoldContext | None = None) -> Approval:
    now = time.time()
    return Approval(
        id="apv_" + secrets.token_hex(8), binding=binding_of(call, exchange, revision),
        mode=mode, tool=call.name, arguments=canonical_arguments(call),
        session=exchange.session, agent=exchange.agent, provider=exchange.provider,
        rules=rules, message=message, policy_revision=revision, approvers=approvers,
        created=now, expires=now + timeout_s, context=context)


def decided_as(current: Approval, *, approve: bool, by: str, reason: str | None,
               ticket_validity_s: float, now: float) -> Approval:
    return replace(current, state=State.APPROVED if approve else State.DENIED,
                   decided_by=by, reason=reason, decided_at=now,
                   valid_until=now + ticket_validity_s if approve
                   and current.mode is Mode.TICKET else None)


def expired_as(current: Approval, now: float) -> Approval:
    return replace(current, state=State.EXPIRED, decided_at=now, decided_by="timeout")


def abandoned_as(current: Approval, reason: str, now: float) -> Approval:
    return replace(current, state=State.ABANDONED, decided_at=now, decided_by="tether",
                   reason=reason)
