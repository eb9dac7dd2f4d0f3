"""A session history written by hand, for `tether explain --history` and the `history:`
of a `tether test` case: test a flow rule without a running proxy.

    - tool: web_fetch                       # required
      args: {url: "https://evil.example"}   # optional: a mapping, or raw JSON text
      action: allow                         # optional: allow (default) | deny | hold
      labels: [untrusted]                   # optional: default from the config's flows.labels
      effect: read                          # optional: default as the config says
      decision_id: d1                       # optional: default h1, h2 ...
      call_id: call_1                       # optional
      at: 1765090800                        # optional: Unix time

Entries are oldest first. Checked as strictly as test cases (an unknown key is an
error naming the line), since a misspelt `labels` would test a different flow.
Labels and effects left out come from the config, so the history reads as the
proxy's own would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError
from .model import Action, Decision, Effect, PastCall, ToolCall
from .policy.engine import Policy, effect_of
from .policy.flows import LABEL_NAME
from .policy.names import normalize
from .policy.source import YMap
from .providers.arguments import parse_arguments
from .sessions.history import entry

ITEM_KEYS = ("tool", "args", "action", "labels", "effect", "decision_id", "call_id", "at")

type Fail = Callable[[str, YMap | None, str | None], ConfigError]


@dataclass(frozen=True, slots=True)
class HistoryItem:
    tool: str
    raw_args: str = "{}"
    action: Action = Action.ALLOW
    labels: frozenset[str] | None = None
    effect: Effect | None = None
    decision_id: str = ""
    call_id: str = ""
    at: float = 0.0


def parse_history(value: object, fail: Fail) -> tuple[HistoryItem, ...]:
    """`fail(message, node, key)` makes the error, naming the file and line."""
    if not isinstance(value, list):
        raise fail("history must be a list of earlier calls, oldest first", None, None)
    return tuple(_item(raw, i, fail) for i, raw in enumerate(value))


def _item(raw: object, i: int, fail: Fail) -> HistoryItem:
    if not isinstance(raw, YMap):
        raise fail(f"history[{i}] must be a mapping with at least 'tool'", None, None)
    for key in raw:
        if key not in ITEM_KEYS:
            raise fail(f"history[{i}]: unknown key (expected one of {', '.join(ITEM_KEYS)})",
                       raw, key)
    tool = raw.get("tool")
    if not isinstance(tool, str) or not tool.strip():
        raise fail(f"history[{i}] needs 'tool' (the tool's name)", raw, "tool")
    args = raw.get("args", {})
    if isinstance(args, dict):
        args = json.dumps(args, default=str)
    elif not isinstance(args, str):
        raise fail(f"history[{i}].args must be a mapping or raw JSON text", raw, "args")
    try:
        action = Action(str(raw.get("action", "allow")))
    except ValueError:
        raise fail(f"history[{i}].action must be allow, deny or hold", raw, "action") from None
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(
            isinstance(x, str) and LABEL_NAME.fullmatch(x) for x in labels)):
        raise fail(f"history[{i}].labels must be a list of label names", raw, "labels")
    effect = None
    if "effect" in raw:
        try:
            effect = Effect(raw["effect"])
        except ValueError:
            raise fail(f"history[{i}].effect must be read or write", raw, "effect") from None
    texts = {}
    for key in ("decision_id", "call_id"):
        v = raw.get(key, "")
        if not isinstance(v, str):
            raise fail(f"history[{i}].{key} must be text", raw, key)
        texts[key] = v
    at = raw.get("at", 0)
    if not isinstance(at, int | float) or isinstance(at, bool) or at < 0:
        raise fail(f"history[{i}].at must be a Unix time in seconds", raw, "at")
    return HistoryItem(tool, args, action, frozenset(labels) if labels is not None else None,
                       effect, texts["decision_id"] or f"h{i + 1}", texts["call_id"], float(at))


def resolve(items: tuple[HistoryItem, ...], policy: Policy) -> tuple[PastCall, ...]:
    """The entries the engine reads, labels and effects filled in from the config."""
    out = []
    for item in items:
        arguments, problem = parse_arguments(item.raw_args)
        call = ToolCall(item.call_id, item.tool, item.raw_args,
                        None if problem else arguments, problem=problem)
        name = normalize(item.tool)
        effect = item.effect or effect_of(name, policy.effects)
        labels = item.labels if item.labels is not None else policy.flows.labels.of(name)
        decision = Decision(item.action, effect=effect, decision_id=item.decision_id)
        out.append(entry(call, decision, labels, now=item.at))
    return tuple(out)


def load_history_file(text: str, file: str, policy: Policy) -> tuple[PastCall, ...]:
    """`--history FILE`: a YAML (or JSON) list of entries."""
    from .policy.source import load_yaml

    def fail(message: str, node: YMap | None, key: str | None) -> ConfigError:
        line = node.line_of(key) if node is not None and key else (node.line if node else 1)
        return ConfigError(message, file=file, line=line, key=key)

    return resolve(parse_history(load_yaml(text, file), fail), policy)
