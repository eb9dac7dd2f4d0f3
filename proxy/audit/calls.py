"""`tether audit calls`: every tool call in an audit log and how it ended, one per line.

Each `decision` record is joined with the `hold` record that ended it (the same
`decision_id`, see outcomes.py), so a held call shows its final outcome and who
decided it. Logs written before schema v3 have no outcomes: an allow or deny there
was final at once, a hold shows `unresolved`, as does a v3 hold with no `hold`
record (still waiting, or its tether was killed before it could write one).

Session, agent and tool names are chosen by agents and models: the text table
escapes control, format and separator characters (and cuts long values), so a
record cannot move the cursor, recolour the terminal or forge a line; `--json`
prints every value in full as ASCII-escaped JSON, one object per line.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TetherError
from .chain import chain_files
from .outcomes import HOLD_KIND, Outcome

UNRESOLVED = "unresolved"
_IMMEDIATE = {"allow": Outcome.ALLOWED.value, "deny": Outcome.DENIED.value}
_ESCAPED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
COLUMNS = ("TIME", "SESSION", "AGENT", "TOOL", "ACTION", "OUTCOME", "RULES", "BY")
WIDTHS = (27, 24, 20, 32, 6, 10, 48, 24)   # the most a column takes; longer values are cut


class AuditReadError(TetherError):
    """An audit file that cannot be read as records (exit 1)."""


@dataclass(frozen=True, slots=True)
class CallLine:
    where: str                  # file:line of the decision record (or the hold record)
    time: str | None
    decision_id: str | None
    session: str | None
    agent: str | None
    tool: str | None
    action: str | None          # the policy's verdict; None: the decision record is not here
    outcome: str                # an Outcome value, or `unresolved`
    rules: tuple[str, ...]
    by: str | None = None       # who ended a hold: a name, `timeout` or `tether`
    reason: str | None = None
    approval_id: str | None = None
    mode: str | None = None     # a hold's mode: wait or ticket
    ended: str | None = None    # when the hold ended

    def as_json(self) -> dict[str, object]:
        return {"time": self.time, "decision_id": self.decision_id, "session": self.session,
                "agent": self.agent, "tool": self.tool, "action": self.action,
                "outcome": self.outcome, "rules": list(self.rules), "by": self.by,
                "reason": self.reason, "approval_id": self.approval_id, "mode": self.mode,
                "ended": self.ended, "where": self.where}


def files_of(targets: Sequence[str]) -> list[Path]:
    """As `audit verify` takes them: files oldest first, or one base path or directory."""
    paths = [Path(t) for t in targets]
    if len(paths) == 1 and (paths[0].is_dir() or any(paths[0].parent.glob(paths[0].name
                                                                           + ".[0-9]*"))):
        return chain_files(paths[0])
    return paths


def read(files: Iterable[Path]) -> Iterator[tuple[str, Mapping[str, object]]]:
    """Every record with its file:line. A last line without its newline is being
    written (or was torn): it is no record yet, and is skipped."""
    for path in files:
        try:
            with path.open("rb") as f:
                for number, line in enumerate(f, start=1):
                    if not line.endswith(b"\n"):
                        break
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError) as e:
                        raise AuditReadError(f"{path}:{number}: not a JSON record") from e
                    if not isinstance(record, dict):
                        raise AuditReadError(f"{path}:{number}: not a JSON object")
                    yield f"{path}:{number}", record
        except OSError as e:
            raise AuditReadError(f"{path}: cannot read: {e.strerror}") from e


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _decision(where: str, r: Mapping[str, object]) -> CallLine:
    action = _text(r.get("action"))
    outcome = _text(r.get("outcome")) or _IMMEDIATE.get(action or "", UNRESOLVED)
    return CallLine(where, _text(r.get("time")), _text(r.get("decision_id")),
                    _text(r.get("session")), _text(r.get("agent")), _text(r.get("tool")),
                    action, outcome, _strings(r.get("rules")))


def _ended(line: CallLine | None, where: str, r: Mapping[str, object]) -> CallLine:
    if line is None:  # its decision is in an older file that was not given
        line = CallLine(where, None, _text(r.get("decision_id")), _text(r.get("session")),
                        _text(r.get("agent")), _text(r.get("tool")), None, UNRESOLVED, ())
    return CallLine(line.where, line.time, line.decision_id, line.session, line.agent,
                    line.tool, line.action, _text(r.get("outcome")) or UNRESOLVED,
                    _strings(r.get("rules")) or line.rules, _text(r.get("by")),
                    _text(r.get("reason")), _text(r.get("approval_id")), _text(r.get("mode")),
                    _text(r.get("time")))


def join(records: Iterable[tuple[str, Mapping[str, object]]]) -> list[CallLine]:
    """One line per call, in the order the calls were decided."""
    lines: dict[str, CallLine] = {}
    for where, record in records:
        kind = record.get("kind")
        if kind == "decision":
            line = _decision(where, record)
            lines[line.decision_id or where] = line
        elif kind == HOLD_KIND:
            decision_id = _text(record.get("decision_id"))
            key = decision_id or where
            lines[key] = _ended(lines.get(key), where, record)
    return list(lines.values())


def _escaped(ch: str) -> str:
    if unicodedata.category(ch) not in _ESCAPED:
        return ch
    code = ord(ch)
    return (f"\\x{code:02x}" if code < 0x100 else
            f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def shown(text: str | None, width: int) -> str:
    """`text` for a terminal: escaped, and cut to `width` characters (`-` if empty).
    An escape is never cut in half; only the first `width + 1` characters are read."""
    if not text:
        return "-"
    pieces = [_escaped(ch) for ch in text[:width + 1]]
    if len(text) <= width and sum(map(len, pieces)) <= width:
        return "".join(pieces)
    out: list[str] = []
    size = 0
    for piece in pieces:
        if size + len(piece) > width - 1:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out) + "…"


def render_text(lines: Sequence[CallLine]) -> str:
    rows = [COLUMNS] + [
        (line.time or "-", line.session, line.agent, line.tool, line.action or "?",
         line.outcome, ",".join(line.rules), line.by) for line in lines]
    cells = [[shown(c, w) if i else str(c) for c, w in zip(row, WIDTHS, strict=True)]
             for i, row in enumerate(rows)]
    widths = [max(len(row[col]) for row in cells) for col in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def render_json(lines: Sequence[CallLine]) -> str:
    return "\n".join(json.dumps(line.as_json(), sort_keys=True) for line in lines)
