"""The `flows:` section checked against the rules that read it.

A rule that names a label no tool carries could never match: a typo (`untrusted` as
`untrusted_`) would silently switch a flow rule off, so it is a load error naming the
rule's file and line. `untrusted` is always known (a tool result tether never saw
carries it, see flows.UNSEEN_TOOL).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from .flows import Flows, parse_flows, unknown_labels
from .rules import Rule
from .source import YMap


def used_labels(rule: Rule) -> frozenset[str]:
    names = set(rule.labels or ())
    if rule.session is not None:
        for cond in rule.session.after:
            names |= cond.labels or set()
    return frozenset(names)


def load_flows(doc: YMap, rules: Sequence[Rule]) -> Flows:
    flows = parse_flows(doc.get("flows"), doc)
    unknown = unknown_labels({r.id: used_labels(r) for r in rules}, flows.labels.names)
    for rule in rules:
        if rule.id in unknown:
            names = ", ".join(sorted(unknown[rule.id]))
            declared = ", ".join(sorted(flows.labels.names)) or "none"
            raise ConfigError(f"the rule names label(s) {names} that no tool carries "
                              f"(flows.labels declares: {declared})", file=rule.file,
                              line=rule.line, rule_id=rule.id, key="match")
    return flows
