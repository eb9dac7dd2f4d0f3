"""One view of a hold for every surface an approver decides on: the page, Slack, the CLI.

`shown(approval)` is the approval's context (approvals/context.py) as a person
reads it: every value agent- or model-controlled text, each character that could
hide, reorder or fake what is shown (controls, bidi overrides and isolates, zero
widths, tag characters, odd spaces ...) replaced by a visible `\\uXXXX` escape,
missing values (an egress request has no conversation; a record from before
this field existed) as "unknown", and the time left before the hold expires.
Each surface adds only its own syntax: the page puts these strings into the DOM
as text (never as HTML), Slack escapes them for mrkdwn (slack/messages.py), the
CLI prints them. Pure: no I/O.
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

from .context import HoldContext
from .queue import Approval, State

UNKNOWN = "unknown"
MESSAGE_CHARS = 1000

# Shown as \u escapes: controls, format characters (bidi overrides and isolates, zero
# widths, tag characters), surrogates, private use, unassigned, line/paragraph
# separators, odd spaces, and other characters that render as nothing.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_HIDDEN_EXTRA = (range(0x034F, 0x0350), range(0x115F, 0x1161), range(0x17B4, 0x17B6),
                 range(0x180B, 0x1810), range(0x2800, 0x2801), range(0x3164, 0x3165),
                 range(0xFE00, 0xFE10), range(0xFFA0, 0xFFA1), range(0xE0100, 0xE01F0))
_KEPT = frozenset("\n")   # line breaks of a prompt stay line breaks


def visible(ch: str) -> str:
    """`ch`, or a `\\uXXXX` escape when it could hide, reorder or fake what is shown."""
    cp = ord(ch)
    if ch == " " or not (unicodedata.category(ch) in _HIDDEN_CATEGORIES
                         or any(cp in r for r in _HIDDEN_EXTRA)):
        return ch
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def visible_text(text: str | None, *, lines: bool = False) -> str:
    """The text with every hidden character escaped; "unknown" for None. `lines`: keep
    line breaks (a prompt's paragraphs) instead of escaping them."""
    if text is None:
        return UNKNOWN
    return "".join(ch if lines and ch in _KEPT else visible(ch) for ch in text)


def time_left(a: Approval, now: float) -> str:
    if a.state is not State.PENDING:
        return a.state.value
    left = max(0, round(a.expires - now))
    if left == 0:
        return "expired"
    minutes, seconds = divmod(left, 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


@dataclass(frozen=True, slots=True)
class Shown:
    agent: str
    session: str
    effect: str
    api: str
    rules: str
    message: str
    user_request: str
    model_text: str
    recent: tuple[str, ...]   # ("unknown",) when the session's history was not known
    time_left: str

    def as_json(self) -> dict[str, object]:
        return {"agent": self.agent, "session": self.session, "effect": self.effect,
                "api": self.api, "rules": self.rules, "message": self.message,
                "user_request": self.user_request, "model_text": self.model_text,
                "recent": list(self.recent), "time_left": self.time_left}


def _api(c: HoldContext | None) -> str:
    if c is None or c.api or c.effect is None:  # an older record knows neither
        return visible_text(c.api if c else None)
    return "none (no API operation is linked to this tool)"


def shown(a: Approval, now: float | None = None) -> Shown:
    """What every surface shows beside the call (the call itself: tool and arguments)."""
    c = a.context
    message = a.message if len(a.message) <= MESSAGE_CHARS else a.message[:MESSAGE_CHARS] + "…"
    recent: tuple[str, ...] = (UNKNOWN,)
    if c is not None and c.recent is not None:
        recent = tuple(visible_text(line) for line in c.recent)
    return Shown(
        agent=visible_text(a.agent), session=visible_text(a.session),
        effect=visible_text(c.effect if c else None),
        api=_api(c),
        rules=visible_text(", ".join(a.rules)) if a.rules else "none",
        message=visible_text(message) if message else "none",
        user_request=visible_text(c.user_request if c else None, lines=True),
        model_text=visible_text(c.model_text if c else None, lines=True),
        recent=recent, time_left=time_left(a, time.time() if now is None else now))


def listed(a: Approval, now: float | None = None) -> dict[str, object]:
    """An approval as the admin API lists it: the record and what a person is shown."""
    return {**a.as_json(), "shown": shown(a, now).as_json()}
