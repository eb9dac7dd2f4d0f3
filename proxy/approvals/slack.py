"""Slack approvals: each held call is posted to a channel with Approve / Deny buttons.

When a hold opens, the message shows what will run: tool, agent, session,
rules, and the call's exact canonical arguments (escaped, clipped with the cut
counted, never a summary a model wrote). A click comes back to
`POST /slack/interactions` on the admin port and decides the approval through
the same queue as the REST API, so the first decision wins wherever it comes
from. When the approval ends (Slack, REST, timeout), the message is edited to
show the outcome and loses its buttons. The message's channel and ts are kept
with the approval (in Redis, with `store: redis`), so the replica that ends it
edits the message another replica posted; the edit is claimed once, by
whichever of "posted" and "ended" comes second.

A click counts only if Slack's v0 signature over the raw body checks out with a
timestamp within 5 minutes, and the user is in `slack.approvers` (for
Approve, also in the rule's `approvers` when it names any). Slack being down
never decides anything: a hold whose message could not be posted times out
unless someone approves it elsewhere.

This module is an edge (it speaks HTTP to Slack), hence the aiohttp imports.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import unicodedata
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from ..audit import AuditLog, AuditWriteError, redact
from ..errors import StoreUnavailable
from ..telemetry import Metrics
from .queue import Approval, Approvals, State
from .settings import SlackSettings

log = logging.getLogger("tether.approvals.slack")

type Json = dict[str, Any]

INTERACTIONS_PATH = "/slack/interactions"
APPROVE, DENY = "tether_approve", "tether_deny"
MAX_SKEW_S = 300            # Slack's advice: refuse requests older (or newer) than 5 minutes
ARGS_LIMIT = 2500           # characters of escaped arguments (a section holds 3000)
FIELD_LIMIT = 200
CLOSE_GRACE_S = 5.0
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SLACK_ID = re.compile(r"[A-Z0-9]{2,64}")

# Shown as \u escapes: controls, format characters (bidi overrides and isolates, zero
# widths, tag characters), surrogates, private use, unassigned, line/paragraph
# separators, odd spaces, and other characters that render as nothing.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_HIDDEN_EXTRA = (range(0x034F, 0x0350), range(0x115F, 0x1161), range(0x17B4, 0x17B6),
                 range(0x180B, 0x1810), range(0x2800, 0x2801), range(0x3164, 0x3165),
                 range(0xFE00, 0xFE10), range(0xFFA0, 0xFFA1), range(0xE0100, 0xE01F0))
_MRKDWN = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": "\\u0060"}


def visible(ch: str) -> str:
    """`ch`, or a `\\uXXXX` escape when it could hide, reorder or fake what is shown."""
    cp = ord(ch)
    if ch == " " or not (unicodedata.category(ch) in _HIDDEN_CATEGORIES
                         or any(cp in r for r in _HIDDEN_EXTRA)):
        return ch
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def escape(text: str) -> str:
    """Text safe inside Slack mrkdwn, inline code and code blocks: &, <, > as entities
    (no links, mentions or @channel), backticks as `\\u0060` (no way out of a code span)."""
    return "".join(_MRKDWN.get(ch) or visible(ch) for ch in text)


def clip(text: str, limit: int) -> tuple[str, int]:
    """The escaped text, at most `limit` characters; and how many characters of `text`
    did not fit. Never cuts inside an escape."""
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = _MRKDWN.get(ch) or visible(ch)
        if size + len(piece) > limit:
            return "".join(out), len(text) - i
        out.append(piece)
        size += len(piece)
    return "".join(out), 0


def _plain(text: str, limit: int) -> str:
    shown = "".join(visible(ch) for ch in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


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
    return json.dumps(result.value, separators=(",", ":"), ensure_ascii=False)


def _blocks(a: Approval, title: str) -> list[Json]:
    text = shown_arguments(a.arguments)
    args, cut = clip(text, ARGS_LIMIT)
    why, why_cut = clip(a.message, 1000)
    note = f"\n_({cut} of {len(text)} characters not shown)_" if cut else ""
    blocks: list[Json] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": False,
                                    "text": _plain(f"{title}: {a.tool}", 150)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Tool*\n{_code(a.tool)}"},
            {"type": "mrkdwn", "text": f"*Agent*\n{_code(a.agent)}"},
            {"type": "mrkdwn", "text": f"*Session*\n{_code(a.session)}"},
            {"type": "mrkdwn", "text": f"*Rules*\n{_code(', '.join(a.rules))}"}]},
    ]
    if a.message:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": f"*Why it is held*\n{why}{'…' if why_cut else ''}"}})
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
             "text": {"type": "plain_text", "text": _plain(
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


def verify_signature(secret: str, timestamp: str | None, signature: str | None, body: bytes,
                     now: float) -> str | None:
    """None when the request is Slack's (v0 signature, fresh timestamp); else why not."""
    if not timestamp or not signature:
        return "X-Slack-Request-Timestamp and X-Slack-Signature are required"
    if not _TIMESTAMP.fullmatch(timestamp):
        return "X-Slack-Request-Timestamp is not a Unix time"
    if abs(now - int(timestamp)) > MAX_SKEW_S:
        return "X-Slack-Request-Timestamp is more than 5 minutes away from now"
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        return "X-Slack-Signature does not match"
    return None


class BadPayload(ValueError):
    """A signed request whose body is not a well-formed interaction payload."""


@dataclass(frozen=True, slots=True)
class Click:
    user_id: str
    user_name: str | None
    approve: bool
    approval_id: str
    channel: str | None

    @property
    def by(self) -> str:
        return f"slack:{self.user_id}" + (f" ({self.user_name})" if self.user_name else "")


def _dict(value: object) -> Json:
    return value if isinstance(value, dict) else {}


def parse_click(body: bytes) -> Click | None:
    """The click on one of our buttons, or None for any other (valid) interaction."""
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                        max_num_fields=20)
        [raw] = form.get("payload", [])
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadPayload("the body must be form-encoded with one JSON `payload`") from e
    if not isinstance(payload, dict):
        raise BadPayload("the payload must be a JSON object")
    actions = payload.get("actions")
    if payload.get("type") != "block_actions" or not isinstance(actions, list) or not actions:
        return None
    action = _dict(actions[0])
    if action.get("action_id") not in (APPROVE, DENY):
        return None
    user, value = _dict(payload.get("user")), action.get("value")
    user_id, name = user.get("id"), user.get("username") or user.get("name")
    if not isinstance(user_id, str) or not _SLACK_ID.fullmatch(user_id):
        raise BadPayload("the payload names no valid user.id")
    if not isinstance(value, str) or not 0 < len(value) <= 100:
        raise BadPayload("the action carries no approval id")
    channel = _dict(payload.get("channel")).get("id")
    return Click(user_id, _plain(name, 64) if isinstance(name, str) and name else None,
                 action["action_id"] == APPROVE, value,
                 channel if isinstance(channel, str) and _SLACK_ID.fullmatch(channel) else None)


class SlackError(Exception):
    """A Slack Web API call failed (transport, HTTP status or `ok: false`)."""


@dataclass(frozen=True, slots=True)
class Posted:
    channel: str
    ts: str


type HttpSource = aiohttp.ClientSession | Callable[[], aiohttp.ClientSession] | None


class SlackNotifier:
    """Posts holds to Slack and applies the clicks that come back.

    Queue listeners run synchronously inside `create`/`decide`, so they only start
    background tasks; every task is kept in `_tasks` until done, and `close` drains them.
    """

    def __init__(self, settings: SlackSettings, queue: Approvals, http: HttpSource = None,
                 audit: AuditLog | None = None, metrics: Metrics | None = None, *,
                 ticket_validity_s: float = 3600.0, env: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.queue = queue
        self.audit = audit
        self.ticket_validity_s = ticket_validity_s
        self._env = env          # read at use time: a rotated token or secret applies at once
        self._clock = clock
        self._http = http if isinstance(http, aiohttp.ClientSession) else None
        self._factory = http if callable(http) and self._http is None else None
        self._owned: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        registry = metrics.registry if metrics is not None else None
        self.api_calls = Counter("tether_slack_api_calls", "Slack Web API calls, by method and "
                                 "outcome (ok, error)", ["method", "outcome"], registry=registry)
        self.interactions = Counter("tether_slack_interactions", "Requests on /slack/interactions,"
                                    " by outcome", ["outcome"], registry=registry)
        queue.on_created(self._created)
        queue.on_decided(self._decided)

    # -- the queue's listeners ------------------------------------------------------------

    def _created(self, approval: Approval) -> None:
        self._spawn(self._post_and_share(approval), f"slack-post-{approval.id}")

    def _decided(self, approval: Approval) -> None:
        self._spawn(self._update(approval.id), f"slack-update-{approval.id}")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        if self._closed:
            coro.close()
            log.warning("slack: %s skipped, tether is shutting down", name)
            return None
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:
            coro.close()
            log.error("slack: %s skipped, no event loop is running", name)
            return None
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("slack: %s failed", task.get_name(), exc_info=task.exception())

    async def _post(self, approval: Approval) -> Posted | None:
        body = {"channel": self.settings.channel, **pending_message(approval)}
        try:
            reply = await self._call("chat.postMessage", body)
        except SlackError as e:
            # Nothing is approved by a failure: the hold waits, then times out (a deny).
            log.error("slack: approval %s was not posted: %s", approval.id, e)
            self._audit({"kind": "approval", "event": "slack_post_failed", "id": approval.id,
                         "tool": approval.tool, "error": str(e)})
            return None
        channel, ts = reply.get("channel") or self.settings.channel, reply.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            log.error("slack: chat.postMessage for %s answered without channel and ts", approval.id)
            return None
        return Posted(channel, ts)

    async def _post_and_share(self, approval: Approval) -> None:
        posted = await self._post(approval)
        if posted is None:
            return
        try:
            await self.queue.set_message(approval.id, posted.channel, posted.ts)
        except StoreUnavailable as e:
            log.error("slack: the message of approval %s was not recorded: %s", approval.id,
                      e.message)
            return
        await self._update(approval.id)  # it may have ended while we posted

    async def _update(self, approval_id: str) -> None:
        """Edits the message if the approval has ended and the message exists, unless
        someone (on any replica) already claimed that edit."""
        try:
            claimed = await self.queue.claim_message(approval_id)
        except StoreUnavailable as e:
            log.error("slack: the message of approval %s was not updated: %s", approval_id,
                      e.message)
            return
        if claimed is None:
            return
        try:
            await self._call("chat.update", {"channel": claimed.channel, "ts": claimed.ts,
                                             **decided_message(claimed.approval,
                                                               claimed.slack_user)})
        except SlackError as e:
            log.error("slack: the message of approval %s was not updated: %s", approval_id, e)

    async def _tell(self, channel: str, user: str, text: str) -> None:
        try:
            await self._call("chat.postEphemeral", {"channel": channel, "user": user,
                                                    "text": text})
        except SlackError as e:
            log.warning("slack: could not tell %s: %s", user, e)

    # -- the Web API ----------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http
        if self._owned is None or self._owned.closed:
            self._owned = self._factory() if self._factory is not None else aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15, sock_connect=5), trust_env=False)
        return self._owned

    async def _call(self, method: str, body: Json) -> Json:
        try:
            reply = await self._request(method, body)
        except SlackError:
            self.api_calls.labels(method, "error").inc()
            raise
        self.api_calls.labels(method, "ok").inc()
        return reply

    async def _request(self, method: str, body: Json, attempts: int = 3) -> Json:
        token = self._env.get(self.settings.bot_token_env, "")
        if not token:
            raise SlackError(f"{self.settings.bot_token_env} is not set")
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {"Authorization": f"Bearer {token}",
                   "Content-Type": "application/json; charset=utf-8"}
        for attempt in range(1, attempts + 1):
            try:
                async with self._client().post(f"{self.settings.api_url}/{method}", data=data,
                                               headers=headers) as resp:
                    if resp.status == 429 and attempt < attempts:
                        await asyncio.sleep(_retry_after(resp.headers.get("Retry-After")))
                        continue
                    if resp.status != 200:
                        raise SlackError(f"{method}: HTTP {resp.status}")
                    reply = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                raise SlackError(f"{method}: {type(e).__name__}: {e}") from e
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                error = reply.get("error") if isinstance(reply, dict) else "not a JSON object"
                raise SlackError(f"{method}: {error}")
            return reply
        raise SlackError(f"{method}: still rate limited after {attempts} attempts")

    async def close(self) -> None:
        """Let in-flight posts and updates finish (briefly), then stop."""
        self._closed = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._owned is not None:
            await self._owned.close()

    # -- clicks ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        """POST /slack/interactions. Decides before answering (memory, or one Redis round
        trip: well within Slack's 3 s); the message edit runs in the background."""
        body = await request.read()
        status, reply = await self.interaction(request.headers, body)
        return web.json_response(reply, status=status)

    async def interaction(self, headers: Mapping[str, str], body: bytes) -> tuple[int, Json]:
        secret = self._env.get(self.settings.signing_secret_env, "")
        if not secret:
            self.interactions.labels("disabled").inc()
            return 503, _error(f"Slack interactions are disabled: set "
                               f"{self.settings.signing_secret_env}")
        problem = verify_signature(secret, headers.get("X-Slack-Request-Timestamp"),
                                   headers.get("X-Slack-Signature"), body, self._clock())
        if problem is not None:
            log.warning("slack: interaction refused: %s", problem)
            self.interactions.labels("bad_signature").inc()
            return 401, _error(problem)
        try:
            click = parse_click(body)
        except BadPayload as e:
            self.interactions.labels("bad_request").inc()
            return 400, _error(str(e))
        if click is None:
            self.interactions.labels("ignored").inc()
            return 200, {}
        retry = headers.get("X-Slack-Retry-Num")
        if retry:
            log.info("slack: retry %s of a click on %s", retry, click.approval_id)
        try:
            return 200, _ephemeral(await self._apply(click))
        except StoreUnavailable as e:
            self.interactions.labels("unavailable").inc()
            log.error("slack: click on %s not applied: %s", click.approval_id, e.message)
            return 200, _ephemeral(f"{escape(e.message)}; nothing was changed, try again.")

    async def _apply(self, click: Click) -> str:
        verb = "approve" if click.approve else "deny"
        approval = await self.queue.get(click.approval_id)
        # Who may click is checked first, so others cannot even learn which ids exist.
        refusal = self._refusal(click, approval)
        if refusal is not None:
            self.interactions.labels("refused").inc()
            log.warning("slack: %s may not %s %s: %s", click.by, verb, click.approval_id,
                        refusal)
            known = approval.as_json() if approval is not None else {"id": click.approval_id}
            self._audit({"kind": "approval", "event": "refused", **known,
                         "attempted_by": click.by, "attempted": verb, "refused_because": refusal})
            text = (f"You may not {verb} this call ({escape(click.approval_id)}): {refusal}. "
                    f"Nothing was changed.")
            self._spawn(self._tell(click.channel or self.settings.channel, click.user_id, text),
                        f"slack-tell-{click.approval_id}")
            return text
        if approval is None:
            self.interactions.labels("unknown").inc()
            return (f"Approval {escape(click.approval_id)} is not known to this tether "
                    f"(it may have restarted); nothing was changed.")
        decided, changed = await self.queue.decide(
            approval.id, approve=click.approve, by=click.by,
            reason=f"clicked {'Approve' if click.approve else 'Deny'} in Slack",
            ticket_validity_s=self.ticket_validity_s, slack_user=click.user_id)
        if decided is None:  # gone from the store since it was read
            self.interactions.labels("unknown").inc()
            return f"Approval {escape(click.approval_id)} is no longer known; nothing was changed."
        if not changed:
            self.interactions.labels("repeated").inc()
            return (f"Approval {decided.id} is already {decided.state.value}"
                    f"{f' (by {escape(decided.decided_by)})' if decided.decided_by else ''}; "
                    f"nothing was changed.")
        self.interactions.labels("decided").inc()
        return f"{decided.state.value.capitalize()}: {escape(decided.tool)} ({decided.id})."

    def _refusal(self, click: Click, approval: Approval | None) -> str | None:
        if click.user_id not in self.settings.approvers:
            return "you are not in slack.approvers"
        names = {click.user_id, f"slack:{click.user_id}"}
        if (click.approve and approval is not None and approval.approvers
                and not names & set(approval.approvers)):
            return "the rule that held it names other approvers"
        return None

    def _audit(self, record: dict[str, object]) -> None:
        if self.audit is None:
            return
        try:
            self.audit.write(record)
        except AuditWriteError:
            log.exception("audit write failed for a Slack approval event")


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value or 1)
    except ValueError:
        return 1.0
    return min(max(seconds, 0.0), 30.0) if math.isfinite(seconds) else 1.0


def _error(message: str) -> Json:
    return {"error": {"message": message}}


def _ephemeral(text: str) -> Json:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}
