"""`tether check`: every error in every file in one run, then the warnings.

Each error names file:line:column, the key path and what was expected. The loader
collects errors (config_nodes.Problems) and goes on past each key, section, rule and
included file that is wrong; warnings (config_lint.py, and what the loader warns of)
come after the errors, marked as such. `--format json` prints one JSON document for CI
annotations.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import config as config_mod
from .config_lint import Finding, lint
from .config_nodes import Problems
from .errors import ConfigError

_WARNING = re.compile(r"(?P<file>[^:\n]+?)(?::(?P<line>\d+))?: (?P<message>.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Checked:
    file: str
    config: config_mod.Config | None  # None when there is an error
    findings: tuple[Finding, ...]     # errors first, then warnings

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)


def _column(error: ConfigError | Finding, lines: dict[str, list[str]]) -> int | None:
    """The error's column, or where its key (or the line's text) starts on its line."""
    if error.column is not None or not error.file or not error.line:
        return error.column
    if error.file not in lines:
        try:
            lines[error.file] = Path(error.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines[error.file] = []
    text = lines[error.file]
    if not 0 < error.line <= len(text):
        return None
    line = text[error.line - 1]
    last = re.sub(r"\[\d+\]$", "", (error.key or "").rsplit(".", 1)[-1])
    if last:
        at = re.search(rf"(?<![\w-]){re.escape(last)}\s*:", line)
        if at:
            return at.start() + 1
    stripped = line.lstrip(" -")
    return len(line) - len(stripped) + 1 if stripped else None


def _error(e: ConfigError, lines: dict[str, list[str]]) -> Finding:
    return Finding("error", e.message, e.file, e.line, _column(e, lines), e.key, e.rule_id)


def _warning(text: str, default_file: str) -> Finding:
    m = _WARNING.fullmatch(text)
    if m is None or not (m["file"] == default_file or os.path.exists(m["file"])):
        return Finding("warning", text, default_file)
    return Finding("warning", m["message"], m["file"], int(m["line"]) if m["line"] else None)


def check_file(path: str, env: dict[str, str] | None = None) -> Checked:
    problems = Problems(collect=True)
    try:
        cfg = config_mod.load(path, env, problems=problems)
    except ConfigError as e:  # the main file itself cannot be read as a mapping
        return Checked(path, None, (_error(e, {}),))
    lines: dict[str, list[str]] = {}
    errors = [_error(e, lines) for e in problems.errors]
    warnings = [_warning(w, cfg.source or path) for w in cfg.warnings]
    warnings += [replace(f, column=_column(f, lines))
                 for f in lint(cfg.policy.rules, cfg.declared_tools, cfg.lookups, cfg.cloud)]
    errors.sort(key=lambda f: (f.file != path, f.file or "", f.line or 0, f.column or 0))
    return Checked(path, None if errors else cfg, tuple(errors + warnings))


def render_text(checked: Sequence[Checked]) -> tuple[str, str]:
    """(stdout, stderr): a line per file that is fine on stdout; each error, then each
    warning, as file:line:column: severity: [rule R: ][key: ]message, on stderr."""
    out, err = [], []
    for severity in ("error", "warning"):
        for c in checked:
            for f in c.findings:
                if f.severity != severity:
                    continue
                where = ":".join(str(p) for p in (f.file or c.file, f.line, f.column) if p)
                what = "".join(f"{p}: " for p in (f"rule {f.rule}" if f.rule else None, f.key)
                               if p)
                err.append(f"{where}: {severity}: {what}{f.message}")
    for c in checked:
        if c.config is not None:
            out.append(f"{c.file}: ok ({len(c.config.policy.rules)} rules, "
                       f"revision {c.config.policy.revision})")
        else:
            n = c.errors
            out.append(f"{c.file}: {n} error{'s' if n != 1 else ''}")
    return "\n".join(out), "\n".join(err)


def render_json(checked: Sequence[Checked]) -> str:
    return json.dumps({
        "ok": not any(c.errors for c in checked),
        "files": [{"file": c.file, "ok": c.config is not None, "errors": c.errors,
                   "rules": len(c.config.policy.rules) if c.config else None,
                   "revision": c.config.policy.revision if c.config else None}
                  for c in checked],
        "problems": [{**asdict(f), "file": f.file or c.file}
                     for severity in ("error", "warning") for c in checked
                     for f in c.findings if f.severity == severity],
    }, indent=2, ensure_ascii=False)
