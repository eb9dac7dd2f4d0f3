"""The neutral model every provider parses into and the policy decides on.

Plain frozen dataclasses, no I/O. A provider turns its wire format into these;
the policy engine reads them and returns a `Decision`; the front ends
(server/, forward/) carry them between the two.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Action(enum.StrEnum):
    """What happens to one tool call. Ordered by strictness: deny > hold > allow."""

    ALLOW = "allow"
    HOLD = "hold"
    DENY = "deny"

    @property
    def strictness(self) -> int:
        return _STRICTNESS[self]


_STRICTNESS = {Action.ALLOW: 0, Action.HOLD: 1, Action.DENY: 2}


class Effect(enum.StrEnum):
    READ = "read"
    WRITE = "write"


class OnDeny(enum.StrEnum):
    """How a deny reaches the agent: the call rewritten into text, or an HTTP 403; or
    (`continue`) rewritten, and when nothing else in the answer is left for the agent to
    run, the denial sent back to the model as the call's result and its next answer
    handed to the agent instead (docs/continuations.md)."""

    REWRITE = "rewrite"
    ERROR = "error"
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call the model asked for.

    `raw_arguments` is the argument text exactly as the model produced it;
    `arguments` is its parsed form, or None when it did not parse, in which case
    `problem` says why. A call with a `problem` is always denied. `too_large`: its
    arguments were over `limits.max_arguments_bytes` and were dropped unread, so
    `raw_arguments` is empty (providers/held.py).
    """

    id: str
    name: str
    raw_arguments: str
    arguments: Mapping[str, object] | None
    index: int = 0
    choice: int = 0
    problem: str | None = None
    too_large: bool = False


@dataclass(frozen=True, slots=True)
class PastCall:
    """One earlier tool call of the session, as tether decided it (sessions/history.py):
    the record flow rules read, not what the agent sends back. `action` is the final
    verdict (a hold as it ended); only an allowed call can have run. `summary` is a short
    rendering of the call for messages (`web_fetch(url='https://...')`)."""

    decision_id: str
    tool: str                       # normal form (policy.names.normalize)
    effect: Effect
    action: Action
    labels: frozenset[str] = frozenset()
    at: float = 0.0                 # Unix time of the decision
    args_sha256: str = ""           # of the canonical JSON arguments
    summary: str = ""
    call_id: str = ""
    api: str | None = None


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request to an LLM API, as far as the policy needs to know it."""

    provider: str
    model: str
    declared_tools: tuple[str, ...] = ()
    stream: bool = False
    session: str | None = None
    agent: str | None = None
    endpoint: str = ""
    # Verified identity claims the config chose to expose to policy (auth.jwt.claims);
    # empty for static keys and unauthenticated requests.
    claims: Mapping[str, object] = field(default_factory=dict)
    # The session's earlier calls, oldest first (flow rules read them); empty when the
    # policy has no flow rules or the session has no history yet.
    history: tuple[PastCall, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An outgoing HTTP request to a tool API, as the egress side judges it.

    `path` and `query` are raw (still percent-encoded), already checked for
    ambiguity; `headers` keep their order and repeats.
    """

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for k, v in self.headers if k.lower() == low), None)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """Whether one rule matched a call, and why (for `tether explain` and audit).
    `shadow`: the rule is in `mode: shadow`, so a match is recorded but never counts."""

    rule_id: str
    matched: bool
    reason: str
    action: Action | None = None
    shadow: bool = False
    # A flow rule's match: the earlier calls that made it (`after untrusted web_fetch(...)
    # [decision d1 at ...]`), added to the decision's message so an approver sees why.
    evidence: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one tool call. `rules` names every enforced rule that matched;
    `shadow` the `mode: shadow` rules that matched (recorded, never enforced)."""

    action: Action
    rules: tuple[str, ...] = ()
    message: str = ""
    on_deny: OnDeny = OnDeny.REWRITE
    effect: Effect = Effect.WRITE
    timeout_s: float | None = None
    trace: tuple[RuleTrace, ...] = field(default=(), compare=False)
    ticket: bool = False                 # hold: answer at once, allow the approved re-issue
    approvers: tuple[str, ...] = ()      # hold: who may approve (empty: any approver)
    shadow: tuple[str, ...] = ()         # shadow rules that matched: what they would have done
    # The audit record's id (set by the governor once recorded); a hold's later outcome
    # record carries it too, so the two join.
    decision_id: str = field(default="", compare=False)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW
