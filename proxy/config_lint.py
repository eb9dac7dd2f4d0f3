"""Warnings about a config that loads: what it says that cannot do what it seems to.

- a rule shadowed by an earlier one: the same match, and the earlier rule's action is
  as strict or stricter, so it matches wherever the later one does and the strictest
  matching rule wins
  and the later one never changes a decision;
- a rule no tool can match: `tools:` declares the tools, and none of them fits the
  rule's `match.tool`.

`tether check` lists these apart from errors; they never stop a load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .policy.rules import Rule


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str               # error | warning
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    key: str | None = None
    rule: str | None = None


def _match(rule: Rule) -> tuple[object, ...]:
    def names(patterns: tuple[re.Pattern[str], ...] | None) -> frozenset[str] | None:
        return None if patterns is None else frozenset(p.pattern for p in patterns)

    return (names(rule.tools), names(rule.agents), rule.effect, rule.api, rule.args,
            rule.labels, rule.session)


def shadowed(rules: Sequence[Rule]) -> list[Finding]:
    out = []
    for i, rule in enumerate(rules):
        if rule.shadow:
            continue
        for earlier in rules[:i]:
            if (not earlier.shadow and _match(earlier) == _match(rule)
                    and earlier.action.strictness >= rule.action.strictness):
                out.append(Finding(
                    "warning", f"shadowed: rule {earlier.id} ({earlier.file}:{earlier.line}) "
                    f"has the same match and action {earlier.action.value}, as strict or stricter; "
                    "this rule never changes a decision", rule.file, rule.line,
                    None, "match", rule.id))
                break
    return out


def unmatchable(rules: Sequence[Rule], declared: Sequence[str]) -> list[Finding]:
    if not declared:
        return []
    out = []
    for rule in rules:
        if rule.tools is not None and not any(p.fullmatch(t) for p in rule.tools
                                              for t in declared):
            out.append(Finding(
                "warning", "no tool can match: tools: declares "
                f"{', '.join(sorted(declared))} and none fits match.tool", rule.file,
                rule.line, None, "match.tool", rule.id))
    return out


def lint(rules: Sequence[Rule], declared: Sequence[str]) -> list[Finding]:
    return shadowed(rules) + unmatchable(rules, declared)
