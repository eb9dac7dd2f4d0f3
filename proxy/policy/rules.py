"""YAML rules compiled into matchers, once, at load.

A rule matches a call when every condition it names holds: `tool` (glob or
list of globs, on normalised names), `agent` (glob or list), `effect`, `api` (glob or list),
`args` conditions on dotted paths, and the flow conditions (flows.py): `label`
(the call's own labels) and `session: {after: ...}` (the session's earlier calls).
A bad rule raises `ConfigError` naming the file, line, rule id and key.

Argument paths: `tags.env` walks objects; a list on the way fans out, so
`tags.key` reaches every element's `key`. A condition holds when *any* reached
value satisfies it (`not_in`: any value outside the list, or none at all;
`exists: false`: none at all). Object keys are looked up in normal form too, so
`Tags.Env` cannot dodge `tags.env`.

`mode: shadow` (any action) makes a rule a dry run: it is evaluated and its
match recorded (`Decision.shadow`, the audit's `shadow_rules`, a counter) but it
never changes the decision. The key is shared with hold rules' `mode: wait |
ticket` (the values do not overlap; a shadow hold never holds, so it needs no
wait/ticket) and spelled like budgets' `mode: shadow`. String comparisons for `equals`, `in` and
`not_in` use the same normal form as tool names; `matches` sees the raw text: an RE2
pattern (patterns.py) that searches it, where `^` and `$` are the start and end of the
text (write `(?i)` for case-insensitive patterns).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ..config_tables import CONDITION, MATCH, RULE
from ..errors import ConfigError
from ..model import Action, Effect, OnDeny, PastCall, RuleTrace, ToolCall
from .flows import SessionCondition, compile_session, label_names
from .names import normalize
from .patterns import rule_pattern
from .source import YMap

RULE_KEYS = RULE.names  # documented in config_tables.py
MATCH_KEYS = MATCH.names
OPERATORS = CONDITION.names
BUILTIN_PREFIX = "tether:"
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Subject:
    """What a rule looks at: the call plus who made it and what it does."""

    call: ToolCall
    name: str  # normalised tool name
    agent: str | None
    effect: Effect
    api: str | None = None
    labels: frozenset[str] = frozenset()     # the call's own (flows.labels)
    history: tuple[PastCall, ...] = ()       # the session's earlier calls, oldest first


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(normalize(pattern)))


def _norm_value(value: object) -> object:
    return normalize(value) if isinstance(value, str) else value


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return _norm_value(a) == _norm_value(b)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            n = float(value.strip())
        except ValueError:
            return None
        return n if math.isfinite(n) else None
    return None


def resolve(args: Mapping[str, object], path: tuple[str, ...]) -> Iterator[object]:
    """Every value at `path`, fanning out over lists."""
    frontier: list[object] = [args]
    for segment in path:
        nxt: list[object] = []
        want = normalize(segment)
        for node in frontier:
            items = node if isinstance(node, list) else [node]
            for item in items:
                if not isinstance(item, dict):
                    continue
                if segment in item:
                    nxt.append(item[segment])
                nxt += [v for k, v in item.items() if k != segment and normalize(k) == want]
        frontier = nxt
    for value in frontier:
        if isinstance(value, list):
            yield from value
            if not value:
                yield value
        else:
            yield value


@dataclass(frozen=True, slots=True)
class Condition:
    path: tuple[str, ...]
    op: str
    operand: object
    # Made from (path, op, operand), so not compared: two loads of one rule are equal.
    test: Callable[[list[object]], bool] = field(compare=False)

    def check(self, args: Mapping[str, object]) -> tuple[bool, str]:
        values = list(resolve(args, self.path))
        ok = self.test(values)
        shown = "absent" if not values else ", ".join(repr(v) for v in values[:3])
        dotted = ".".join(self.path)
        verdict = "holds" if ok else "does not hold"
        return ok, f"args.{dotted} {self.op} {self.operand!r} {verdict} (value: {shown})"


def _condition(path: str, op: str, operand: object, where: Callable[[str], ConfigError]) -> Condition:
    parts = tuple(path.split("."))
    if not path or any(not p for p in parts):
        raise where(f"args path {path!r} is not a dotted path")
    test: Callable[[list[object]], bool]
    if op == "equals":
        test = lambda vs: any(_same(v, operand) for v in vs)  # noqa: E731
    elif op in ("in", "not_in"):
        if not isinstance(operand, list):
            raise where(f"{op} needs a list")
        options = list(operand)
        if op == "in":
            test = lambda vs: any(any(_same(v, o) for o in options) for v in vs)  # noqa: E731
        else:
            test = lambda vs: not vs or any(  # noqa: E731
                not any(_same(v, o) for o in options) for v in vs
            )
    elif op == "matches":
        if not isinstance(operand, str):
            raise where("matches needs a regular expression string")
        try:
            rx = rule_pattern(operand)
        except ConfigError as e:
            raise where(f"bad regular expression {operand!r}: {e.message}") from None
        test = lambda vs: any(isinstance(v, str) and rx.search(v) for v in vs)  # noqa: E731
    elif op == "exists":
        if not isinstance(operand, bool):
            raise where("exists needs true or false")
        test = (lambda vs: bool(vs)) if operand else (lambda vs: not vs)
    elif op in ("gt", "lt"):
        bound = _number(operand)
        if bound is None:
            raise where(f"{op} needs a number")
        if op == "gt":
            test = lambda vs: any((n := _number(v)) is not None and n > bound for v in vs)  # noqa: E731
        else:
            test = lambda vs: any((n := _number(v)) is not None and n < bound for v in vs)  # noqa: E731
    else:
        raise where(f"unknown operator {op!r} (expected one of {', '.join(sorted(OPERATORS))})")
    return Condition(parts, op, operand, test)


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    action: Action
    description: str = ""
    message: str = ""
    on_deny: OnDeny | None = None       # None: the config's defaults.on_deny
    timeout_s: float | None = None
    approvers: tuple[str, ...] = ()
    ticket: bool = False
    shadow: bool = False                # mode: shadow - evaluated and recorded, never enforced
    tools: tuple[re.Pattern[str], ...] | None = None
    agents: tuple[re.Pattern[str], ...] | None = None
    effect: Effect | None = None
    api: tuple[str, ...] | None = None  # as written: operation names or globs
    api_patterns: tuple[re.Pattern[str], ...] | None = None
    args: tuple[Condition, ...] = ()
    file: str | None = None
    line: int = 0
    labels: frozenset[str] | None = None        # match.label: the call carries one of them
    session: SessionCondition | None = None     # match.session: flows.py

    def evaluate(self, subject: Subject) -> RuleTrace:
        if self.tools is not None and not any(p.fullmatch(subject.name) for p in self.tools):
            return RuleTrace(self.id, False, f"tool {subject.call.name!r} not in match.tool")
        if self.agents is not None and not (
            subject.agent and any(p.fullmatch(normalize(subject.agent)) for p in self.agents)
        ):
            return RuleTrace(self.id, False, f"agent {subject.agent!r} not in match.agent")
        if self.effect is not None and subject.effect is not self.effect:
            return RuleTrace(self.id, False, f"effect is {subject.effect}, not {self.effect}")
        if self.api_patterns is not None and (subject.api is None or not any(
                p.fullmatch(normalize(subject.api)) for p in self.api_patterns)):
            shown = self.api[0] if self.api and len(self.api) == 1 else list(self.api or ())
            return RuleTrace(self.id, False, f"api is {subject.api!r}, not {shown!r}")
        if self.labels is not None and not (self.labels & subject.labels):
            shown = ", ".join(sorted(subject.labels)) or "none"
            return RuleTrace(self.id, False, f"labels are {shown}, not any of "
                             f"{', '.join(sorted(self.labels))}")
        args = subject.call.arguments or {}
        reasons: list[str] = []
        for cond in self.args:
            ok, why = cond.check(args)
            if not ok:
                return RuleTrace(self.id, False, why)
            reasons.append(why)
        evidence = ""
        if self.session is not None:  # last: the only condition that scans the history
            ok, why, evidence = self.session.check(subject.history)
            if not ok:
                return RuleTrace(self.id, False, why)
            reasons.append(why)
        return RuleTrace(self.id, True, "; ".join(reasons) or "all match conditions hold",
                         self.action, self.shadow, evidence)


def _patterns(value: object, key: str, where: Callable[[str], ConfigError]) -> tuple[re.Pattern[str], ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise where(f"{key} must be a name/glob or a list of them")
    return tuple(_glob(str(i)) for i in items)


def parse_duration(value: object, where: Callable[[str], ConfigError]) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if m:
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
            n = float(m.group(1)) * scale
            if n > 0:
                return n
    raise where(f"{value!r} is not a duration (like 30s, 10m, 1h)")


def compile_rule(raw: object, file: str | None, fallback_line: int) -> Rule:
    if not isinstance(raw, YMap):
        raise ConfigError("a rule must be a mapping", file=file, line=fallback_line)
    rule_id = raw.get("id")

    def where(message: str, key: str | None = None, line: int | None = None) -> ConfigError:
        if line is None:
            line = raw.line_of(key.split(".")[0]) if key else raw.line
        return ConfigError(
            message, file=file, line=line, rule_id=str(rule_id) if rule_id else None, key=key
        )

    if isinstance(rule_id, bool | int | float):  # YAML read it as a boolean or a number
        raise where(f"'id' is the {type(rule_id).__name__} {str(rule_id).lower()} here, not a "
                    "string: YAML reads yes/no/on/off/true/false and numbers unquoted; quote "
                    "the id (id: \"no\")", "id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise where("every rule needs an 'id' (a non-empty string)", "id")
    if rule_id.startswith(BUILTIN_PREFIX):
        raise where(f"rule ids starting with {BUILTIN_PREFIX!r} are reserved", "id")
    for key in raw:
        if key not in RULE_KEYS:
            raise where(f"unknown key (expected one of {', '.join(sorted(RULE_KEYS))})", key)
    try:
        action = Action(str(raw.get("action")))
    except ValueError:
        raise where("action must be allow, deny or hold", "action") from None
    message = raw.get("message", "")
    if not isinstance(message, str):
        raise where("message must be text", "message")
    description = raw.get("description", "")
    try:
        on_deny = OnDeny(raw["on_deny"]) if "on_deny" in raw else None
    except ValueError:
        raise where("on_deny must be continue, rewrite or error", "on_deny") from None
    timeout = None
    if "timeout" in raw:
        timeout = parse_duration(raw["timeout"], lambda m: where(m, "timeout"))
    approvers = raw.get("approvers", [])
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise where("approvers must be a list of names", "approvers")
    mode = raw.get("mode", "wait")
    if mode not in ("wait", "ticket", "shadow"):
        raise where("mode must be wait or ticket (hold rules) or shadow (any rule)", "mode")
    if mode in ("wait", "ticket") and "mode" in raw and action is not Action.HOLD:
        raise where("mode wait or ticket only applies to action: hold", "mode")

    match = raw.get("match", YMap())
    if not isinstance(match, dict):
        raise where("match must be a mapping", "match")
    for key in match:
        if key not in MATCH_KEYS:
            raise where(f"unknown key (expected one of {', '.join(sorted(MATCH_KEYS))})",
                        f"match.{key}", match.line_of(key) if isinstance(match, YMap) else None)

    def mwhere(key: str) -> Callable[[str], ConfigError]:
        line = match.line_of(key) if isinstance(match, YMap) else None
        return lambda m: where(m, f"match.{key}", line)

    tools = _patterns(match["tool"], "tool", mwhere("tool")) if "tool" in match else None
    agents = _patterns(match["agent"], "agent", mwhere("agent")) if "agent" in match else None
    effect = None
    if "effect" in match:
        try:
            effect = Effect(match["effect"])
        except ValueError:
            raise where("effect must be read or write", "match.effect") from None
    api: tuple[str, ...] | None = None
    if "api" in match:
        items = match["api"] if isinstance(match["api"], list) else [match["api"]]
        if not items or not all(isinstance(i, str) and i.strip() for i in items):
            raise where("api must be an operation name like jira.createIssue (or a glob), "
                        "or a list of them", "match.api")
        api = tuple(str(i) for i in items)
    labels = (frozenset(label_names(match["label"], mwhere("label")))
              if "label" in match else None)
    session = (compile_session(match["session"], mwhere("session"))
               if "session" in match else None)
    conditions: list[Condition] = []
    args = match.get("args", {})
    if not isinstance(args, dict):
        raise where("args must map dotted paths to conditions", "match.args")
    for path, spec in args.items():
        key = f"match.args.{path}"
        line = args.line_of(path) if isinstance(args, YMap) else None
        if not isinstance(spec, dict) or not spec:
            raise where("a condition is a mapping like {in: [a, b]}", key, line)
        for op, operand in spec.items():

            def at(message: str, k: str = key, n: int | None = line) -> ConfigError:
                return where(message, k, n)

            conditions.append(_condition(str(path), str(op), operand, at))
    return Rule(
        id=rule_id,
        action=action,
        description=str(description),
        message=message,
        on_deny=on_deny,
        timeout_s=timeout,
        approvers=tuple(approvers),
        ticket=mode == "ticket",
        shadow=mode == "shadow",
        tools=tools,
        agents=agents,
        effect=effect,
        api=api,
        api_patterns=tuple(_glob(a) for a in api) if api is not None else None,
        args=tuple(conditions),
        file=file,
        line=raw.line,
        labels=labels,
        session=session,
    )
