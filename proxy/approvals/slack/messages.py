"""What a Slack approver sees must be exactly what will run, and nothing can pose as it.

The text comes from the call's canonical arguments (the ones the approval is
bound to, secrets masked as the audit log masks them), never from a summary a
model wrote; what does not fit is cut where it cannot break an escape, and the
cut is counted. Arguments are attacker-controlled text, so everything shown
is escaped for mrkdwn (no links, mentions or @channel, no way out of a code
span) and any character that could hide, reorder or fake what is shown
(controls, bidi overrides, zero widths, ...) is shown as its `\\u` escape.
Beside the call, the hold's context (the user's request, the model's text, the
session's recent decisions, effect, operation, time left) comes from the view the
page and the CLI show too (approvals/shown.py), quoted in code blocks and labelled
as what the user and the model wrote: it explains the call, it never replaces it.
Pure functions from an Approval to Slack's JSON: no I/O here.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from ...audit import redact
from ...surrogates import json_text
from ..queue import Approval, State
from ..shown import Shown, shown, visible

type Json = dict[str, Any]

APPROVE, DENY = "tether_approve", "tether_deny"   # the buttons' action ids
ARGS_LIMIT = 2500           # characters of escaped arguments (a section holds 3000)
FIELD_LIMIT = 200

CONTEXT_LIMIT = 1200        # characters of the user's request and of the model's text
_MRKDWN = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "\\u0060"}


def escape(text: str) -> str:
    """Text safe inside Slack mrkdwn, inline code and code blocks: &, <, > as entities
    (no links, mentions or @channel), backticks as `\\u0060` (no way out of a code span)."""
    return "".join(_MRKDWN.get(ch) or visible(ch) for ch in text)


def clip(text: str, limit: int, *, lines: bool = False) -> tuple[str, int]:
    """The escaped text, at most `limit` characters; and how many characters of `text`
    did not fit. Never cuts inside an escape. `lines`: line breaks stay (in a code block,
    where they cannot start anything)."""
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = "\n" if lines and ch == "\n" else _MRKDWN.get(ch) or visible(ch)
        if size + len(piece) > limit:
            return "".join(out), len(text) - i
        out.append(piece)
        size += len(piece)
    return "".join(out), 0


def plain(text: str, limit: int) -> str:
    """Text for a plain_text field (no mrkdwn to escape), hidden characters shown."""
    out = "".join(visible(ch) for ch in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _code(value: str | None, limit: int = FIELD_LIMIT) -> str:
    if not value:
        return "_none_"
    shown, cut = clip(value, limit)
    return f"`{shown}`" + (f" _(+{cut} characters not shown)_" if cut else "")


def _when(t: float) -> str:
    iso = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(t)}^{{date_short_pretty}} {{time_secs}}|{iso}>"


def _duration(seconds: float) -> str:
    if seconds >= 60 and round(seconds) % 60 == 0:
        return f"{round(seconds) // 60} min"
    return f"{seconds:.3g} s"


def shown_arguments(arguments: str) -> str:
    """The canonical arguments with secrets masked, as the audit log masks them: a
    password in a tool call must not land in a Slack channel's history."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = arguments
    result = redact(value)
    if not result.masked:
        return arguments  # nothing secret: exactly the text the approval is bound to
    if isinstance(result.value, str):
        return result.value
    return json_text(result.value, separators=(",", ":"))


def _quoted(title: str, text: str) -> Json:
    """A section quoting agent or model text in a code block (escaped, bounded)."""
    body, cut = clip(text, CONTEXT_LIMIT, lines=True)
    more = f"\n_(+{cut} characters not shown)_" if cut else ""
    return {"type": "section", "text": {"type": "mrkdwn",
                                        "text": f"*{title}*\n```\n{body}\n```{more}"}}


def _context_blocks(s: Shown) -> list[Json]:
    """The hold's context (approvals/shown.py, the same view as the page and the CLI)."""
    recent = "\n".join(f"• {clip(line, 240)[0]}" for line in s.recent) or "_nothing earlier_"
    return [
        _quoted("The user's request", s.user_request),
        _quoted("The model's text before the call", s.model_text),
        {"type": "section", "text": {"type": "mrkdwn", "text": (
            f"*Recently in this session*\n{recent}")}},
    ]


def _blocks(a: Approval, title: str) -> list[Json]:
    text = shown_arguments(a.arguments)
    args, cut = clip(text, ARGS_LIMIT)
    why, why_cut = clip(a.message, 1000)
    note = f"\n_({cut} of {len(text)} characters not shown)_" if cut else ""
    view = shown(a)
    blocks: list[Json] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": False,
                                    "text": plain(f"{title}: {a.tool}", 150)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Tool*\n{_code(a.tool)}"},
            {"type": "mrkdwn", "text": f"*Agent*\n{_code(a.agent)}"},
            {"type": "mrkdwn", "text": f"*Session*\n{_code(a.session)}"},
            {"type": "mrkdwn", "text": f"*Rules*\n{_code(', '.join(a.rules))}"},
            {"type": "mrkdwn", "text": f"*Effect*\n{_code(view.effect)}"},
            {"type": "mrkdwn", "text": f"*API operation*\n{_code(view.api)}"},
            {"type": "mrkdwn", "text": f"*Time left*\n{escape(view.time_left)}"}]},
    ]
    if a.message:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": f"*Why it is held*\n{why}{'…' if why_cut else ''}"}})
    blocks += _context_blocks(view)
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": (
            f"*Arguments* (exactly as they will run)\n```\n{args}\n```{note}")}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": (
            f"Approval `{escape(a.id)}` · {a.mode.value} · expires {_when(a.expires)} · "
            f"{escape(a.provider)} · policy {escape(a.policy_revision[:12])}")}]},
    ]
    return blocks


def pending_message(a: Approval) -> Json:
    """The message posted when the hold opens: the call, and the two buttons."""
    buttons: Json = {"type": "actions", "block_id": "tether_decision", "elements": [
        {"type": "button", "action_id": APPROVE, "value": a.id, "style": "primary",
         "text": {"type": "plain_text", "text": "Approve"},
         "confirm": {
             "title": {"type": "plain_text", "text": "Approve this call?"},
             "text": {"type": "plain_text", "text": plain(
                 f"{a.tool} will run once with exactly the arguments shown.", 300)},
             "confirm": {"type": "plain_text", "text": "Approve"},
             "deny": {"type": "plain_text", "text": "Cancel"}}},
        {"type": "button", "action_id": DENY, "value": a.id, "style": "danger",
         "text": {"type": "plain_text", "text": "Deny"}}]}
    return {"text": f"tether: approval needed for {_code(a.tool, 100)} ({a.id})",
            "blocks": [*_blocks(a, "Approval needed"), buttons],
            "unfurl_links": False, "unfurl_media": False}


def decided_message(a: Approval, slack_user: str | None = None) -> Json:
    """The same message once the approval has ended: the outcome instead of the buttons.
    `slack_user`: the Slack user whose click decided it (a name given to the REST API is
    shown as text, never as a mention, so it cannot pose as a Slack user)."""
    if a.state is State.EXPIRED:
        outcome = (f":hourglass: *Expired*: no one decided within "
                   f"{_duration(a.expires - a.created)}, so the call was denied")
    elif a.state is State.ABANDONED:
        outcome = (f":ghost: *Abandoned* at {_when(a.decided_at or time.time())}: the caller "
                   f"is gone, so nothing will run and nothing can be approved"
                   + (f" ({clip(a.reason, 500)[0]})" if a.reason else ""))
    else:
        verdict = (":white_check_mark: *Approved*" if a.state in (State.APPROVED, State.USED)
                   else ":no_entry: *Denied*")
        who = f"<@{slack_user}>" if slack_user else _code(a.decided_by)
        outcome = f"{verdict} by {who} at {_when(a.decided_at or time.time())}"
        if a.reason:
            outcome += f": {clip(a.reason, 500)[0]}"
    result: Json = {"type": "section", "text": {"type": "mrkdwn", "text": outcome}}
    return {"text": f"tether: {a.state.value}: {_code(a.tool, 100)} ({a.id})",
            "blocks": [*_blocks(a, a.state.value.capitalize()), result]}
