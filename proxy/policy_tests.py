"""`tether test` files: the config to load and the cases to judge with it.

    config: ../tether.yaml                 # relative to this file
    cases:
      - name: deleting production is denied           # optional
        tool: delete_volume                            # required
        args: {volume_id: v, tags: {env: production}}  # a mapping, or raw JSON text
        agent: janitor                                 # optional
        declared: [delete_volume]                      # the tools the request declared
        expect: deny                                   # required: allow | deny | hold
        rules: [no-prod-deletes]                       # rules the decision must name
        history: [{tool: web_fetch, args: {url: x}}]   # the session's earlier calls

A test must not pass by accident, so the file is checked whole before any case runs,
as strictly as the config: an unknown key (a misspelt `args` would run the call with
no arguments and still pass), a missing `tool` or `expect`, a value of the wrong type,
or a file with no cases is a ConfigError naming the file, line and key. Parsing takes
text; the caller reads the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from .errors import ConfigError
from .history_input import HistoryItem, parse_history
from .model import Action
from .policy.source import YMap, load_yaml

FILE_KEYS = ("config", "cases")
CASE_KEYS = ("name", "tool", "args", "agent", "declared", "expect", "rules", "history")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    tool: str
    raw_args: str                          # the arguments as the model would send them
    expect: Action
    agent: str | None = None
    declared: tuple[str, ...] | None = None
    rules: frozenset[str] = frozenset()
    line: int = 0
    history: tuple[HistoryItem, ...] = ()  # the session's earlier calls (history_input.py)


@dataclass(frozen=True, slots=True)
class CaseFile:
    file: str
    config: str                            # the config's path, from the file's folder
    cases: tuple[Case, ...]


def parse_case_file(text: str, file: str) -> CaseFile:
    doc = load_yaml(text, file)
    if not isinstance(doc, YMap):
        raise ConfigError("a test file is a mapping with 'config: PATH' and 'cases: [...]'",
                          file=file, line=1)
    for key in doc:
        if key not in FILE_KEYS:
            raise ConfigError(f"unknown key (expected one of {', '.join(FILE_KEYS)})",
                              file=file, line=doc.line_of(key), key=key)
    config = doc.get("config")
    if not isinstance(config, str) or not config.strip():
        raise ConfigError("a test file needs 'config: PATH' (the config to test)", file=file,
                          line=doc.line_of("config"), key="config")
    cases = doc.get("cases")
    if not isinstance(cases, list):
        raise ConfigError("a test file needs 'cases: [...]'", file=file,
                          line=doc.line_of("cases"), key="cases")
    if not cases:
        raise ConfigError("there are no cases: a file that tests nothing cannot pass",
                          file=file, line=doc.line_of("cases"), key="cases")
    parsed = tuple(_case(raw, i, file, doc.line_of("cases")) for i, raw in enumerate(cases))
    return CaseFile(file, str(PurePath(file).parent / config), parsed)


def _case(raw: object, i: int, file: str, list_line: int) -> Case:
    if not isinstance(raw, YMap):
        raise ConfigError("a case is a mapping with 'tool' and 'expect'", file=file,
                          line=list_line, key=f"cases[{i}]")
    name = raw.get("name", f"case {i + 1}")

    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(f"case {name!r}: {message}", file=file,
                           line=raw.line_of(key) if key in raw else raw.line,
                           key=f"cases[{i}].{key}")

    for key in raw:
        if key not in CASE_KEYS:
            raise fail(f"unknown key (expected one of {', '.join(CASE_KEYS)})", key)
    if not isinstance(name, str):
        raise fail("name must be text", "name")
    tool = raw.get("tool")
    if not isinstance(tool, str) or not tool.strip():
        raise fail("needs 'tool' (the tool's name)", "tool")
    try:
        expect = Action(str(raw.get("expect")))
    except ValueError:
        raise fail("needs 'expect': allow, deny or hold", "expect") from None
    args = raw.get("args", {})
    if isinstance(args, dict):
        args = json.dumps(args, default=str)
    elif not isinstance(args, str):
        raise fail("args must be a mapping, or the raw JSON text of the arguments", "args")
    agent = raw.get("agent")
    if agent is not None and not isinstance(agent, str):
        raise fail("agent must be text", "agent")
    declared = _names(raw, "declared", fail)
    rules = _names(raw, "rules", fail)
    history: tuple[HistoryItem, ...] = ()
    if "history" in raw:
        def hfail(message: str, node: YMap | None, key: str | None) -> ConfigError:
            at = node.line_of(key) if node is not None and key else (
                node.line if node is not None else raw.line_of("history"))
            return ConfigError(f"case {name!r}: {message}", file=file, line=at,
                               key=f"cases[{i}].history")

        history = parse_history(raw["history"], hfail)
    return Case(name, tool, args, expect, agent, declared, frozenset(rules or ()), raw.line,
                history)


def _names(raw: YMap, key: str, fail: Callable[[str, str], ConfigError]
           ) -> tuple[str, ...] | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(f"{key} must be a list of names", key)
    return tuple(value)
