"""`tether approvals list`: a pending hold's context as terminal lines.

The CLI reads the admin API, whose `shown` view (approvals/shown.py) already has
every hidden character of agent and model text escaped; terminal control sequences
are among them, so nothing here can move the cursor or recolour the screen. This
only lays the view out: one labelled line per field, the user's request and the
model's text indented under their label, each bounded again for a terminal.
"""

from __future__ import annotations

from collections.abc import Mapping

UNKNOWN = "unknown"
TEXT_LINES = 8      # lines of the user's request / the model's text at most
LINE_CHARS = 160


def _text(value: object) -> str:
    return value if isinstance(value, str) else UNKNOWN


def _block(label: str, value: object) -> list[str]:
    lines = _text(value).split("\n")
    out = [f"{label}:"]
    for line in lines[:TEXT_LINES]:
        out.append("  | " + (line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"))
    if len(lines) > TEXT_LINES:
        out.append(f"  | … ({len(lines) - TEXT_LINES} more lines)")
    return out


def context_lines(approval: Mapping[str, object]) -> list[str]:
    """What the approver needs beside the call, from one approval of the admin API."""
    shown = approval.get("shown")
    view: Mapping[str, object] = shown if isinstance(shown, Mapping) else {}
    recent = view.get("recent")
    lines = [
        f"effect: {_text(view.get('effect'))}   API operation: {_text(view.get('api'))}   "
        f"time left: {_text(view.get('time_left'))}",
        f"rule: {_text(view.get('rules'))}: {_text(view.get('message'))}",
        *_block("user's request", view.get("user_request")),
        *_block("model's text before the call", view.get("model_text")),
        "recently in this session:",
    ]
    items = [str(r) for r in recent] if isinstance(recent, list) else [UNKNOWN]
    lines += [f"  - {r[:LINE_CHARS]}" for r in items] or ["  (nothing earlier)"]
    return lines
