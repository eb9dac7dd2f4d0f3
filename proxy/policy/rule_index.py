"""Which rules can match a call, found from its tool's name instead of by trying each.

A rule whose `match.tool` names its tools exactly (no `*`, `?` or `[`), the usual
shape, can match only calls of those names: it is filed under each. A glob can match
only names that start with its text before the first wildcard (`svc_7_*`: `svc_7_`): it
is filed under that prefix. Every other rule (a glob that starts with a wildcard, one
tether cannot read back, or no tool condition) is a candidate for every call. The candidates come back
in the policy's order, so a decision is the one trying every rule would make: the same
matches, messages and trace, at a cost that does not grow with the exact-name rules
(bench/rules_scale.py). `tether explain` still tries every rule, to show each verdict.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rules import Rule

WILDCARDS = frozenset("*?[")
CACHED_NAMES = 4096
_TRANSLATED = re.compile(r"\(\?s:(?P<body>.*)\)\\Z", re.S)


def glob_of(pattern: re.Pattern[str]) -> str | None:
    """The glob `fnmatch.translate` made `pattern` from, when it can be read back
    (verified by translating it again), else None. Rules and price tables keep only
    the compiled form; a label wants the text people wrote."""
    found = _TRANSLATED.fullmatch(pattern.pattern)
    if found is None:
        return None
    body, out, i = found["body"], [], 0
    while i < len(body):
        if body.startswith("(?>.*?", i):
            out.append("*")
            i += 6
        elif body.startswith(".*", i):
            out.append("*")
            i += 2
        elif body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif body[i] == ".":
            out.append("?")
            i += 1
        elif body[i] == ")":
            i += 1  # the end of an atomic group opened by a middle `*`
        elif body[i] in "([":
            return None  # character sets: not worth reading back
        else:
            out.append(body[i])
            i += 1
    text = "".join(out)
    return text if fnmatch.translate(text) == pattern.pattern else None


class RuleIndex:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._exact: dict[str, list[int]] = {}
        self._prefixed: dict[str, list[int]] = {}   # a glob's text before its first wildcard
        everywhere: list[int] = []
        for i, rule in enumerate(self.rules):
            globs = [glob_of(p) for p in rule.tools] if rule.tools is not None else [None]
            if not globs or any(g is None or g[:1] in WILDCARDS for g in globs):
                everywhere.append(i)
                continue
            for glob in dict.fromkeys(globs):
                assert glob is not None
                cut = next((at for at, c in enumerate(glob) if c in WILDCARDS), None)
                if cut is None:
                    self._exact.setdefault(glob, []).append(i)
                else:
                    self._prefixed.setdefault(glob[:cut], []).append(i)
        self._everywhere = tuple(everywhere)
        self._lengths = sorted({len(p) for p in self._prefixed})
        self._cache: dict[str, tuple[Rule, ...]] = {}

    def candidates(self, name: str) -> tuple[Rule, ...]:
        """The rules that can match a call of `name` (normalised), in policy order."""
        found = self._cache.get(name)
        if found is None:
            picked = {*self._everywhere, *self._exact.get(name, ())}
            for length in self._lengths:
                if length > len(name):
                    break
                picked.update(self._prefixed.get(name[:length], ()))
            found = tuple(self.rules[i] for i in sorted(picked))
            if len(self._cache) < CACHED_NAMES:   # names come from models: bounded
                self._cache[name] = found
        return found
