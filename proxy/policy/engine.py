"""One decision per tool call, from every rule that matches.

The law, as IAM's explicit deny: every matching rule counts and the strictest
action wins (deny over hold over allow), so the order of rules never opens a
hole. Built-in checks run as if they were rules with reserved ids:

  tether:malformed-call    the call's arguments did not parse, or it was cut off, or its
                           name or arguments hold a lone UTF-16 surrogate (not text)
  tether:arguments-too-large  the call's arguments were over limits.max_arguments_bytes
                           (they are dropped unread, and the call is judged by name)
  tether:undeclared-tool   the request did not declare a tool of that exact name
  tether:agent-scope       the agent has a tool scope and the tool is outside it
  tether:provider-tool-unlisted  a provider-run tool (`openai:web_search` ...) that no rule
                           mentions, under `defaults.undeclared_tools: deny`

`defaults.action` applies when nothing matches. Rules in `mode: shadow` are
evaluated like the others but only named in `Decision.shadow`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..model import Action, Decision, Effect, Exchange, OnDeny, RuleTrace, ToolCall
from ..surrogates import holds
from .flows import Flows
from .names import normalize
from .provider_tools import UNLISTED, is_provider_run
from .provider_tools import effect_of as provider_effect
from .rule_index import RuleIndex
from .rules import Rule, Subject

DEFAULT_CONTINUATIONS = 3
# `continue`: a denial the model never reads ends a plain agent loop and abandons the task
# (docs/continuations.md, "The default"); bounded by DEFAULT_CONTINUATIONS and budgets.
DEFAULT_ON_DENY = OnDeny.CONTINUE

READ_PREFIXES = ("get_", "list_", "describe_")

MALFORMED = "tether:malformed-call"
TOO_LARGE = "tether:arguments-too-large"
UNDECLARED = "tether:undeclared-tool"
SCOPE = "tether:agent-scope"
DEFAULT = "tether:default"
NOBODY = "<nobody>"  # hold rules whose approver lists share no one


@dataclass(frozen=True, slots=True)
class AgentScope:
    tools: tuple[re.Pattern[str], ...]
    globs: tuple[str, ...]
    # Take the tools outside the scope out of the agent's requests, so the model never
    # sees them; None follows `defaults.filter_tools` (Policy.filter_tools).
    filter_tools: bool | None = None

    def permits(self, name: str) -> bool:
        """`name` in normal form (policy.names.normalize)."""
        return any(p.fullmatch(name) for p in self.tools)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_action: Action = Action.ALLOW
    on_error: Action = Action.DENY
    undeclared_tools: Action = Action.DENY
    agents: Mapping[str, AgentScope] = field(default_factory=dict)
    effects: Mapping[str, Effect] = field(default_factory=dict)
    revision: str = ""
    filter_tools: bool = True  # defaults.filter_tools
    flows: Flows = field(default_factory=Flows)  # labels and the history's bounds
    on_deny: OnDeny = DEFAULT_ON_DENY  # defaults.on_deny: a rule's that names none
    # defaults.max_continuations: answers asked for after denials, per answer the agent gets
    max_continuations: int = DEFAULT_CONTINUATIONS

    @property
    def reads_history(self) -> bool:
        """Whether any rule looks at the session's earlier calls (`match.session`): only
        then does a front end load and record the history."""
        return any(r.session is not None for r in self.rules)


def effect_of(name: str, effects: Mapping[str, Effect]) -> Effect:
    """Declared effect, else a provider-run tool's own (read for search and fetch), else
    read for get_/list_/describe_ names, else write."""
    declared = effects.get(name)
    if declared is not None:
        return declared
    if is_provider_run(name):
        return provider_effect(name)
    return Effect.READ if name.startswith(READ_PREFIXES) else Effect.WRITE


def merge(decision: Decision, extra: Sequence[RuleTrace]) -> Decision:
    """A decision joined with verdicts from outside the rules (loop breakers, budgets):
    the same law, every match counts and the strictest wins."""
    matched = [t for t in extra if t.matched]
    if not matched:
        return decision
    action = max([decision.action, *(t.action or Action.DENY for t in matched)],
                 key=lambda a: a.strictness)
    messages = [t.reason for t in matched if t.action is action]
    if decision.action is action and decision.rules:
        messages.insert(0, decision.message)
    return Decision(action, decision.rules + tuple(t.rule_id for t in matched),
                    "; ".join(m for m in messages if m), decision.on_deny, decision.effect,
                    decision.timeout_s, decision.trace + tuple(matched), shadow=decision.shadow)


def on_deny_of(rules: Sequence[Rule], default: OnDeny) -> OnDeny:
    """How a deny by these rules reaches the agent: the strictest any of them names
    (error, then rewrite, then continue), else the config's default. A rule that says
    `rewrite` keeps the denial from being sent back to the model."""
    named = {r.on_deny for r in rules if r.on_deny is not None}
    for mode in (OnDeny.ERROR, OnDeny.REWRITE, OnDeny.CONTINUE):
        if mode in named:
            return mode
    return default


class PolicyEngine:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._agents = {normalize(k): v for k, v in policy.agents.items()}
        self._index = RuleIndex(policy.rules)   # the rules a tool name can match
        # Whether a denied answer can go on at all (server/continuation.py asks per request):
        # a bound above 0, and `continue` as the default or some rule's on_deny.
        self.continues = policy.max_continuations > 0 and (
            policy.on_deny is OnDeny.CONTINUE
            or any(r.on_deny is OnDeny.CONTINUE for r in policy.rules))

    @property
    def revision(self) -> str:
        return self.policy.revision

    def tool_filter(self, agent: str | None) -> Callable[[str], bool] | None:
        """Which declared tools an agent's requests may keep, or None when they are not
        filtered (no agent, no scope, or `filter_tools: false`). The same test as the
        `tether:agent-scope` check, so a tool the model is shown is one it may call."""
        scope = self._agents.get(normalize(agent)) if agent else None
        if scope is None:
            return None
        on = self.policy.filter_tools if scope.filter_tools is None else scope.filter_tools
        if not on:
            return None
        return lambda name: scope.permits(normalize(name))

    def decide(self, call: ToolCall, exchange: Exchange, *, explain: bool = False,
               api: str | None = None, effect: Effect | None = None) -> Decision:
        """`api` and `effect` come from the egress side (an OpenAPI operation or a cloud
        catalog entry); for LLM tool calls they are looked up from the tool's name."""
        name = normalize(call.name)
        effect = effect or effect_of(name, self.policy.effects)
        traces: list[RuleTrace] = []

        if call.too_large:
            traces.append(RuleTrace(TOO_LARGE, True, call.problem or "its arguments are over "
                                    "limits.max_arguments_bytes", Action.DENY))
        elif call.problem:
            traces.append(RuleTrace(MALFORMED, True, call.problem, Action.DENY))
        elif holds(call.name) or holds(call.raw_arguments):
            # Parsers that refuse these (strict_json) never let one this far; this is
            # the same refusal for every other way a call is built.
            traces.append(RuleTrace(MALFORMED, True, "the call's name or arguments hold an "
                                    "unpaired UTF-16 surrogate, which is not text", Action.DENY))
        if self.policy.undeclared_tools is Action.DENY and call.name not in exchange.declared_tools:
            declared = ", ".join(repr(t) for t in exchange.declared_tools) or "none"
            traces.append(
                RuleTrace(
                    UNDECLARED,
                    True,
                    f"the request declared no tool named {call.name!r} (declared: {declared})",
                    Action.DENY,
                )
            )
        scope = self._agents.get(normalize(exchange.agent)) if exchange.agent else None
        if scope is not None and not scope.permits(name):
            traces.append(
                RuleTrace(
                    SCOPE,
                    True,
                    f"agent {exchange.agent!r} may use only {', '.join(scope.globs)}",
                    Action.DENY,
                )
            )

        subject = Subject(call=call, name=name, agent=exchange.agent, effect=effect, api=api,
                          labels=self.policy.flows.labels.of(name, api),
                          history=exchange.history)
        by_id: dict[str, Rule] = {}
        for rule in self.policy.rules if explain else self._index.candidates(name):
            trace = rule.evaluate(subject)
            if trace.matched and not trace.shadow:
                by_id[rule.id] = rule
            if trace.matched or explain:
                traces.append(trace)

        # Shadow matches are recorded beside the verdict and take no part in it.
        shadow = tuple(t.rule_id for t in traces if t.matched and t.shadow)
        matched = [t for t in traces if t.matched and not t.shadow]
        if not matched and self.policy.undeclared_tools is Action.DENY and is_provider_run(name):
            # No call for a provider-run tool comes back to be judged: one no rule mentions
            # is treated as undeclared, not left to defaults.action.
            unlisted = RuleTrace(UNLISTED, True, f"no rule allows the provider-run tool "
                                 f"{call.name!r} (defaults.undeclared_tools is deny)",
                                 Action.DENY)
            return Decision(Action.DENY, (UNLISTED,), unlisted.reason, self.policy.on_deny,
                            effect=effect, trace=(*traces, unlisted), shadow=shadow)
        if not matched:
            return Decision(
                action=self.policy.default_action,
                rules=(),
                message=f"no rule matched; defaults.action is {self.policy.default_action}",
                on_deny=self.policy.on_deny,
                effect=effect,
                trace=tuple(traces),
                shadow=shadow,
            )
        action = max((t.action or Action.DENY for t in matched), key=lambda a: a.strictness)
        winners = [t for t in matched if t.action is action]
        messages: list[str] = []
        for t in winners:
            found = by_id.get(t.rule_id)
            text = (found.message or found.description) if found else t.reason
            if t.evidence:  # a flow rule: name the earlier calls that made it match
                text = f"{text} ({t.evidence})" if text else t.evidence
            if text and text not in messages:
                messages.append(text)
        winning_rules = [by_id[t.rule_id] for t in winners if t.rule_id in by_id]
        on_deny = on_deny_of(winning_rules, self.policy.on_deny)
        timeouts = [r.timeout_s for r in winning_rules if r.timeout_s is not None]
        # Several hold rules: the stricter "wait" wins over "ticket", and an approver
        # must be allowed by every rule that names approvers.
        approver_sets = [set(r.approvers) for r in winning_rules if r.approvers]
        approvers = set.intersection(*approver_sets) if approver_sets else set()
        return Decision(
            action=action,
            rules=tuple(t.rule_id for t in matched),
            message="; ".join(messages),
            on_deny=on_deny,
            effect=effect,
            timeout_s=min(timeouts) if timeouts else None,
            trace=tuple(traces),
            ticket=action is Action.HOLD and all(r.ticket for r in winning_rules),
            approvers=(tuple(sorted(approvers)) or (NOBODY,)) if approver_sets else (),
            shadow=shadow,
        )
