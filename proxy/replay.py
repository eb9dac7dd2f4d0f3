"""`tether replay`: what a new policy would have decided on calls already recorded.

Each `decision` record of an audit log is turned back into the call and exchange
the policy saw (tool, arguments, agent, api) and decided again by the new
config's engine; the old verdict (`action`, `rules`) is set beside the new one.
Nothing is sent anywhere: this is a dry run over history, the companion of
`mode: shadow` (a dry run over live traffic).

What a replay cannot know, it says:
  - arguments the audit log redacted (`masked` names an `arguments...` path) are
    re-decided as recorded, masks and all, and the record is flagged;
  - verdicts from outside the rules (loop breakers, budgets, OpenAPI checks,
    lookups: `tether:` ids the engine does not produce) are not re-evaluated;
    they are carried over as recorded denies and named.
A log may cross policy revisions (a reload writes a `kind: reload` record between the
last decision of one revision and the first of the next): each call is set beside the
verdict of the revision that made it (`policy_revision`), and the report names the
revisions and the reloads it crossed.
The effect is re-derived from the new config for LLM tool calls (the `tools:`
table may have changed); for egress calls (`api` set) the recorded effect is
kept, since it came from the API spec or cloud catalog, not the rules.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .audit.outcomes import HOLD_KIND
from .errors import TetherError
from .model import Action, Effect, Exchange, RuleTrace, ToolCall
from .policy.engine import DEFAULT, MALFORMED, SCOPE, UNDECLARED, PolicyEngine, merge
from .providers.arguments import parse_arguments
from .replay_flows import ReplayHistory
from .surrogates import scrub

ENGINE_IDS = frozenset({MALFORMED, UNDECLARED, SCOPE, DEFAULT})
RELOAD_KIND = "reload"


@dataclass(frozen=True, slots=True)
class Reload:
    """A reload the log crossed: `where`, from `old` to `new` revision, rules changed."""

    where: str
    old: str
    new: str
    rules: Mapping[str, object]


class ReplayInputError(TetherError):
    """An audit file that cannot be read as decision records (exit 1)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    where: str                  # file:line of the record
    tool: str
    agent: str | None
    old_action: str
    old_rules: tuple[str, ...]
    new_action: str
    new_rules: tuple[str, ...]
    new_shadow: tuple[str, ...]
    masked: tuple[str, ...]     # redacted argument paths: re-decided on the masked values
    carried: tuple[str, ...]    # verdicts from outside the rules, kept as recorded
    old_revision: str | None = None  # the policy revision that made the recorded verdict

    @property
    def changed(self) -> bool:
        return self.old_action != self.new_action or set(self.old_rules) != set(self.new_rules)

    @property
    def transition(self) -> str:
        return f"{self.old_action} -> {self.new_action}"

    def as_json(self) -> dict[str, object]:
        return {"where": self.where, "tool": self.tool, "agent": self.agent,
                "old": {"action": self.old_action, "rules": list(self.old_rules),
                        "revision": self.old_revision},
                "new": {"action": self.new_action, "rules": list(self.new_rules),
                        "shadow_rules": list(self.new_shadow)},
                "changed": self.changed, "masked": list(self.masked),
                "carried": list(self.carried)}


def read_records(files: Iterable[Path]) -> Iterator[tuple[str, Mapping[str, object]]]:
    """Every decision record (and the hold and reload records between them), with where
    it is; other kinds are skipped."""
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReplayInputError(f"{file}: cannot read: {e}") from e
        # Records end at "\n" only: str.splitlines would also cut at a raw U+2028 or
        # U+0085 inside a JSON string, which the encoder leaves unescaped.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ReplayInputError(f"{file}:{n}: not a JSON record: {e}") from e
            if not isinstance(record, dict):
                raise ReplayInputError(f"{file}:{n}: not a JSON object")
            if record.get("kind") in ("decision", HOLD_KIND, RELOAD_KIND):
                yield f"{file}:{n}", record


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def redecide(engine: PolicyEngine, where: str, record: Mapping[str, object],
             history: ReplayHistory | None = None) -> Outcome:
    """`history`: the sessions so far, for flow rules (replay_flows.py); the call is
    added to it once decided."""
    tool, old_action = record.get("tool"), record.get("action")
    if not isinstance(tool, str) or not isinstance(old_action, str):
        raise ReplayInputError(f"{where}: a decision record needs 'tool' and 'action'")
    old_rules = _strings(record.get("rules"))
    recorded = record.get("arguments")
    arguments: Mapping[str, object] | None
    if isinstance(recorded, dict):
        raw = json.dumps(recorded, ensure_ascii=False)
        arguments, problem = recorded, None
    else:  # the call's text did not parse when it was recorded: parse it again
        raw = recorded if isinstance(recorded, str) else ""
        arguments, problem = parse_arguments(raw)
    if problem is None and MALFORMED in old_rules:
        problem = "recorded as malformed (cut off or unparsable)"
    call = ToolCall(id=str(record.get("call_id") or "replay"), name=tool, raw_arguments=raw,
                    arguments=None if problem else arguments, problem=problem)
    agent = _text(record.get("agent"))
    exchange = Exchange(provider=str(record.get("provider") or ""),
                        model=str(record.get("model") or ""), declared_tools=(tool,),
                        session=_text(record.get("session")), agent=agent,
                        endpoint=str(record.get("endpoint") or ""),
                        history=history.before(record) if history is not None else ())
    api = _text(record.get("api"))
    effect = None
    if api is not None:
        try:
            effect = Effect(str(record.get("effect")))
        except ValueError:
            effect = None
    carried = tuple(r for r in old_rules if r.startswith("tether:") and r not in ENGINE_IDS)
    decision = merge(engine.decide(call, exchange, api=api, effect=effect),
                     [RuleTrace(r, True, "as recorded (not re-evaluated)", Action.DENY)
                      for r in carried])
    if history is not None:
        history.add(record, call)
    masked = tuple(p for p in _strings(record.get("masked"))
                   if p == "arguments" or p.startswith("arguments."))
    return Outcome(where, tool, agent, old_action, old_rules, decision.action.value,
                   decision.rules, decision.shadow, masked, carried,
                   _text(record.get("policy_revision")))


def replay(engine: PolicyEngine, records: Iterable[tuple[str, Mapping[str, object]]],
           reloads: list[Reload] | None = None) -> list[Outcome]:
    """Records in order; a `hold` record ends the held call in the sessions' history; a
    reload that took effect is added to `reloads`."""
    history = ReplayHistory(engine.policy) if engine.policy.reads_history else None
    out: list[Outcome] = []
    for where, record in records:
        if record.get("kind") == RELOAD_KIND:
            rules = record.get("rules")
            if reloads is not None and record.get("result") == "ok":
                reloads.append(Reload(where, str(record.get("old_revision")),
                                      str(record.get("revision")),
                                      rules if isinstance(rules, dict) else {}))
            continue
        if record.get("kind") == HOLD_KIND:
            if history is not None:
                history.ended(record)
            continue
        out.append(redecide(engine, where, record, history))
    return out


def _rules(rules: tuple[str, ...]) -> str:
    return f"[{', '.join(rules)}]" if rules else "[]"


def _revisions(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(Counter(o.old_revision or "unknown" for o in outcomes))


def render_text(outcomes: list[Outcome], config: str, revision: str,
                reloads: Sequence[Reload] = ()) -> str:
    lines = [f"replayed {len(outcomes)} decision records under {config} (revision {revision})"]
    recorded = _revisions(outcomes)
    if len(recorded) > 1:
        lines.append(f"recorded under {len(recorded)} revisions: "
                     + ", ".join(f"{r} ({n})" for r, n in recorded.items()))
    for r in reloads:
        what = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in r.rules.items()
                         if isinstance(v, list) and v)
        lines.append(f"reload at {r.where}: {r.old} -> {r.new}" + (f" ({what})" if what else ""))
    for o in outcomes:
        notes = []
        if o.masked:
            notes.append(f"arguments redacted ({', '.join(o.masked)}): re-decided as recorded")
        if o.carried:
            notes.append(f"not re-evaluated, kept as recorded: {', '.join(o.carried)}")
        if o.new_shadow:
            notes.append(f"shadow rules would match: {', '.join(o.new_shadow)}")
        if o.changed:
            lines.append(f"CHANGED {o.where} {o.tool} agent={o.agent}: {o.old_action} "
                         f"{_rules(o.old_rules)} -> {o.new_action} {_rules(o.new_rules)}")
        elif o.masked or o.new_shadow:
            lines.append(f"same    {o.where} {o.tool} agent={o.agent}: {o.new_action} "
                         f"{_rules(o.new_rules)}")
        else:
            continue
        lines += [f"        note: {n}" for n in notes]
    changed = [o for o in outcomes if o.changed]
    lines.append(f"summary: {len(outcomes) - len(changed)} unchanged, {len(changed)} changed")
    for transition, n in sorted(Counter(o.transition for o in changed).items()):
        lines.append(f"  {transition}: {n}")
    flagged = sum(1 for o in outcomes if o.masked)
    if flagged:
        lines.append(f"flagged: {flagged} re-decided on redacted arguments")
    return scrub("\n".join(lines))  # a recorded name may hold a lone surrogate: printable


def render_json(outcomes: list[Outcome], config: str, revision: str,
                reloads: Sequence[Reload] = ()) -> str:
    changed = [o for o in outcomes if o.changed]
    return json.dumps({
        "config": config,
        "revision": revision,
        "recorded_revisions": _revisions(outcomes),
        "reloads": [{"where": r.where, "old_revision": r.old, "revision": r.new,
                     "rules": dict(r.rules)} for r in reloads],
        "records": len(outcomes),
        "unchanged": len(outcomes) - len(changed),
        "changed": len(changed),
        "transitions": dict(sorted(Counter(o.transition for o in changed).items())),
        "flagged": sum(1 for o in outcomes if o.masked),
        "calls": [o.as_json() for o in outcomes],
    }, indent=2)
