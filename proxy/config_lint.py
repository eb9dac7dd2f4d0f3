"""Warnings about a config that loads: what it says that cannot do what it seems to.

- a rule shadowed by an earlier one: the same match, and the earlier rule's action is
  as strict or stricter, so it matches wherever the later one does and the strictest
  matching rule wins
  and the later one never changes a decision;
- a rule no tool can match: `tools:` declares the tools, and none of them fits the
  rule's `match.tool`;
- a rule with a condition on looked-up tags (`Tags`, `ResourceGroupTags`,
  `SubscriptionTags`) whose `match.api` names only cloud operations no enabled
  `cloud.lookups` serves: the tags are never there, so it never matches;
- a `match.api` entry that cannot name a cloud operation: an Azure one without
  ARM's `Namespace/type/.../verb` shape (the verb read, write, delete or action),
  an AWS REST service's (S3 ...) that the catalog does not list. Services the
  catalog does not enumerate (EC2 and the other Query and JSON services, GCP) are
  not guessed at.

`tether check` lists these apart from errors; they never stop a load.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .forward.lookup_settings import LookupSettings
from .policy.cloud import CloudCatalog, builtin_catalog
from .policy.names import normalize
from .policy.rules import Rule

# Looked-up argument names, and the Azure scope each needs (None: any lookup's Tags).
TAG_ARGS = {"tags": None, "resourcegrouptags": "resource_group",
            "subscriptiontags": "subscription"}
ARM_VERBS = ("read", "write", "delete", "action")
_WILD = re.compile(r"[*?\[]")


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


def _prefix(pattern: str) -> str:
    """The literal text before a glob's first wildcard (normal form)."""
    m = _WILD.search(pattern)
    return normalize(pattern[:m.start()] if m else pattern)


def _may_start(pattern: str, start: str) -> bool:
    """Whether a name that begins with `start` can match `pattern` (a glob)."""
    pfx = _prefix(pattern)
    return pfx.startswith(start) or start.startswith(pfx)


def _served(pattern: str, arg: str, lookups: LookupSettings) -> bool | None:
    """Whether an enabled lookup puts `arg` into calls `pattern` matches (None: not a
    cloud pattern, so the argument may come with the call itself)."""
    clouds = [c for c in ("aws.", "azure.", "gcp.") if _may_start(pattern, c)]
    if not clouds or len(clouds) == 3 and not _prefix(pattern):
        return None  # `*` or a pattern that names no cloud: a tool's own arguments
    scope = TAG_ARGS[arg]
    azure = lookups.azure
    literal_read = _WILD.search(pattern) is None and normalize(pattern).endswith("/read")
    return ((scope is None and "aws." in clouds and lookups.aws_tags
             and _may_start(pattern, "aws.ec2."))
            or ("azure." in clouds and azure is not None and azure.tags and not literal_read
                and (scope or "resource") in azure.scopes
                and any(_may_start(pattern, _prefix(a)) for a in azure.apis))
            or (scope is None and "gcp." in clouds and lookups.gcp is not None
                and lookups.gcp.labels))


def unserved_tags(rules: Sequence[Rule], lookups: LookupSettings) -> list[Finding]:
    out = []
    for rule in rules:
        args = sorted({normalize(c.path[0]) for c in rule.args if c.path} & TAG_ARGS.keys())
        if not rule.api or not args:
            continue
        for arg in args:
            served = [_served(p, arg, lookups) for p in rule.api]
            if any(s is None for s in served) or any(served):
                continue
            name = next(c.path[0] for c in rule.args if c.path and normalize(c.path[0]) == arg)
            out.append(Finding(
                "warning", f"{name} is never there: no enabled cloud.lookups serves "
                f"{', '.join(rule.api)} (the condition can never hold)", rule.file, rule.line,
                None, f"match.args.{name}", rule.id))
            break
    return out


def _unknown_api(pattern: str, catalog: CloudCatalog) -> str | None:
    """Why `pattern` can name no cloud operation (None: it can, or tether cannot tell)."""
    name = normalize(pattern)
    if name.startswith("azure."):
        parts = name.removeprefix("azure.").split("/")
        last = parts[-1]
        if len(parts) < 2 and not _WILD.search(name):
            return "an Azure operation is azure.Namespace/type/.../verb (slashes, not dots)"
        if not _WILD.search(last) and last not in ARM_VERBS:
            return (f"an Azure operation ends in {', '.join(ARM_VERBS)} "
                    f"(ARM's RBAC names), not {last!r}")
        return None
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "aws" and not _WILD.search(parts[1]):
        rest = catalog.aws_rest.get(parts[1])
        regex = re.compile(fnmatch.translate(parts[2]))
        if rest is not None and not any(regex.fullmatch(normalize(op.name)) for op in rest.ops):
            return f"the catalog lists no such aws.{parts[1]} operation"
    return None


def unknown_apis(rules: Sequence[Rule], catalog: CloudCatalog) -> list[Finding]:
    out = []
    for rule in rules:
        for pattern in rule.api or ():
            why = _unknown_api(pattern, catalog)
            if why is not None:
                out.append(Finding("warning", f"{pattern} names no cloud operation: {why}",
                                   rule.file, rule.line, None, "match.api", rule.id))
    return out


def lint(rules: Sequence[Rule], declared: Sequence[str], lookups: LookupSettings | None = None,
         catalog: CloudCatalog | None = None) -> list[Finding]:
    return (shadowed(rules) + unmatchable(rules, declared)
            + unserved_tags(rules, lookups or LookupSettings())
            + unknown_apis(rules, catalog or builtin_catalog()))
