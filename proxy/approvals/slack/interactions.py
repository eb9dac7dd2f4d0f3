"""Clicks on Approve / Deny: Slack's word is checked before anything is believed.

A click counts only if Slack's v0 signature over the raw body checks out with a
timestamp within 5 minutes (so a replayed or forged request decides nothing),
and the user is in `slack.approvers` (for Approve, also in the rule's
`approvers` when it names any). Who may click is checked before the approval
is looked at, so others cannot even learn which ids exist. A valid click
decides through the same queue as the REST API: the first decision wins,
wherever it comes from. Slack wants an answer within 3 s, so the decision is
made before answering and everything else (the message edit, a note to a
refused user) runs in the background.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from ...errors import StoreUnavailable
from ..queue import CALLER_GONE, Approval, Approvals, State
from ..settings import SlackSettings
from .messages import APPROVE, DENY, Json, escape, plain

log = logging.getLogger("tether.approvals.slack")

INTERACTIONS_PATH = "/slack/interactions"
MAX_SKEW_S = 300            # Slack's advice: refuse requests older (or newer) than 5 minutes
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SLACK_ID = re.compile(r"[A-Z0-9]{2,64}")


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
    return Click(user_id, plain(name, 64) if isinstance(name, str) and name else None,
                 action["action_id"] == APPROVE, value,
                 channel if isinstance(channel, str) and _SLACK_ID.fullmatch(channel) else None)


class Interactions:
    """The handler of `POST /slack/interactions` on the admin port."""

    def __init__(self, settings: SlackSettings, queue: Approvals, *, env: Mapping[str, str],
                 clock: Callable[[], float], ticket_validity_s: float,
                 audit: Callable[[dict[str, object]], None], tell: Callable[[Click, str], None],
                 registry: CollectorRegistry | None) -> None:
        """`audit`: writes one audit record; `tell`: sends the user who clicked an
        ephemeral note, in the background."""
        self.settings = settings
        self.queue = queue
        self.ticket_validity_s = ticket_validity_s
        self._env = env          # read at use time: a rotated signing secret applies at once
        self._clock = clock
        self._audit = audit
        self._tell = tell
        self.outcomes = Counter("tether_slack_interactions", "Requests on /slack/interactions,"
                                " by outcome", ["outcome"], registry=registry)

    async def handle(self, request: web.Request) -> web.Response:
        """Decides before answering (memory, or one Redis round trip: well within
        Slack's 3 s); the message edit runs in the background."""
        body = await request.read()
        status, reply = await self.interaction(request.headers, body)
        return web.json_response(reply, status=status)

    async def interaction(self, headers: Mapping[str, str], body: bytes) -> tuple[int, Json]:
        secret = self._env.get(self.settings.signing_secret_env, "")
        if not secret:
            self.outcomes.labels("disabled").inc()
            return 503, _error(f"Slack interactions are disabled: set "
                               f"{self.settings.signing_secret_env}")
        problem = verify_signature(secret, headers.get("X-Slack-Request-Timestamp"),
                                   headers.get("X-Slack-Signature"), body, self._clock())
        if problem is not None:
            log.warning("slack: interaction refused: %s", problem)
            self.outcomes.labels("bad_signature").inc()
            return 401, _error(problem)
        try:
            click = parse_click(body)
        except BadPayload as e:
            self.outcomes.labels("bad_request").inc()
            return 400, _error(str(e))
        if click is None:
            self.outcomes.labels("ignored").inc()
            return 200, {}
        retry = headers.get("X-Slack-Retry-Num")
        if retry:
            log.info("slack: retry %s of a click on %s", retry, click.approval_id)
        try:
            return 200, _ephemeral(await self._apply(click))
        except StoreUnavailable as e:
            self.outcomes.labels("unavailable").inc()
            log.error("slack: click on %s not applied: %s", click.approval_id, e.message)
            return 200, _ephemeral(f"{escape(e.message)}; nothing was changed, try again.")

    async def _apply(self, click: Click) -> str:
        verb = "approve" if click.approve else "deny"
        approval = await self.queue.get(click.approval_id)
        # Who may click is checked first, so others cannot even learn which ids exist.
        refusal = self._refusal(click, approval)
        if refusal is not None:
            self.outcomes.labels("refused").inc()
            log.warning("slack: %s may not %s %s: %s", click.by, verb, click.approval_id,
                        refusal)
            known = approval.as_json() if approval is not None else {"id": click.approval_id}
            self._audit({"kind": "approval", "event": "refused", **known,
                         "attempted_by": click.by, "attempted": verb, "refused_because": refusal})
            text = (f"You may not {verb} this call ({escape(click.approval_id)}): {refusal}. "
                    f"Nothing was changed.")
            self._tell(click, text)
            return text
        if approval is None:
            self.outcomes.labels("unknown").inc()
            return (f"Approval {escape(click.approval_id)} is not known to this tether "
                    f"(it may have restarted); nothing was changed.")
        decided, changed = await self.queue.decide(
            approval.id, approve=click.approve, by=click.by,
            reason=f"clicked {'Approve' if click.approve else 'Deny'} in Slack",
            ticket_validity_s=self.ticket_validity_s, slack_user=click.user_id)
        if decided is None:  # gone from the store since it was read
            self.outcomes.labels("unknown").inc()
            return f"Approval {escape(click.approval_id)} is no longer known; nothing was changed."
        if not changed and decided.state is State.ABANDONED:
            self.outcomes.labels("repeated").inc()
            return (f"Approval {decided.id} was abandoned: {CALLER_GONE}"
                    f"{f' ({escape(decided.reason)})' if decided.reason else ''}. "
                    f"Nothing was changed.")
        if not changed:
            self.outcomes.labels("repeated").inc()
            return (f"Approval {decided.id} is already {decided.state.value}"
                    f"{f' (by {escape(decided.decided_by)})' if decided.decided_by else ''}; "
                    f"nothing was changed.")
        self.outcomes.labels("decided").inc()
        return f"{decided.state.value.capitalize()}: {escape(decided.tool)} ({decided.id})."

    def _refusal(self, click: Click, approval: Approval | None) -> str | None:
        if click.user_id not in self.settings.approvers:
            return "you are not in slack.approvers"
        names = {click.user_id, f"slack:{click.user_id}"}
        if (click.approve and approval is not None and approval.approvers
                and not names & set(approval.approvers)):
            return "the rule that held it names other approvers"
        return None


def _error(message: str) -> Json:
    return {"error": {"message": message}}


def _ephemeral(text: str) -> Json:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}
