"""Flow rules: labels on tools, and rule conditions on what the session did before.

The `flows:` section labels tools and API operations (by name or glob, in normal form):

    flows:
      labels:
        untrusted: [web_fetch, read_email, aws.s3.GetObject]   # brings untrusted content
        sensitive: [query_customers, get_secret]               # reads private data
        external:  [send_email, "http_*"]                      # sends data out
      history: {keep: 1000, ttl: 24h}

A rule then matches on the call's own labels (`match.label`) and on the session's
earlier calls (`match.session.after`): each condition under `after` must be met by at
least one earlier call of the session that was allowed (a denied call never ran, so it
brought nothing in and sent nothing out). A list under `after` is all-of: the lethal
trifecta is `{label: external, session: {after: [{label: sensitive}, {label: untrusted}]}}`.

Everything here is plain data and pure functions: the front end loads the history
(sessions/history.py) and hands it over on `Exchange.history`.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..config_nodes import err
from ..config_tables import AFTER, FLOW_HISTORY, FLOWS, SESSION_MATCH
from ..errors import ConfigError
from ..model import Action, Effect, PastCall
from .names import normalize
from .source import YMap

LABEL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
AFTER_KEYS = AFTER.names  # documented in config_tables.py
SESSION_KEYS = SESSION_MATCH.names
DEFAULT_KEEP = 1000
MAX_KEEP = 100_000
MAX_EVIDENCE = 3  # earlier calls named per condition in a message
# A tool result for a call id tether never decided (a forged or foreign result): its
# content is of unknown origin, so flow rules see it as an untrusted earlier call.
UNSEEN_TOOL = "<unseen tool result>"


@dataclass(frozen=True, slots=True)
class Labels:
    """Label -> the compiled globs it covers (tool names and API operations)."""

    patterns: tuple[tuple[str, tuple[re.Pattern[str], ...]], ...] = ()

    def of(self, name: str, api: str | None = None) -> frozenset[str]:
        """The labels of a call: its normalised tool name's, and its API operation's."""
        if not self.patterns:
            return frozenset()
        names = (name,) if api is None else (name, normalize(api))
        return frozenset(label for label, globs in self.patterns
                         if any(p.fullmatch(n) for p in globs for n in names))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(label for label, _ in self.patterns)


@dataclass(frozen=True, slots=True)
class Flows:
    """The `flows:` section. `ttl_s` None: the session budgets' `session_ttl`."""

    labels: Labels = field(default_factory=Labels)
    keep: int = DEFAULT_KEEP
    ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class Earlier:
    """One condition under `session.after`: an earlier allowed call with all of these."""

    labels: frozenset[str] | None = None
    tools: tuple[re.Pattern[str], ...] | None = None
    effect: Effect | None = None
    text: str = ""  # as written, for traces

    def matches(self, past: PastCall) -> bool:
        if past.action is not Action.ALLOW:
            return False
        if self.labels is not None and not (self.labels & past.labels):
            return False
        if self.effect is not None and past.effect is not self.effect:
            return False
        return self.tools is None or any(p.fullmatch(past.tool) for p in self.tools)


@dataclass(frozen=True, slots=True)
class SessionCondition:
    after: tuple[Earlier, ...]

    def check(self, history: Sequence[PastCall]) -> tuple[bool, str, str]:
        """(holds, reason for the trace, evidence for the message). Scans the history
        newest first, once per condition; the evidence names the latest matches."""
        found: list[list[PastCall]] = []
        allow = Action.ALLOW
        for cond in self.after:
            hits: list[PastCall] = []
            labels = cond.labels
            for past in reversed(history):
                # The label test inline: it is the usual condition, over up to `keep` calls.
                if labels is not None and not (labels & past.labels):
                    continue
                if past.action is allow and cond.matches(past):
                    hits.append(past)
                    if len(hits) == MAX_EVIDENCE:
                        break
            if not hits:
                return False, (f"session: no earlier allowed call with {cond.text} "
                               f"({len(history)} in the history)"), ""
            found.append(hits)
        parts = [f"after {describe(cond, hits)}" for cond, hits in zip(self.after, found,
                                                                      strict=True)]
        evidence = "; ".join(parts)
        return True, f"session: {evidence}", evidence


def describe(cond: Earlier, hits: Sequence[PastCall]) -> str:
    """`untrusted call web_fetch(url='https://x') [decision 3f2a at 2026-12-07T06:20:01Z]`."""
    what = cond.text
    calls = ", ".join(f"{p.summary or p.tool} [{_where(p)}]" for p in hits)
    return f"{what}: {calls}"


def _where(p: PastCall) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.at)) if p.at else "time unknown"
    who = f"decision {p.decision_id}" if p.decision_id else "never decided by tether"
    return f"{who} at {when}"


# Loading -----------------------------------------------------------------------------

def _globs(value: object, where: Callable[[str], ConfigError], what: str
           ) -> tuple[re.Pattern[str], ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise where(f"{what} must be a name/glob or a list of them")
    return tuple(re.compile(fnmatch.translate(normalize(str(i)))) for i in items)


def parse_flows(node: object, doc: YMap) -> Flows:
    """The `flows:` section; ConfigError with file and line on anything wrong."""
    if node is None:
        return Flows()
    if not isinstance(node, YMap):
        raise _err("must be a mapping", doc, "flows")
    for key in node:
        if key not in FLOWS.names:
            raise _err(f"unknown key (expected one of {FLOWS.expected()})", node, key, "flows")
    labels: list[tuple[str, tuple[re.Pattern[str], ...]]] = []
    raw = node.get("labels")
    if raw is not None:
        if not isinstance(raw, YMap):
            raise _err("must map a label to tool names or globs", node, "labels", "flows")
        for label, globs in raw.items():
            if not isinstance(label, str) or not LABEL_NAME.fullmatch(label):
                raise _err("a label is a lower-case name like untrusted, sensitive, external",
                           raw, str(label), "flows.labels")
            def where(m: str, node: YMap = raw, k: str = label) -> ConfigError:
                return _err(m, node, k, "flows.labels")

            labels.append((label, _globs(globs, where, "a label")))
    keep, ttl = DEFAULT_KEEP, None
    hist = node.get("history")
    if hist is not None:
        if not isinstance(hist, YMap):
            raise _err("must be a mapping like {keep: 1000, ttl: 24h}", node, "history", "flows")
        for key in hist:
            if key not in FLOW_HISTORY.names:
                raise _err(f"unknown key (expected one of {FLOW_HISTORY.expected()})", hist, key,
                           "flows.history")
        keep = hist.get("keep", DEFAULT_KEEP)
        if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
            raise _err(f"must be a whole number from 1 to {MAX_KEEP}", hist, "keep",
                       "flows.history")
        if "ttl" in hist:
            from .rules import parse_duration

            ttl = max(1, int(parse_duration(
                hist["ttl"], lambda m: _err(m, hist, "ttl", "flows.history"))))
    return Flows(Labels(tuple(labels)), keep, ttl)


def compile_session(node: object, where: Callable[[str], ConfigError]) -> SessionCondition:
    """`match.session`. Its labels are checked against `flows.labels` by the loader,
    which sees every rule (`unknown_labels`)."""
    if not isinstance(node, dict):
        raise where("session must be a mapping like {after: {label: untrusted}}")
    for key in node:
        if key not in SESSION_KEYS:
            raise where(f"unknown key session.{key} (expected after)")
    if "after" not in node:
        raise where("session needs after: {label: ...} (or a list of such conditions)")
    raw = node["after"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise where("session.after must not be empty")
    return SessionCondition(tuple(_earlier(i, where) for i in items))


def _earlier(node: object, where: Callable[[str], ConfigError]) -> Earlier:
    if not isinstance(node, dict) or not node:
        raise where("each session.after condition is a mapping with label, tool or effect")
    for key in node:
        if key not in AFTER_KEYS:
            raise where(f"unknown key session.after.{key} (expected one of "
                        f"{', '.join(sorted(AFTER_KEYS))})")
    labels = None
    if "label" in node:
        labels = frozenset(label_names(node["label"], where))
    tools = _globs(node["tool"], where, "session.after.tool") if "tool" in node else None
    effect = None
    if "effect" in node:
        try:
            effect = Effect(node["effect"])
        except ValueError:
            raise where("session.after.effect must be read or write") from None
    text = " ".join(f"{k}={_show(node[k])}" for k in ("label", "effect", "tool") if k in node)
    return Earlier(labels, tools, effect, text)


def label_names(value: object, where: Callable[[str], ConfigError]) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and LABEL_NAME.fullmatch(i) for i in items):
        raise where("label must be a label name (like untrusted) or a list of them")
    return tuple(str(i) for i in items)


def _show(value: object) -> str:
    return "|".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _err(message: str, node: YMap, key: str, section: str | None = None) -> ConfigError:
    return err(message, node, key, section)


def unknown_labels(used: Mapping[str, frozenset[str]], declared: frozenset[str]
                   ) -> dict[str, frozenset[str]]:
    """Rule id -> the labels it names that no tool carries (a typo would never match).
    `untrusted` is always known: a tool result tether never saw carries it."""
    known = declared | {"untrusted"}
    return {rule: names - known for rule, names in used.items() if names - known}
